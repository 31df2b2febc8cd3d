"""Matching windows chosen from the experts (`window: auto`), by DATM's principle.

DATM matches early, easy trajectory segments for small sets and late, hard ones for large sets,
with windows hand-tuned per dataset and IPC. `window: auto` computes one from what the experts
recorded and the IPC's share of the training set (docs/METHOD.md, "Windows from the experts"):

- progress p(e) of the experts at epoch e: how much of the training error they have removed,
  on a log scale, ln(err_0 / err(e)) / ln(err_0 / err(E)), with err(e) = 1 - their mean training
  accuracy in epoch e and err_0 = 1 - 1/K (chance); 0 at the start, 1 at the end;
- target t(s) for the share s = IPC x K / training images: t rises with log10(s), from
  T_LOW at s = S_LOW to T_HIGH;
- T+ = the first epoch at which p reaches t (at least 1); for a large set (s >= LATE_SHARE) the
  window starts where p reaches t - LATE_SPAN (T-), else at 0. M (expert_epochs) stays the
  IPC's own, and T+ is capped so that epoch T+ - 1 + M exists.
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
    """`cfg` with T-, T+ (no sequential generation) chosen from the experts' mean training
    accuracy per epoch, `train_acc` (E values); it keeps `window: auto`, which the result's
    settings then show beside the window chosen."""
    epochs = len(train_acc)
    p = progress(train_acc, num_classes)
    share = cfg.ipc * num_classes / train_images
    goal = target(share)
    t_max = next((e for e in range(1, epochs + 1) if p[e] >= goal), epochs)
    t_max = max(1, min(t_max, epochs + 1 - cfg.expert_epochs))
    t_min = 0
    if share >= LATE_SHARE:
        t_min = next(e for e in range(epochs + 1) if p[e] >= goal - LATE_SPAN)
        t_min = min(t_min, t_max - 1)
    return replace(cfg, min_start_epoch=t_min, max_start_epoch=t_max, sg_start=None, sg_end=0)


def mean_curve(metas: list[dict]) -> list[float]:
    """The experts' mean training accuracy per epoch, over the epochs all of them have."""
    epochs = min(len(m["train_acc"]) for m in metas)
    return [sum(m["train_acc"][e] for m in metas) / len(metas) for e in range(epochs)]
