"""Step decompose@<ipc>: where an IPC's gain over random real images comes from, its images
or its labels (the decomposition DD-Ranking argues for; docs/METHOD.md, "Where the gain comes
from")."""

from __future__ import annotations

import json

import torch

from .. import evaluate
from ..config import Params, Paths
from ..distributed import SINGLE, Group
from ..errors import UserError
from ..events import Callback
from ..experts import ExpertBuffer
from ..initialization import expert_soft_labels
from .evaluate import check_finite, random_real, runs, stored_baseline
from .project import (
    device_of,
    environment,
    load_distilled,
    model_data,
    quiet,
    set_digest,
    write_json,
)


def decompose_ipc(params: Params, paths: Paths, ipc: int, callback: Callback = quiet,
                  group: Group = SINGLE) -> dict:
    """Where an IPC's gain over random real images comes from: its images or its labels.

    Four sets under the IPC's recipe (docs/METHOD.md, "Where the gain comes from"): the
    distilled images with their learned labels (evaluate@<ipc>'s number) and with hard
    labels, at the distilled set's lr and seeds; a random real subset (baseline@<ipc>'s draw)
    with the experts' soft labels (DATM's label rule) and with hard labels (baseline@<ipc>'s
    number), at the baseline's lr and seeds. Only the labels differ within each pair. The two
    sets trained here -> metrics/decompose/ipc_<ipc>.json, with the other two copied from the
    files they come from.
    """
    cfg = params.evaluation(ipc)
    md = model_data(paths, device_of(params, group))
    tensors, _ = load_distilled(paths.distilled(ipc))
    check_finite(paths.distilled(ipc), images=tensors["images"], labels=tensors["labels"],
                 lr=tensors["lr"])
    try:
        ev = json.loads(paths.evaluation(ipc).read_text())
        measured = [r.get("set_digest") for r in ev["runs"] if r["set"] == "distilled"]
    except (OSError, ValueError, KeyError, TypeError):
        measured = []
    if set(measured) != {set_digest(tensors)}:
        raise UserError(f"{paths.evaluation(ipc)} is not of this distilled set: run "
                        f"evaluate@{ipc} first (`datm evaluate --ipc {ipc}`)")
    base = stored_baseline(params, paths, md, ipc) or random_real(params, md, ipc, callback,
                                                                    group=group)
    spec = evaluate.arch_spec(md.spec(params), cfg.arch)
    k = len(md.classes)
    hard = torch.arange(k, device=md.x.device).repeat_interleave(ipc)
    lr = evaluate.distilled_lr(cfg, float(tensors["lr"][0]))
    callback({"event": "set", "name": "distilled images, hard labels", "models": cfg.models})
    d_hard = evaluate.evaluate_set(spec, tensors["images"].to(md.x.device), hard, lr, cfg.epochs,
                                   cfg.models, cfg, params.augment, md.x_test, md.y_test,
                                   cfg.seed, callback, group=group)
    idx = evaluate.random_subset(md.y, ipc, k, cfg.seed + ipc)  # baseline@<ipc>'s own draw
    soft = expert_soft_labels(params.distill(ipc), ExpertBuffer.open(paths.buffers), md.x[idx],
                              md.y[idx], group)
    callback({"event": "set", "name": "random real images, expert soft labels",
              "models": cfg.models})
    r_soft = evaluate.evaluate_set(spec, md.x[idx], soft, cfg.random_lr, cfg.epochs, cfg.models,
                                   cfg, params.augment, md.x_test, md.y_test, cfg.seed + 1,
                                   callback, group=group)
    summary = {"ipc": ipc,
               "distilled_soft": ev["distilled"], "distilled_soft_std": ev["distilled_std"],
               "distilled_hard": d_hard["mean"], "distilled_hard_std": d_hard["std"],
               "random_soft": r_soft["mean"], "random_soft_std": r_soft["std"],
               "random_hard": base["random_real"], "random_hard_std": base["random_real_std"],
               # with hard labels, what the distilled images add over random ones; with random
               # images, what the experts' soft labels add over hard ones
               "images_gain": d_hard["mean"] - base["random_real"],
               "labels_gain": r_soft["mean"] - base["random_real"],
               "env": environment(md.x.device),
               "runs": runs("distilled images, hard labels", d_hard, lr, cfg.epochs, cfg)
               + runs("random real images, expert soft labels", r_soft, cfg.random_lr,
                      cfg.epochs, cfg)}
    if group.is_main:
        write_json(paths.decompose(ipc), summary)
    return {**summary, "seconds": sum(d_hard["seconds"]) + sum(r_soft["seconds"])}
