"""`python -m stages.evaluate --baseline N | --ipc N | --crossarch N` (dvc.yaml) and `datm
evaluate` / `datm baseline` / `datm crossarch`: the processes around the steps of
datm/pipeline/evaluate.py, with their progress and MLflow runs.

With `launch.<stage>` W > 1 the models are dealt out to W processes (model k on process k % W;
the same accuracies as one).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from datm.config import Params
from datm.distributed import SINGLE, Group
from datm.pipeline.evaluate import baseline_ipc, crossarch_ipc, evaluate_ipc
from datm.tracking import Tracker
from stages import common, launch


def progress_events(tracker: Tracker, bar, task, prefix: str):
    state = {"set": prefix, "model": 0}
    trained: set[str] = set()  # the sets this process trained models of

    def on_event(e: dict) -> None:
        if e["event"] == "set":
            state["set"] = e["name"]
        elif e["event"] == "epoch":
            bar.update(task, completed=e["epoch"], total=e["epochs"],
                       info=f"{state['set']} model {state['model'] + 1}")
        elif e["event"] == "model":
            state["model"] = e["model"] % e["models"]
            trained.add(state["set"])
            tracker.metrics({f"{metric_key(state['set'])}.acc": e["acc"]}, e["model"])
            bar.console.print(f"{state['set']} model {e['model']}/{e['models']}: "
                              f"test acc {e['acc']:.4f}")
    on_event.trained = trained  # type: ignore[attr-defined]
    return on_event


def metric_key(set_name: str) -> str:
    """A set's name as an MLflow metric name, which allows no commas ("distilled images, hard
    labels" -> "distilled_images_hard_labels")."""
    return re.sub(r"[^0-9A-Za-z]+", "_", set_name).strip("_")


def log_other_ranks(tracker: Tracker, on_event, runs: list[dict], group: Group,
                    per_arch: bool = False) -> None:
    """The accuracy of each model another rank trained (model k on rank k % W), logged as
    rank 0's `on_event` logs its own, for the sets this run trained (not a stored baseline)."""
    if not group.distributed:
        return
    for row in runs:
        name = f"{row['set']} on {row['arch']}" if per_arch else row["set"]
        if row["model"] % group.world and name in on_event.trained:
            tracker.metrics({f"{metric_key(name)}.acc": row["acc"]}, row["model"] + 1)


@contextmanager
def ipc_stage(stage: str, p: Params, root: str, ipc: int, group: Group, label: str,
               prefix: str) -> Iterator[tuple[Tracker, object]]:
    """The MLflow run and progress bar of `<stage>@<ipc>`: (tracker, the event callback)."""
    with common.tracker(stage, p, root, f"{stage}@{ipc}", group) as tracker, \
            common.progress_bar() as bar:
        tracker.params({**common.settings(p, ipc), "ipc": ipc})
        tracker.tags({"ipc": str(ipc)})
        task = bar.add_task(label, total=p.evaluation(ipc).epochs, info="")
        yield tracker, progress_events(tracker, bar, task, prefix)


def measure(stage: str, ipc: int, params: str, root: str, group: Group, label: str,
            prefix: str, compute: Callable[..., dict],
            metrics: Callable[[dict], tuple[dict, dict]]) -> dict:
    """The body of a per-IPC evaluation stage: `compute(params, paths, ipc, on_event,
    group=...)` under the stage's MLflow run and progress bar, then every model's accuracy and
    `metrics(summary)` (the run's metrics, the pipeline run's metrics) logged; the summary."""
    p, pa = common.load(params), common.paths(root)
    with ipc_stage(stage, p, root, ipc, group, label, prefix) as (tracker, events):
        summary = compute(p, pa, ipc, events, group=group)
        log_other_ranks(tracker, events, summary["runs"], group)
        own, pipeline = metrics(summary)
        tracker.metrics(own, 0)
        tracker.pipeline_metrics(pipeline)
    return summary


def run_baseline(ipc: int, params: str = "params.yaml", root: str = ".",
                 group: Group = SINGLE) -> dict:
    summary = measure("baseline", ipc, params, root, group, f"random real ipc {ipc}",
                      "random real", baseline_ipc, lambda s: (
                          {"random_real": s["random_real"],
                           "random_real_std": s["random_real_std"]},
                          {f"acc.random_real.ipc{ipc}": s["random_real"]}))
    common.console.print(f"[green]baseline ipc {ipc}:[/] random real {summary['random_real']:.4f}"
                         f" ± {summary['random_real_std']:.4f}")
    return summary


