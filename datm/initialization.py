"""The set a distillation starts from: real images the experts judge (or noise) and their
label logits, the experts' soft labels (docs/METHOD.md, "Initialization and soft labels").

`initialize` is the start of every `Distiller` (datm/distill.py); decompose@<ipc> gives real
images the same soft labels (`expert_soft_labels`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache

import torch

from .config import DistillConfig
from .distributed import SINGLE, Group
from .errors import UserError
from .experts import ExpertBuffer
from .networks import FlatModel
from .precision import numerics

INIT_CHUNK = 1024     # real images judged per forward pass: bounds memory at IPC 1000 / 64 px


class InitError(UserError):
    """An initialization the data cannot give (fewer real images in a class than the IPC)."""


def label_epoch(cfg: DistillConfig, buffer: ExpertBuffer) -> int:
    """The experts' snapshot that judges initial images and gives soft labels (-1: the last)."""
    return buffer.snapshots if cfg.label_epoch < 0 else cfg.label_epoch


def _hard_logits(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    # Logits whose softmax puts 1 - 1e-4 on the true class: one-hot as far as CE can tell.
    margin = math.log(1e4 * (num_classes - 1)) if num_classes > 1 else 0.0
    return torch.nn.functional.one_hot(y, num_classes).float() * margin


@torch.no_grad()
def initialize(cfg: DistillConfig, buffer: ExpertBuffer, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator, chunk: int = INIT_CHUNK, group: Group = SINGLE
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Initial images [C*ipc, ...] (class-major), label logits [C*ipc, C] and a report of how.

    The experts judge and label at `label_epoch` (-1: their last epoch; docs/METHOD.md,
    "Initialization and soft labels").
    - real_correct: per class, scan its images in random order with one expert and keep the
      first ipc it classifies correctly; an expert that finds fewer in the whole class hands
      over to the next one (a seeded order, restarted for every class). Only when no expert
      finds ipc does the class fall back: the correct images of the expert that found most,
      then other images of the class; the report marks that class `fallback`.
    - real_hard: per class, the images that every expert classifies correctly with the
      highest mean loss (the hardest the experts get right); where fewer are right for all,
      images right for the most experts follow and the report marks the class `fallback`.
      datm's, not the reference's: difficulty-aligned, for large IPC (docs/METHOD.md).
    - real: random images of each class. Their soft labels are the logits of ONE expert
      (a seeded choice), as the reference's CIFAR-100 IPC 50 config (`pix_init: real`) does.
    - noise: Gaussian images with hard labels (nothing for experts to judge).
    Soft labels of real_correct and real_hard: per image, the mean logits of the experts that
    classify it correctly (`expert_logits`). `chunk` bounds how many images go through a
    network at once. The ranks of `group` share the experts' passes over the images (real_hard,
    soft labels) and get the same bits as one process.
    """
    num_classes = buffer.spec.num_classes
    if cfg.init == "noise":
        # Noise has no class content for experts to judge: its labels are the hard classes.
        images = torch.randn(num_classes * cfg.ipc, *x.shape[1:], generator=generator)
        class_ids = torch.arange(num_classes).repeat_interleave(cfg.ipc)
        return (images.to(x.device), _hard_logits(class_ids, num_classes).to(x.device),
                {"init": "noise"})
    per_class = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
    short = [(c, len(i)) for c, i in enumerate(per_class) if len(i) < cfg.ipc]
    if short:
        c, n = short[0]
        raise InitError(f"IPC {cfg.ipc} needs {cfg.ipc} real images per class, but class {c} "
                        f"has {n}: lower the IPC or use init: noise")
    epoch = label_epoch(cfg, buffer)
    fm = FlatModel(buffer.spec, x.device).train(True)
    theta = cache(lambda k: buffer.snapshots_of(k, [epoch])[0].to(x.device))  # read each once
    # Drawn whatever `labels` is, so hard and soft labels start from the same images.
    experts = torch.randperm(len(buffer), generator=generator).tolist()
    report: dict = {"init": cfg.init, "label_epoch": epoch}
    chosen, classes = [], []
    for c, idx in enumerate(per_class):
        order = idx[torch.randperm(len(idx), generator=generator).to(idx.device)]
        if cfg.init == "real":
            chosen.append(order[: cfg.ipc])
            continue
        if cfg.init == "real_hard":
            picked, record = _hardest_correct(fm, [theta(k) for k in range(len(buffer))], x, y,
                                              order, c, cfg.ipc, chunk, group)
        else:
            picked, record = _correct_images(fm, theta, experts, x, order, c, cfg.ipc, chunk)
        chosen.append(picked)
        classes.append(record)
    index = torch.cat(chosen)
    images = x[index].clone()
    if cfg.init == "real":
        report["expert"] = experts[0] if cfg.labels == "expert" else None
    else:
        report.update(expert_order=experts, classes=classes,
                      fallback_classes=[r["class"] for r in classes if r["fallback"]])
    if cfg.labels == "hard":
        return images, _hard_logits(y[index], num_classes).to(x.device), report
    if cfg.init == "real":
        return images, _logits(fm, theta(experts[0]), images, chunk), report
    thetas = [theta(k) for k in range(len(buffer))]
    return images, expert_logits(fm, thetas, images, y[index], chunk, group), report


def expert_soft_labels(cfg: DistillConfig, buffer: ExpertBuffer, x: torch.Tensor,
                       y: torch.Tensor, group: Group = SINGLE) -> torch.Tensor:
    """DATM's soft labels for any real images: per image, the mean logits of the experts (at
    `label_epoch`) that classify it correctly, as a real_correct initialization gets them."""
    epoch = label_epoch(cfg, buffer)
    fm = FlatModel(buffer.spec, x.device).train(True)
    thetas = [buffer.snapshots_of(k, [epoch])[0].to(x.device) for k in range(len(buffer))]
    with numerics("float32", x.device):
        return expert_logits(fm, thetas, x, y, group=group)


def _correct_images(fm: FlatModel, theta: Callable[[int], torch.Tensor], experts: list[int],
                    x: torch.Tensor, order: torch.Tensor, c: int, ipc: int,
                    chunk: int) -> tuple[torch.Tensor, dict]:
    """`ipc` images of class `c` (indices into x) that one expert classifies correctly.

    Scans `order` chunk by chunk and stops as soon as enough are found; tries `experts` in turn.
    """
    best, best_k, tried = order[:0], experts[0], []
    for k in experts:
        found, scanned = [], 0
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            found.append(part[_logits(fm, theta(k), x[part], chunk).argmax(1) == c])
            scanned += len(part)
            if sum(len(f) for f in found) >= ipc:
                break
        right = torch.cat(found)
        tried.append(k)
        if len(right) >= ipc:
            return right[:ipc], {"class": c, "expert": k, "tried": tried, "found": len(right),
                                 "scanned": scanned, "fallback": False}
        if len(right) > len(best):
            best, best_k = right, k
    # No expert finds ipc: the most any expert got right, then the rest in scan order.
    rest = order[~torch.isin(order, best)]
    picked = torch.cat([best, rest])[:ipc]
    return picked, {"class": c, "expert": best_k, "tried": tried, "found": len(best),
                    "scanned": len(order), "fallback": True}


def _hardest_correct(fm: FlatModel, thetas: list[torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor, order: torch.Tensor, c: int, ipc: int,
                     chunk: int, group: Group = SINGLE) -> tuple[torch.Tensor, dict]:
    """The `ipc` images of class `c` (indices into x) that every expert classifies correctly
    with the highest mean loss; where fewer are right for all, those right for the most experts
    follow. Ties keep the seeded `order`."""
    wrong, loss = expert_judgement(fm, thetas, x, y, order, chunk, group)
    by_loss = torch.sort(loss, descending=True, stable=True).indices
    ranked = by_loss[torch.sort(wrong[by_loss], stable=True).indices]
    all_right = int((wrong == 0).sum())
    return order[ranked[:ipc]], {"class": c, "all_right": all_right, "fallback": all_right < ipc}


@torch.no_grad()
def expert_judgement(fm: FlatModel, thetas: Sequence[torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor, index: torch.Tensor, chunk: int = INIT_CHUNK,
                     group: Group = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image x[index]: how many of the experts get it wrong, and the sum of their
    cross-entropy losses on it (class y[index]); chunk by chunk, for a large class or set.

    Each rank of `group` judges every W-th chunk and a sum shares the rest (a value plus
    zeros is exact): one process's bits on every rank, at 1/W of the work."""
    wrong = torch.zeros(len(index), device=x.device)
    loss = torch.zeros(len(index), device=x.device)
    for start in group.shard(range(0, len(index), chunk)):
        part = slice(start, start + chunk)
        images, target = x[index[part]], y[index[part]]
        for theta in thetas:
            logits = fm(theta, images)
            wrong[part] += (logits.argmax(1) != target).float()
            loss[part] += torch.nn.functional.cross_entropy(logits, target, reduction="none")
    return group.all_reduce_sum(wrong), group.all_reduce_sum(loss)


