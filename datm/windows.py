"""Matching windows chosen from the experts (`window: auto`), by DATM's principle.

DATM matches early, easy trajectory segments for small sets and late, hard ones for large sets,
with windows hand-tuned per dataset and IPC. `window: auto` computes one from what the experts
recorded and the IPC's share of the training set (docs/METHOD.md, "Windows from the experts"):

- progress p(e) of the experts at epoch e: how much of the training error they have removed,
  on a log scale, ln(err_0 / err(e)) / ln(err_0 / err(E)), with err(e) = 1 - their mean training
  accuracy in epoch e and err_0 = 1 - 1/K (chance); 0 at the start, 1 at the end;
- target t(s) for the share s = IPC x K / training images: t rises with log10(s), from
  T_LOW at s = S_LOW to T_HIGH;
- T+ = the first snapshot at which p reaches t (at least 1); for a large set (s >= LATE_SHARE)
  the window starts where p reaches t - LATE_SPAN (T-), else at 0 with sequential generation
  (`sequential`): U grows from ceil(T+ / 2) to T+. M (expert_epochs) stays the IPC's own, and
  T+ is capped so that snapshot T+ - 1 + M exists before the experts' decay tail.

"Epoch" here is a snapshot of the trajectory: an epoch, or `buffers.save_every` SGD steps.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .config import DistillConfig

T_LOW, T_HIGH = 0.65, 0.95      # progress targets at the smallest and largest shares
S_LOW = 1e-4                    # share (IPC x K / N) where the target is T_LOW
SLOPE = 0.15                    # target per decade of share
LATE_SHARE = 0.05               # from this share on, the window starts late
LATE_SPAN = 0.12                # a late window spans this much progress below its target


def progress(train_acc: list[float], num_classes: int) -> list[float]:
    """p(0) .. p(E): the share of the (log) training error removed by each epoch's end."""
    chance_err = 1 - 1 / num_classes
    errs = [max(1 - a, 1e-6) for a in train_acc]
    total = math.log(chance_err / errs[-1])
    if total <= 0:  # experts that never beat chance: no shape to follow
        return [e / len(errs) for e in range(len(errs) + 1)]
    out, best = [0.0], 0.0
    for err in errs:
        best = max(best, min(1.0, math.log(chance_err / err) / total))
        out.append(best)  # a noisy dip does not move the window back
    return out


def target(share: float) -> float:
    """The progress a window of this share of the training set reaches (its T+)."""
    return min(T_HIGH, max(T_LOW, T_LOW + SLOPE * math.log10(max(share, 1e-12) / S_LOW)))


def auto_window(cfg: DistillConfig, train_acc: list[float], num_classes: int,
                train_images: int) -> DistillConfig:
    """`cfg` with T-, T, T+ and sg_end chosen from the experts' mean training accuracy per
    snapshot segment of the part a matching reads, `train_acc` (E values); it keeps `window:
    auto`, which the result's settings then show beside the window chosen."""
    epochs = len(train_acc)
    p = progress(train_acc, num_classes)
    share = cfg.ipc * num_classes / train_images
    goal = target(share)
    t_max = next((e for e in range(1, epochs + 1) if p[e] >= goal), epochs)
    t_max = max(1, min(t_max, epochs + 1 - cfg.expert_epochs))
    t_min, sg_start, sg_end = 0, None, 0
    if share >= LATE_SHARE:
        t_min = next(e for e in range(epochs + 1) if p[e] >= goal - LATE_SPAN)
        t_min = min(t_min, t_max - 1)
    elif cfg.sequential and t_max >= 2:
        # Sequential generation (DATM, small sets): U grows from half the window to all of it,
        # over the IPC's sg_end or the first half of its run.
        sg_start = (t_max + 1) // 2
        sg_end = cfg.sg_end or max(1, cfg.iterations // 2)
    return replace(cfg, min_start_epoch=t_min, max_start_epoch=t_max, sg_start=sg_start,
                   sg_end=sg_end)


def mean_curve(metas: list[dict]) -> list[float]:
    """The experts' mean training accuracy per snapshot segment, over the segments a matching
    may read (before a decay tail) that all of them have."""
    epochs = min(min(len(m["train_acc"]), m.get("matchable", len(m["train_acc"]))) for m in metas)
    return [sum(m["train_acc"][e] for m in metas) / len(metas) for e in range(epochs)]
