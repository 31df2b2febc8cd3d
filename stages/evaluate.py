"""Stages fullset and evaluate@<ipc>: accuracy of fresh networks trained on each set.

`python -m stages.evaluate --fullset` trains on the whole real set (cached: distill settings do
not touch it); `--ipc N` evaluates the distilled set and a random real subset of the same size.
"""

from __future__ import annotations

from dataclasses import asdict

from datm import pipeline
from datm.tracking import Tracker
from stages import common


def _progress_events(tracker: Tracker, bar, task, prefix: str):
    state = {"set": prefix, "model": 0}

    def on_event(e: dict) -> None:
        if e["event"] == "set":
            state["set"] = e["name"]
        elif e["event"] == "epoch":
            bar.update(task, completed=e["epoch"], total=e["epochs"],
                       info=f"{state['set']} model {state['model'] + 1}")
        elif e["event"] == "model":
            state["model"] = e["model"] % e["models"]
            key = state["set"].replace(" ", "_")
            tracker.metrics({f"{key}.acc": e["acc"]}, e["model"])
            bar.console.print(f"{state['set']} model {e['model']}/{e['models']}: "
                              f"test acc {e['acc']:.4f}")
    return on_event


def run_fullset(params: str = "params.yaml", root: str = ".") -> dict:
    p, pa = common.load(params), common.paths(root)
    with Tracker("fullset", root) as tracker, common.progress_bar() as bar:
        tracker.params({"evaluate": asdict(p.evaluate), "net": asdict(p.net)})
        task = bar.add_task("full dataset", total=p.evaluate.fullset_epochs, info="")
        summary = pipeline.fullset(p, pa, _progress_events(tracker, bar, task, "full dataset"))
        tracker.metrics({"full_dataset": summary["full_dataset"], "seconds": summary["seconds"]}, 0)
    common.console.print(f"[green]fullset:[/] {summary['full_dataset']:.4f} test accuracy "
                         f"({p.evaluate.fullset_epochs} epochs, {summary['seconds']:.0f}s)")
    return summary


def run(ipc: int, params: str = "params.yaml", root: str = ".") -> dict:
    p, pa = common.load(params), common.paths(root)
    with Tracker("evaluate", root, run_name=f"evaluate@{ipc}") as tracker, \
            common.progress_bar() as bar:
        tracker.params({"evaluate": asdict(p.evaluate), "ipc": ipc})
        tracker.tags({"ipc": str(ipc)})
        task = bar.add_task(f"evaluate ipc {ipc}", total=p.evaluate.epochs, info="")
        summary = pipeline.evaluate_ipc(p, pa, ipc, _progress_events(tracker, bar, task, ""))
        tracker.metrics({k: v for k, v in summary.items()
                         if isinstance(v, (int, float)) and v is not None}, 0)
    full = summary["full_dataset"]
    common.console.print(
        f"[green]evaluate ipc {ipc}:[/] distilled {summary['distilled']:.4f} ± "
        f"{summary['distilled_std']:.4f}, random real {summary['random_real']:.4f} ± "
        f"{summary['random_real_std']:.4f}" + (f", full set {full:.4f}" if full else ""))
    return summary


def run_export(folder, params: str = "params.yaml", root: str = ".") -> dict:
    """`datm evaluate --from DIR`: the same protocol on an exported set."""
    from pathlib import Path

    p, pa = common.load(params), common.paths(root)
    with Tracker("evaluate", root, run_name=f"evaluate-from:{Path(folder).name}") as tracker, \
            common.progress_bar() as bar:
        tracker.params({"evaluate": asdict(p.evaluate), "from": str(folder)})
        task = bar.add_task(f"evaluate {folder}", total=p.evaluate.epochs, info="")
        summary = pipeline.evaluate_export(p, pa, Path(folder),
                                           _progress_events(tracker, bar, task, "exported"))
        tracker.metrics({"acc_mean": summary["acc_mean"], "acc_std": summary["acc_std"]}, 0)
    common.console.print(f"[green]evaluate {folder}:[/] {summary['acc_mean']:.4f} ± "
                         f"{summary['acc_std']:.4f} over {summary['models']} models")
    return summary


if __name__ == "__main__":
    args = common.parse(__doc__, lambda a: (a.add_argument("--ipc", type=int),
                                            a.add_argument("--fullset", action="store_true")))
    if args.fullset:
        common.main(lambda: run_fullset(args.params, args.root))
    elif args.ipc is None:
        common.console.print("[bold red]error:[/] pass --ipc N or --fullset")
        raise SystemExit(2)
    else:
        common.main(lambda: run(args.ipc, args.params, args.root))