def _logits(fm: FlatModel, theta: torch.Tensor, x: torch.Tensor, chunk: int = INIT_CHUNK
            ) -> torch.Tensor:
    return torch.cat([fm(theta, x[s:s + chunk]) for s in range(0, x.shape[0], chunk)])


@torch.no_grad()
def expert_logits(fm: FlatModel, thetas: Sequence[torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor, chunk: int = INIT_CHUNK, group: Group = SINGLE
                  ) -> torch.Tensor:
    """Per image, the mean logits of the experts that classify it correctly (all if none do).

    Sums expert by expert over chunks of images: memory stays at one chunk's [chunk, C] sums
    instead of [K, n, C] logits (100 experts x 10,000 images x 200 classes at Tiny IPC 50).
    The ranks of `group` share the chunks as in `expert_judgement`.
    """
    out = torch.zeros(x.shape[0], fm.spec.num_classes, dtype=x.dtype, device=x.device)
    for s in group.shard(range(0, x.shape[0], chunk)):
        xs, ys = x[s:s + chunk], y[s:s + chunk]
        every = torch.zeros(xs.shape[0], fm.spec.num_classes, device=x.device)
        right_sum = torch.zeros_like(every)
        right_n = torch.zeros(xs.shape[0], 1, device=x.device)
        for theta in thetas:
            logits = fm(theta, xs)
            right = (logits.argmax(-1) == ys).float()[:, None]
            every = every + logits
            right_sum = right_sum + logits * right
            right_n = right_n + right
        out[s:s + chunk] = torch.where(right_n > 0, right_sum / right_n.clamp_min(1),
                                       every / len(thetas))
    return group.all_reduce_sum(out)
