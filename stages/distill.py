"""`python -m stages.distill --ipc N` (dvc.yaml) and `datm distill`: the process around the
step datm/pipeline/distill.py, with its progress bar, image grids and MLflow run.

Checkpoints go to checkpoints/; running the same command again after a kill resumes there.
With `launch.distill` W > 1 every mini-batch is split among W processes (mode recompute).
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

from datm import artifacts, locks
from datm.config import Params, Paths
from datm.distributed import SINGLE, Group
from datm.pipeline.distill import distill_ipc
from datm.tracking import Tracker
from datm.visual import class_grid, save_png
from stages import common, launch


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


def run(ipc: int, params: str = "params.yaml", root: str = ".", fresh: bool = False,
        group: Group = SINGLE) -> dict:
    p, pa = common.load(params), common.paths(root)
    cfg = p.distill(ipc)
    # The lock first: a refused run leaves no trace, not even an MLflow run. Rank 0 alone
    # writes the checkpoint and the result, so it alone holds the lock.
    lock = ipc_lock(pa, ipc) if group.is_main else nullcontext()
    with lock, common.tracker("distill", p, root, f"distill@{ipc}", group) as tracker, \
            common.progress_bar() as bar:
        # Under the lock nobody else writes these: a temp file beside them is a killed run's.
        if group.is_main:
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
                if cfg.window == "auto":
                    t_min, _, t_max = e["window"]
                    bar.console.print(f"ipc {ipc}: window auto -> start epochs [{t_min}, "
                                      f"{t_max}) of the experts, M {cfg.expert_epochs}")
                    tracker.params({"window.min_start_epoch": t_min,
                                    "window.max_start_epoch": t_max})
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

        summary = distill_ipc(p, pa, ipc, on_event, fresh=fresh, group=group)
        tracker.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))},
                        summary["iterations"])
        tracker.pipeline_metrics({f"matching_loss.ipc{ipc}": summary["final_loss"]})
    done = summary["iterations"] - summary["resumed_at"]
    resumed = f" (resumed at {summary['resumed_at']})" if summary["resumed_at"] else ""
    common.console.print(f"[green]distill ipc {ipc}:[/] {summary['iterations']} iterations{resumed}, "
                         f"{done} in {summary['seconds']:.0f}s, final loss {summary['final_loss']:.4f}, "
                         f"lr {summary['learned_lr']:.5f}, skipped {summary['skipped']}")
    return summary


def splits(p: Params, ipc: int) -> int:
    """How many processes can share this IPC's distillation: one in mode unroll or with batch
    norm (it couples a mini-batch), else any number (every unrolled step's batch is split)."""
    cfg = p.distill(ipc)  # also a clear error for an IPC that is not configured
    return 1 if cfg.mode != "recompute" or p.net.norm == "batch" else sys.maxsize


def start(ipc: int, params: str = "params.yaml", root: str = ".", fresh: bool = False) -> int:
    """The stage as `launch.distill` (or DATM_RANKS) processes (stages/launch.py); its exit
    code."""
    args = ["--ipc", str(ipc), "--params", params, "--root", root] + (["--fresh"] if fresh else [])
    return launch.start("distill", "stages.distill", args,
                        lambda group: run(ipc, params, root, fresh, group), params,
                        most=lambda p: splits(p, ipc))


if __name__ == "__main__":
    args = common.parse(__doc__, lambda a: (a.add_argument("--ipc", type=int, required=True),
                                            a.add_argument("--fresh", action="store_true")))
    sys.exit(start(args.ipc, args.params, args.root, args.fresh))