def run(ipc: int, params: str = "params.yaml", root: str = ".", group: Group = SINGLE) -> dict:
    summary = measure("evaluate", ipc, params, root, group, f"evaluate ipc {ipc}", "",
                      evaluate_ipc, lambda s: (
                          {k: v for k, v in s.items() if isinstance(v, (int, float))},
                          {f"acc.distilled.ipc{ipc}": s["distilled"],
                           f"acc.random_real.ipc{ipc}": s["random_real"],
                           "acc.full_dataset": s["full_dataset"],
                           f"matching_loss.ipc{ipc}": s["matching_loss"]}))
    full = summary["full_dataset"]
    common.console.print(
        f"[green]evaluate ipc {ipc}:[/] distilled {summary['distilled']:.4f} ± "
        f"{summary['distilled_std']:.4f}, random real {summary['random_real']:.4f} ± "
        f"{summary['random_real_std']:.4f}" + (f", full set {full:.4f}" if full else ""))
    return summary


def run_crossarch(ipc: int, params: str = "params.yaml", root: str = ".",
                  group: Group = SINGLE) -> dict:
    p, pa = common.load(params), common.paths(root)
    with ipc_stage("crossarch", p, root, ipc, group, f"cross-architecture ipc {ipc}",
                    "") as (tracker, events):
        summary = crossarch_ipc(p, pa, ipc, events, group=group)
        for row in summary["archs"]:
            log_other_ranks(tracker, events, row["runs"], group, per_arch=True)
        for row in summary["archs"]:
            tracker.metrics({f"{row['arch']}.distilled": row["distilled"],
                             f"{row['arch']}.random_real": row["random_real"]}, 0)
            tracker.pipeline_metrics({f"acc.{row['arch']}.distilled.ipc{ipc}": row["distilled"]})
    for row in summary["archs"]:
        common.console.print(f"[green]crossarch ipc {ipc} {row['arch']}:[/] distilled "
                             f"{row['distilled']:.4f} ± {row['distilled_std']:.4f}, random real "
                             f"{row['random_real']:.4f} ± {row['random_real_std']:.4f}")
    if not summary["archs"]:
        common.console.print(f"crossarch ipc {ipc}: evaluate.cross_archs is empty, nothing to do")
    return summary


STAGES = {"baseline": run_baseline, "evaluate": run, "crossarch": run_crossarch}


def models(stage: str, p: Params, ipc: int | None) -> int:
    """The models `stage` trains per set: the most processes it can keep busy."""
    cfg = p.evaluation(ipc)  # also a clear error for an IPC that is not configured
    return 1 if stage == "crossarch" and not cfg.cross_archs else cfg.models


def start(stage: str, ipc: int, params: str = "params.yaml", root: str = ".") -> int:
    """`stage` (baseline, evaluate or crossarch) as `launch.<stage>` (or DATM_RANKS)
    processes, at most one per model (stages/launch.py); its exit code."""
    flag = {"baseline": ["--baseline", str(ipc)],
            "evaluate": ["--ipc", str(ipc)], "crossarch": ["--crossarch", str(ipc)]}[stage]
    fn = STAGES[stage]

    return launch.start(stage, "stages.evaluate", [*flag, "--params", params, "--root", root],
                        lambda group: fn(ipc, params, root, group), params,
                        most=lambda p: models(stage, p, ipc))


if __name__ == "__main__":
    args = common.parse(__doc__, lambda a: (a.add_argument("--ipc", type=int),
                                            a.add_argument("--baseline", type=int, metavar="N"),
                                            a.add_argument("--crossarch", type=int, metavar="N")))
    if args.baseline is not None:
        sys.exit(start("baseline", args.baseline, args.params, args.root))
    elif args.crossarch is not None:
        sys.exit(start("crossarch", args.crossarch, args.params, args.root))
    elif args.ipc is None:
        common.console.print("[bold red]error:[/] pass --ipc N, --baseline N or --crossarch N")
        raise SystemExit(2)
    else:
        sys.exit(start("evaluate", args.ipc, args.params, args.root))
