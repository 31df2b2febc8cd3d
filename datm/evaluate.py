"""Evaluation protocol (docs/METHOD.md, "How numbers are measured"): fresh networks, real test data.

The same `train_and_test` serves the distilled set (soft labels, learned lr), the random real
subset baseline (hard labels) and the full-dataset reference, so the three numbers are comparable.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from .augment import AugConfig, augment
from .compiled import maybe_compile
from .config import EvalConfig
from .distributed import SINGLE, Group
from .errors import UserError
from .events import Callback
from .networks import NetSpec, build, soft_cross_entropy


def distilled_lr(cfg: EvalConfig, learned: float) -> float:
    """The evaluation lr of a distilled set: evaluate.lr if set, else the learned lr x lr_scale."""
    return cfg.lr or learned * cfg.lr_scale


def arch_spec(base: NetSpec, arch: str) -> NetSpec:
    """The evaluation network: the experts' ConvNet, it with batch norm, or a ResNet-18."""
    if arch == "convnet_bn":
        return replace(base, norm="batch")
    if arch == "resnet18":
        return replace(base, model="resnet18", norm="batch")
    return base


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  chunk: int = 2048) -> float:
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], chunk):
        correct += int((model(x[start:start + chunk]).argmax(1) == y[start:start + chunk]).sum())
    model.train()
    return correct / x.shape[0]


def stream_seeds(seed: int) -> tuple[int, int]:
    """(initial weights, batch order and augmentation) seeds of the network seeded `seed`.

    Even and odd: networks seeded seed, seed + 1, ... (a set's K models) never share a stream,
    which `seed` and `seed + 1` did when model k's batch order was model k + 1's init.
    """
    return 2 * seed, 2 * seed + 1


def train_and_test(spec: NetSpec, x: torch.Tensor, targets: torch.Tensor, lr: float,
                   epochs: int, cfg: EvalConfig, aug: AugConfig, x_test: torch.Tensor,
                   y_test: torch.Tensor, seed: int, callback: Callback | None = None,
                   test_every: int = 0) -> float:
    """Train one fresh network; `targets` are label logits (soft CE) or class ids (hard CE).

    SGD with momentum and weight decay, lr x0.1 at half the epochs, DSA on each batch; the
    forward compiled when `cfg.compile` (the test pass stays eager).
    `test_every` > 0 also reports the test accuracy every that many epochs (a "test" event):
    the accuracy curve that shows whether a run has converged.
    """
    if not math.isfinite(lr) or lr <= 0:
        raise UserError(f"evaluation lr must be a positive number, got {lr} (a diverged "
                        "distillation, or evaluate.lr / lr_scale)")
    init_seed, order_seed = stream_seeds(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = build(spec).to(x.device)
    forward = maybe_compile(model, cfg.compile)
    gen = torch.Generator().manual_seed(order_seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    soft = targets.dtype.is_floating_point
    aug = aug if cfg.augment else replace(aug, enabled=False)
    n, batch = x.shape[0], min(cfg.batch, x.shape[0])
    loss = torch.zeros(())
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            if idx.numel() < 2 and spec.norm == "batch":
                continue  # batch norm cannot train on a single image
            out = forward(augment(x[idx], aug, gen))
            loss = soft_cross_entropy(out, targets[idx]) if soft else F.cross_entropy(out, targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if not bool(torch.isfinite(loss)):  # once an epoch: a check per step would sync a GPU
            raise UserError(f"an evaluation network diverged (loss {float(loss.detach())}) in epoch "
                            f"{epoch + 1} at lr {lr:.4g}: lower the evaluation lr (evaluate.lr, "
                            "lr_scale or random_lr), or the set is broken")
        if callback:
            callback({"event": "epoch", "epoch": epoch + 1, "epochs": epochs})
            if test_every and (epoch + 1) % test_every == 0 and epoch + 1 < epochs:
                callback({"event": "test", "epoch": epoch + 1,
                          "acc": test_accuracy(model, x_test, y_test)})
    return test_accuracy(model, x_test, y_test)


def evaluate_set(spec: NetSpec, x: torch.Tensor, targets: torch.Tensor, lr: float, epochs: int,
                 models: int, cfg: EvalConfig, aug: AugConfig, x_test: torch.Tensor,
                 y_test: torch.Tensor, seed: int, callback: Callback | None = None,
                 group: Group = SINGLE, test_every: int = 0) -> dict:
    """Accuracy of `models` fresh networks on one set: {"mean", "std", "accs", "seconds"}.

    On several ranks model k trains on rank k % W with the seeds it has in one process, and
    every rank returns all K results in model order (`seconds`: each model's own wall time).
    """
    mine_acc, mine_seconds = {}, {}
    for k in group.shard(range(models)):
        tic = time.perf_counter()
        mine_acc[k] = train_and_test(spec, x, targets, lr, epochs, cfg, aug, x_test, y_test,
                                     seed * 1009 + k, callback, test_every)
        mine_seconds[k] = time.perf_counter() - tic
        if callback:
            callback({"event": "model", "model": k + 1, "models": models, "acc": mine_acc[k]})
    accs = group.gather_floats(mine_acc, models)
    seconds = group.gather_floats(mine_seconds, models)
    t = torch.tensor(accs, dtype=torch.float64)
    std = float(t.std()) if len(accs) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "accs": accs, "seconds": seconds}


def random_subset(y: torch.Tensor, ipc: int, num_classes: int, seed: int,
                  all_of_smaller: bool = False) -> torch.Tensor:
    """Indices of `ipc` random real images per class. A class with fewer is an error (a
    baseline must be as large as the set it is compared with) unless `all_of_smaller`."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < ipc and not all_of_smaller:
            raise UserError(f"a random real subset of {ipc} images per class needs {ipc} images "
                            f"of class {c}, which has {len(idx)}")
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:ipc].to(idx.device)])
    return torch.cat(chosen)


VALIDATION_SEED = 6151  # offset: the validation split is not the random-real baseline's draw


def validation_subset(y: torch.Tensor, per_class: int, num_classes: int,
                      seed: int = 0) -> torch.Tensor:
    """Indices of `per_class` TRAINING images per class (all of a smaller class), fixed by `seed`.

    What a distillation may select its sets on: images of the training split, never of the
    test split. They stay in the training data too (the experts saw them); the selection only
    needs them to be away from the test split.
    """
    return random_subset(y, per_class, num_classes, seed + VALIDATION_SEED, all_of_smaller=True)
