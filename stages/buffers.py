"""Stage buffers: train the expert trajectories -> artifacts/buffers/expert_*.safetensors.

Finished experts are kept: a killed run resumes at the next unfinished expert.
"""

from __future__ import annotations

from dataclasses import asdict

from datm.steps.buffers import buffers
from datm.steps.project import write_json
from stages import common


def run(params: str = "params.yaml", root: str = ".") -> dict:
    p, pa = common.load(params), common.paths(root)
    cfg = p.buffers
    with common.tracker("buffers", p, root) as tracker, common.progress_bar() as bar:
        tracker.params({"buffers": asdict(cfg), "net": asdict(p.net),
                        "augment": asdict(p.augment), "zca": asdict(p.zca), "data": p.data.name})
        task = bar.add_task("experts", total=None, info="")
        group: list[int] = []

        def on_event(e: dict) -> None:
            nonlocal group
            if e["event"] == "start":
                bar.update(task, total=e["total"], completed=e["done"])
            elif e["event"] == "group":
                group = e["experts"]
                bar.update(task, info=f"training {group[0]}..{group[-1]}")
            elif e["event"] == "step":
                bar.update(task, info=f"expert {group[0]} epoch {e['epoch'] + 1}/{cfg.epochs} "
                                      f"step {e['step']}/{e['steps']}")
            elif e["event"] == "epoch":
                for j, k in enumerate(group):
                    tracker.metrics({f"expert_{k:03d}.train_acc": e["train_acc"][j],
                                     f"expert_{k:03d}.test_acc": e["test_acc"][j]}, e["epoch"])
            elif e["event"] == "expert":
                bar.advance(task)
                bar.console.print(f"expert {e['index']}: test acc "
                                  f"{e['meta']['test_acc'][-1]:.4f} in {e['seconds']:.0f}s")

        summary = buffers(p, pa, on_event)
        tracker.metrics({"expert_acc": summary["expert_acc"]}, 0)
        tracker.pipeline_metrics({"acc.experts": summary["expert_acc"]})
    write_json(pa.metrics / "buffers.json", summary)
    runs = summary["runs"]
    timed = [r for r in runs if r["seconds"]]
    images = sum(r["images_per_second"] * r["seconds"] for r in timed)
    speed = (f", {images / sum(r['seconds'] for r in timed):.0f} images/s over the {len(timed)} "
             "trained now" if timed else ", all found finished")
    common.console.print(f"[green]buffers:[/] {len(runs)} experts, final test acc "
                         f"{summary['expert_acc']:.4f} (min {min(r['acc'] for r in runs):.4f}){speed}")
    return summary


if __name__ == "__main__":
    args = common.parse(__doc__)
    common.main(lambda: run(args.params, args.root))
