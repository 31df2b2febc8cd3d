"""`datm export` and `datm evaluate --from`: shells around datm.steps.export (not DVC stages)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from datm.steps.export import evaluate_export, export_ipc
from datm.tracking import Tracker, git_commit
from stages import common
from stages.evaluate import progress_events


def export(ipc: int, fmt: str, out: str | Path, force: bool = False, root: str = ".",
           params: str = "params.yaml") -> Path:
    """`datm export`: the card's recipe is the evaluation that `params` sets."""
    path = export_ipc(common.load(params), common.paths(root), ipc, fmt, Path(out), force,
                      git_commit(root))
    common.console.print(f"[green]exported[/] IPC {ipc} as {fmt} -> {path}")
    return path


def evaluate_folder(folder, params: str = "params.yaml", root: str = ".") -> dict:
    """`datm evaluate --from DIR`: the same protocol on an exported set."""
    p, pa = common.load(params), common.paths(root)
    with Tracker("evaluate", root, run_name=f"evaluate-from:{Path(folder).name}") as tracker, \
            common.progress_bar() as bar:
        tracker.params({"evaluate": asdict(p.evaluate), "from": str(folder)})
        # the total comes with the first epoch: the recipe is the card's IPC's (evaluate.ipc)
        task = bar.add_task(f"evaluate {folder}", total=None, info="")
        summary = evaluate_export(p, pa, Path(folder),
                                  progress_events(tracker, bar, task, "exported"))
        tracker.params({"recipe_epochs": summary["epochs"], "recipe_lr": summary["lr"]})
        tracker.metrics({"acc_mean": summary["acc_mean"], "acc_std": summary["acc_std"]}, 0)
    common.console.print(f"[green]evaluate {folder}:[/] {summary['acc_mean']:.4f} ± "
                         f"{summary['acc_std']:.4f} over {summary['models']} models")
    return summary
