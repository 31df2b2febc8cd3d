"""`python -m stages.buffers` (dvc.yaml) and `datm buffers`: the process around the step
datm/pipeline/buffers.py, with a progress bar per expert and its MLflow run.

A killed run resumes at the next unfinished expert. With `launch.buffers` W > 1 the experts are
dealt out to W processes (the same files as one).
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from datm.distributed import SINGLE, Group
from datm.pipeline.buffers import train_experts
from datm.pipeline.project import write_json
from stages import common, launch


def run(params: str = "params.yaml", root: str = ".", group: Group = SINGLE) -> dict:
    p, pa = common.load(params), common.paths(root)
    cfg = p.buffers
    with common.tracker("buffers", p, root, group=group) as tracker, \
            common.progress_bar() as bar:
        tracker.params({"buffers": asdict(cfg), "net": asdict(p.net),
                        "augment": asdict(p.augment), "zca": asdict(p.zca), "data": p.data.name})
        task = bar.add_task("experts", total=None, info="")
        batch: list[int] = []
        mine: set[int] = set()  # the experts this process trained

        def on_event(e: dict) -> None:
            nonlocal batch
            if e["event"] == "start":
                bar.update(task, total=e["total"], completed=e["done"])
            elif e["event"] == "group":
                batch = e["experts"]
                bar.update(task, info=f"training {batch[0]}..{batch[-1]}")
            elif e["event"] == "step":
                bar.update(task, info=f"expert {batch[0]} epoch {e['epoch'] + 1}/{cfg.epochs} "
                                      f"step {e['step']}/{e['steps']}")
            elif e["event"] == "epoch":
                for j, k in enumerate(batch):
                    tracker.metrics({f"expert_{k:03d}.train_acc": e["train_acc"][j],
                                     f"expert_{k:03d}.test_acc": e["test_acc"][j]}, e["epoch"])
            elif e["event"] == "expert":
                mine.add(e["index"])
                bar.advance(task)
                bar.console.print(f"expert {e['index']}: test acc "
                                  f"{e['meta']['test_acc'][-1]:.4f} in {e['seconds']:.0f}s")

        summary, timing = train_experts(p, pa, on_event, group=group)
        bar.update(task, completed=len(summary["runs"]))  # the other processes' experts too
        for row in summary["runs"]:  # their curves, from their files (rank 0 alone logs)
            k = row["expert"]
            if group.distributed and k in timing and k not in mine and tracker.active:
                for epoch, (train, test) in enumerate(zip(row["train_acc"], row["test_acc"])):
                    tracker.metrics({f"expert_{k:03d}.train_acc": train,
                                     f"expert_{k:03d}.test_acc": test}, epoch + 1)
        # wall times: the console and MLflow only, never metrics/buffers.json (DVC tracks it)
        tracker.metrics({"full_dataset": summary["full_dataset"],
                         "full_dataset_std": summary["full_dataset_std"],
                         **{f"expert_{k:03d}.{key}": v for k, t in timing.items()
                            for key, v in t.items()}}, 0)
        tracker.pipeline_metrics({"acc.full_dataset": summary["full_dataset"]})
    if group.is_main:
        write_json(pa.metrics / "buffers.json", summary)
    runs = summary["runs"]
    seconds = sum(t["seconds"] for t in timing.values())
    images = sum(t["images_per_second"] * t["seconds"] for t in timing.values())
    speed = (f", {images / seconds:.0f} images/s over the {len(timing)} trained now" if timing
             else ", all found finished")
    common.console.print(f"[green]buffers:[/] {len(runs)} experts of {cfg.epochs} epochs, final "
                         f"test acc {summary['full_dataset']:.4f} ± {summary['full_dataset_std']:.4f}"
                         f" (min {min(r['acc'] for r in runs):.4f}), the full-set reference{speed}")
    return summary


def start(params: str = "params.yaml", root: str = ".") -> int:
    """The stage as `launch.buffers` (or DATM_RANKS) processes, at most one per expert batch
    (stages/launch.py); its exit code."""
    return launch.start("buffers", "stages.buffers", ["--params", params, "--root", root],
                        lambda group: run(params, root, group), params,
                        most=lambda p: -(-p.buffers.num_experts // p.buffers.group))


if __name__ == "__main__":
    args = common.parse(__doc__)
    sys.exit(start(args.params, args.root))
