"""`python -m stages.download` (dvc.yaml) and `datm data`: the process around the step
datm/pipeline/download.py, with its one-line errors."""

from __future__ import annotations

from dataclasses import asdict

from datm.pipeline.download import download_data
from stages import common


def run(params: str = "params.yaml", root: str = ".") -> dict:
    p, pa = common.load(params), common.paths(root)
    with common.tracker("download", p, root) as tracker:
        tracker.params(asdict(p.data), "data.")
        with common.console.status(f"reading {p.data.name}"):
            summary = download_data(p, pa)
        tracker.metrics({"train_images": summary["train_images"],
                         "test_images": summary["test_images"]}, 0)
    common.console.print(f"[green]download:[/] {summary['train_images']} train / "
                         f"{summary['test_images']} test images, {summary['classes']} classes, "
                         f"shape {summary['shape']}, from {summary['source']} -> "
                         f"{pa.train.parent}", highlight=False)
    return summary


if __name__ == "__main__":
    args = common.parse(__doc__)
    common.main(lambda: run(args.params, args.root))
