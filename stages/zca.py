"""`python -m stages.zca` (dvc.yaml) and `datm zca`: the process around the step
datm/pipeline/zca.py."""

from __future__ import annotations

from dataclasses import asdict

from datm.pipeline.zca import fit_zca
from stages import common


def run(params: str = "params.yaml", root: str = ".") -> dict:
    p, pa = common.load(params), common.paths(root)
    with common.tracker("zca", p, root) as tracker:
        tracker.params(asdict(p.zca), "zca.")
        with common.console.status("fitting ZCA"):
            summary = fit_zca(p, pa)
    state = f"eps {p.zca.eps}" if summary["enabled"] else "disabled (identity)"
    common.console.print(f"[green]zca:[/] {state} -> {pa.zca}")
    return summary


if __name__ == "__main__":
    args = common.parse(__doc__)
    common.main(lambda: run(args.params, args.root))
