"""Stages fullset and evaluate@<ipc>: accuracy of fresh networks trained on each set.

`python -m stages.evaluate --fullset` trains on the whole real set (cached: distill settings do
not touch it); `--ipc N` evaluates the distilled set and a random real subset of the same size.
"""

from __future__ import annotations

from dataclasses import asdict

from datm.steps.evaluate import evaluate_ipc, fullset
from datm.tracking import Tracker
from stages import common


def progress_events(tracker: Tracker, bar, task, prefix: str):
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
        summary = fullset(p, pa, progress_events(tracker, bar, task, "full dataset"))
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
        summary = evaluate_ipc(p, pa, ipc, progress_events(tracker, bar, task, ""))
        tracker.metrics({k: v for k, v in summary.items()
                         if isinstance(v, (int, float)) and v is not None}, 0)
    full = summary["full_dataset"]
    common.console.print(
        f"[green]evaluate ipc {ipc}:[/] distilled {summary['distilled']:.4f} ± "
        f"{summary['distilled_std']:.4f}, random real {summary['random_real']:.4f} ± "
        f"{summary['random_real_std']:.4f}" + (f", full set {full:.4f}" if full else ""))
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
