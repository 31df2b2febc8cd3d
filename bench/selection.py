"""Which real images make the best large set: per class, the same number of training images
chosen by the experts' difficulty (their mean cross-entropy at the final epoch), each set
trained with the evaluation recipe of that IPC (one network, seed 0 unless --seed) and tested.

A finished project's data, ZCA and experts are read, nothing is written there. The experts
judge the whole training set chunk by chunk in index order; `init: real_hard` judges each class
in its seeded order: the same numbers with instance norm (the profile's), not with batch norm.
The table of bench/RESULTS.md ("IPC 1000 from the hardest images the experts get right") came
from this.
Run: `python -m bench.selection PROJECT [--ipc 1000] [--epochs 20] [--soft] [--sets ...]`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import table
from datm import data, evaluate
from datm.config import AugConfig, EvalConfig
from datm.experts import ExpertBuffer
from datm.initialization import expert_judgement, expert_logits
from datm.networks import FlatModel
from datm.zca import ZCA


def choosers(loss: torch.Tensor, wrong: torch.Tensor, ipc: int) -> dict[str, Callable]:
    """name -> function(indices of one class) -> the `ipc` chosen among them."""
    def drawn(seed: int) -> Callable:
        gen = torch.Generator().manual_seed(seed)
        return lambda idx: idx[torch.randperm(len(idx), generator=gen)[:ipc]]

    def hardest_right(idx: torch.Tensor) -> torch.Tensor:
        # init real_hard without its fallback: a class with fewer all-right images gives a
        # smaller set (none did on Fashion-MNIST's 6,000 per class; checked in main)
        right = idx[wrong[idx] == 0]
        return right[loss[right].argsort(descending=True)[:ipc]]

    def coverage(idx: torch.Tensor, beta: float = 0.1, bins: int = 50) -> torch.Tensor:
        """Coverage-centric: the hardest beta dropped, the budget spread evenly over bins of
        equal loss width (a bin with fewer images gives its share to the others)."""
        kept = idx[loss[idx].argsort()][: int(len(idx) * (1 - beta))]
        edges = torch.linspace(float(loss[kept].min()), float(loss[kept].max()) + 1e-9, bins + 1)
        which = torch.bucketize(loss[kept], edges[1:-1])
        groups = sorted((g for g in (kept[which == b] for b in range(bins)) if len(g)), key=len)
        gen, chosen, budget = torch.Generator().manual_seed(1), [], ipc
        for i, group in enumerate(groups):
            take = min(len(group), budget // (len(groups) - i))
            budget -= take
            chosen.append(group[torch.randperm(len(group), generator=gen)[:take]])
        return torch.cat(chosen)

    def without_hardest_tenth(idx: torch.Tensor) -> torch.Tensor:
        return drawn(13)(idx[loss[idx].argsort()][: int(len(idx) * 0.9)])

    return {
        "random_a": drawn(11),
        "random_b": drawn(12),
        "easiest": lambda idx: idx[loss[idx].argsort()[:ipc]],
        "random_without_hardest_10pct": without_hardest_tenth,
        "coverage": coverage,
        "hardest_all_right": hardest_right,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("--ipc", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--soft", action="store_true", help="the experts' soft labels, not hard")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (they change rounding)")
    ap.add_argument("--sets", nargs="*", help="names of the sets (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = args.project
    train, test = (data.Split.load(root / "data" / f"{name}.safetensors")
                   for name in ("train", "test"))
    zca = ZCA.load(root / "artifacts" / "zca.safetensors")
    x, y = data.to_model_space(train.images, train.mean, train.std, zca), train.labels.long()
    x_test = data.to_model_space(test.images, train.mean, train.std, zca)
    y_test = test.labels.long()
    buffer = ExpertBuffer.open(root / "artifacts" / "buffers")
    fm = FlatModel(buffer.spec).train(True)
    thetas = [buffer.snapshots_of(k, [buffer.snapshots])[0] for k in range(len(buffer))]
    wrong, loss = expert_judgement(fm, thetas, x, y, torch.arange(len(x)))
    loss = loss / len(thetas)  # the experts' mean
    sets = choosers(loss, wrong, args.ipc)
    cfg = EvalConfig(models=1, epochs=args.epochs, batch=args.batch, lr=args.lr)
    rows = []
    for name in args.sets or list(sets):
        idx = torch.cat([sets[name](torch.nonzero(y == c).flatten())
                         for c in range(buffer.spec.num_classes)])
        if len(idx) != args.ipc * buffer.spec.num_classes:
            raise SystemExit(f"{name}: a class has fewer than {args.ipc} such images")
        targets = expert_logits(fm, thetas, x[idx], y[idx]) if args.soft else y[idx]
        tic = time.perf_counter()
        acc = evaluate.train_and_test(buffer.spec, x[idx], targets, args.lr, args.epochs, cfg,
                                      AugConfig(), x_test, y_test, args.seed)
        rows.append([name, f"{100 * acc:.2f}", f"{float(loss[idx].mean()):.3f}",
                     int((wrong[idx] > 0).sum()), f"{time.perf_counter() - tic:.0f}"])
    print(table(["set", "test %", "mean expert loss", "wrong for some expert", "s"], rows))


if __name__ == "__main__":
    main()
