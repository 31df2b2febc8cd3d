"""Step distill@<ipc>: DATM for one IPC -> artifacts/distilled/ipc_<ipc>.safetensors."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from .. import evaluate, experts
from ..config import DistillConfig, Params, Paths
from ..distill import Distiller, DistillError, Selection
from ..distributed import SINGLE, Group
from ..events import Callback
from ..provenance import code_digest
from ..windows import auto_window, mean_curve
from .project import device_of, model_data, quiet, settled

# Modules whose code decides a distillation's result: a checkpoint made by other code is not
# resumed (it would finish as a mix of two algorithms).
DISTILL_CODE = ("datm.distill", "datm.initialization", "datm.matching", "datm.networks",
                "datm.augment", "datm.precision", "datm.evaluate", "datm.experts", "datm.data",
                "datm.zca", "datm.windows", "datm.pipeline.distill")


def distill_ipc(params: Params, paths: Paths, ipc: int, callback: Callback = quiet,
            fresh: bool = False, group: Group = SINGLE) -> dict:
    """Distill one IPC, resuming from its checkpoint. On several ranks (`group`) every rank
    computes the same state (datm/distill.py); rank 0 alone writes checkpoints and the result."""
    cfg = params.distill(ipc)
    device = device_of(params, group)
    buffer = experts.ExpertBuffer.open(paths.buffers)
    md = model_data(paths, device)
    if buffer.spec.num_classes != len(md.classes):
        raise DistillError("experts and dataset disagree on the number of classes: rerun buffers")
    if cfg.window == "auto":
        cfg = auto_window(cfg, mean_curve(buffer.metas), len(md.classes), md.x.shape[0])
    # The experts' own curves stand for their contents: experts retrained on the same settings
    # by another torch or thread count differ, and a checkpoint made on the old ones must not
    # resume on the new.
    curves = [(m.get("train_acc"), m.get("test_acc")) for m in buffer.metas]
    inputs = [md.identity, buffer.metas[0]["hash"], len(buffer), curves, asdict(params.augment),
              code_digest(*DISTILL_CODE)]
    selection = None
    if cfg.select_every:
        # Validation images from the TRAINING split; the test split is never handed over.
        recipe = params.evaluation(ipc)  # the recipe evaluate@<ipc> will judge the set by
        val = evaluate.validation_subset(md.y, cfg.select_val_per_class, len(md.classes),
                                         recipe.seed)
        spec = evaluate.arch_spec(md.spec(params), recipe.arch)
        selection = Selection(spec, recipe, params.augment, md.x[val], md.y[val])
        inputs += [asdict(recipe), selection.spec.to_dict()]  # they change the choice
    identity = cfg.digest(json.dumps(inputs))
    state = None if fresh else Distiller.resume(paths.checkpoint(ipc), cfg, buffer,
                                                params.augment, identity, device, selection,
                                                group=group)
    resumed_at = state.iteration if state else 0
    if state is None:
        state = Distiller.create(cfg, buffer, md.x, md.y, params.augment, selection,
                                 group=group)
    callback({"event": "start", "iteration": state.iteration, "iterations": cfg.iterations,
              "resumed": resumed_at > 0, "initial": state, "pixels": md.pixels,
              "window": (cfg.min_start_epoch, cfg.sg_start, cfg.max_start_epoch)})
    tic = time.perf_counter()
    state.run(callback, paths.checkpoint(ipc), identity)
    seconds = time.perf_counter() - tic
    losses = [row[1] for row in state.history[-20:] if row[1] == row[1]]
    summary = {"ipc": ipc, "iterations": state.iteration, "skipped": state.skipped,
               "expert_steps_per_student_step": trajectories(cfg, buffer)[
                   "expert_steps_per_student_step"],
               "nonfinite": state.nonfinite, "final_loss": sum(losses) / max(len(losses), 1),
               "learned_lr": float(state.lr), "seconds": seconds, "resumed_at": resumed_at,
               "init_fallback_classes": len(state.init_report.get("fallback_classes", []))}
    if state.best is not None:
        summary.update(selected_iteration=state.best.iteration,
                       selected_val_acc=state.best.val_acc, selected_lr=float(state.best.lr))
    if group.is_main:
        state.save_result(paths.distilled(ipc), {
            "classes": md.classes, "mean": md.mean, "std": md.std, "zca": md.zca.enabled,
            "dataset": params.data.name, "summary": settled(summary),
            "trajectories": trajectories(cfg, buffer)})
    callback({"event": "done", "state": state, "summary": summary})
    return summary


def trajectories(cfg: DistillConfig, buffer: experts.ExpertBuffer) -> dict:
    """The trajectories a set was matched to: how the experts trained and were recorded, and
    how many of their SGD steps one student step covers (M x steps per snapshot / N)."""
    keep = ("num_experts", "epochs", "lr", "schedule", "decay_epochs", "batch", "save_every",
            "momentum", "weight_decay", "rho")
    config = buffer.metas[0]["config"]
    per_snapshot = buffer.steps_per_snapshot
    return {"experts": {k: config.get(k) for k in keep}, "snapshots": buffer.snapshots,
            "matchable": buffer.matchable, "steps_per_snapshot": per_snapshot,
            "window": {"T-": cfg.min_start_epoch, "T": cfg.sg_start, "T+": cfg.max_start_epoch,
                       "sg_end": cfg.sg_end, "M": cfg.expert_epochs, "N": cfg.syn_steps},
            "expert_steps_per_student_step": cfg.expert_epochs * per_snapshot / cfg.syn_steps}

