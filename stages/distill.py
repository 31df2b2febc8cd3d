"""Stage distill@<ipc>: DATM for one IPC -> artifacts/distilled/ipc_<ipc>.safetensors.

Checkpoints go to checkpoints/; running the same command again after a kill resumes there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from datm import artifacts, locks
from datm.config import Paths
from datm.steps.distill import distill
from datm.tracking import Tracker
from datm.visual import class_grid, save_png
from stages import common


def _log_grid(tracker: Tracker, holder: dict, name: str, folder: str | None = None) -> None:
    """The current images as a grid. The first and the last have the same names in every run
    (grid_init.png, grid_final.png): MLflow's compare view shows artifacts runs share."""
    if not tracker.active:
        return
    state = holder["state"]
    grid = class_grid(holder["pixels"](state.images), state.labels.shape[1])
    with tempfile.TemporaryDirectory() as tmp:
        tracker.artifact(save_png(grid, Path(tmp) / name), folder)


def ipc_lock(pa: Paths, ipc: int):
    """One process at a time distills an IPC: its checkpoint and result have a single writer."""
    return locks.hold(pa.checkpoint(ipc).with_suffix(".lock"), f"IPC {ipc} is being distilled")


def run(ipc: int, params: str = "params.yaml", root: str = ".", fresh: bool = False) -> dict:
    p, pa = common.load(params), common.paths(root)
    cfg = p.distill(ipc)
    # The lock first: a refused run leaves no trace, not even an MLflow run.
    with ipc_lock(pa, ipc), common.tracker("distill", p, root, f"distill@{ipc}") as tracker, \
            common.progress_bar() as bar:
        # Under the lock nobody else writes these: a temp file beside them is a killed run's.
        artifacts.remove_stale_temps(pa.distilled(ipc))
        artifacts.remove_stale_temps(pa.checkpoint(ipc))
        tracker.params(common.settings(p, ipc))
        tracker.tags({"ipc": str(ipc)})
        task = bar.add_task(f"distill ipc {ipc}", total=cfg.iterations, info="")
        holder: dict = {}

        def on_event(e: dict) -> None:
            if e["event"] == "start":
                holder.update(state=e["initial"], pixels=e["pixels"])
                bar.update(task, completed=e["iteration"])
                if e["resumed"]:
                    bar.console.print(f"resuming ipc {ipc} at iteration {e['iteration']}")
                else:
                    _log_grid(tracker, holder, "grid_init.png")
            elif e["event"] == "done":
                _log_grid(tracker, holder, "grid_final.png")
            else:
                it = e["iteration"]
                bar.update(task, completed=it,
                           info=f"loss {e['loss']:.4f} U {e['upper_bound']} lr {e['lr']:.5f} "
                                f"skipped {e['skipped']}")
                tracker.metrics({"loss": e["loss"], "start_epoch": e["start_epoch"],
                                 "upper_bound": e["upper_bound"], "lr": e["lr"],
                                 "skipped": e["skipped"]}, it)
                if it % cfg.grid_every == 0:
                    _log_grid(tracker, holder, f"grid_{it:06d}.png", "grids")

        summary = distill(p, pa, ipc, on_event, fresh=fresh)
        tracker.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))},
                        summary["iterations"])
        tracker.pipeline_metrics({f"matching_loss.ipc{ipc}": summary["final_loss"]})
    done = summary["iterations"] - summary["resumed_at"]
    resumed = f" (resumed at {summary['resumed_at']})" if summary["resumed_at"] else ""
    common.console.print(f"[green]distill ipc {ipc}:[/] {summary['iterations']} iterations{resumed}, "
                         f"{done} in {summary['seconds']:.0f}s, final loss {summary['final_loss']:.4f}, "
                         f"lr {summary['learned_lr']:.5f}, skipped {summary['skipped']}")
    return summary


if __name__ == "__main__":
    args = common.parse(__doc__, lambda a: (a.add_argument("--ipc", type=int, required=True),
                                            a.add_argument("--fresh", action="store_true")))
    common.main(lambda: run(args.ipc, args.params, args.root, args.fresh))
