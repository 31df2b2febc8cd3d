"""One process x 2 threads vs 2 processes x 1 thread (gloo), per stage kernel, on this machine.

Kernels, at the default profile's sizes (Fashion-MNIST 1x28x28, 10 classes, ConvNet width 32
depth 3, DSA on):
* experts: 2 experts x `--expert-steps` SGD steps at batch 256 on random images (rank r trains
  expert r; one process trains both);
* distill IPC 10: one recompute iteration, 100 images, batch_syn 50, N 20 (each step's batch
  split across the ranks, gradients all-reduced);
* distill IPC 1000: one recompute iteration, 10,000 images, batch_syn 1000, N `--n1000`;
* evaluate: 2 evaluation models x `--eval-epochs` epochs on an IPC 10 set, batch 25 (model k on
  rank k % 2; one process trains both).

Both layouts run in one invocation, each in fresh processes started here with torchrun's
variables (RANK, WORLD_SIZE, MASTER_ADDR, ...); wall times are rank 0's, between barriers.
`--single` adds 1 process x 1 thread, to tell what the second thread buys from what the
second process buys (on a loaded machine, OpenMP threads that wait for each other can lose).
Run: `python -m bench.distributed [--expert-steps 100] [--n1000 5] [--eval-epochs 30]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import table
from datm.augment import AugConfig
from datm.config import EvalConfig, ExpertConfig
from datm.distributed import Group, init_from_env
from datm.evaluate import evaluate_set
from datm.experts import train_experts
from datm.matching import make_plan, recompute
from datm.networks import FlatModel, NetSpec

SPEC = NetSpec(channels=1, num_classes=10, im_size=28, width=32, depth=3)
AUG = AugConfig(strategy="color_crop_cutout_flip_scale_rotate")
KERNELS = ("experts", "distill IPC 10", "distill IPC 1000", "evaluate")


def _timed(group: Group, run) -> float:
    group.barrier()
    tic = time.perf_counter()
    run()
    group.barrier()
    return time.perf_counter() - tic


def _experts(group: Group, cfg: dict, out: Path) -> float:
    gen = torch.Generator().manual_seed(0)
    n = 256 * cfg["expert_steps"]
    x = torch.randn(n, 1, 28, 28, generator=gen)
    y = torch.randint(10, (n,), generator=gen)
    expert = ExpertConfig(num_experts=2, epochs=1, lr=0.01, batch=256, seed=0)
    return _timed(group, lambda: train_experts(out, SPEC, x, y, x[:500], y[:500], expert, AUG,
                                               data_id="bench", group=group))


def _distill(group: Group, ipc: int, batch: int, steps: int) -> float:
    fm = FlatModel(SPEC).train(True)
    gen = torch.Generator().manual_seed(0)
    n = ipc * SPEC.num_classes
    images = torch.randn(n, 1, 28, 28, generator=gen)
    labels = torch.randn(n, SPEC.num_classes, generator=gen)
    start = fm.init(0)
    target = start + 0.01 * torch.randn(start.shape, generator=gen)
    lr = torch.tensor(0.01)

    def iteration(n_steps: int):
        plan = make_plan(n, batch, n_steps, 28, AUG, gen)  # the same draws on every rank
        return recompute(fm, images, labels, lr, start, target, plan, AUG, group=group)

    iteration(1)  # warm-up: allocator, kernels
    return _timed(group, lambda: iteration(steps))


def _evaluate(group: Group, cfg: dict) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 1, 28, 28, generator=gen)
    y = torch.randn(100, SPEC.num_classes, generator=gen)
    recipe = EvalConfig(models=2, epochs=cfg["eval_epochs"], batch=25)
    return _timed(group, lambda: evaluate_set(SPEC, x, y, 0.01, recipe.epochs, recipe.models,
                                              recipe, AUG, x[:50], y[:50].argmax(1), seed=0,
                                              group=group))


def child(cfg: dict) -> dict:
    group = init_from_env()
    seconds = {
        "experts": _experts(group, cfg, Path(cfg["out"])),
        "distill IPC 10": _distill(group, 10, 50, 20),
        "distill IPC 1000": _distill(group, 1000, 1000, cfg["n1000"]),
        "evaluate": _evaluate(group, cfg),
    }
    result = {"rank": group.rank, "world": group.world, "threads": torch.get_num_threads(),
              "seconds": seconds}
    group.close()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, threads: int, cfg: dict) -> dict:
    """`world` fresh processes of `threads` threads each; rank 0's result."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    base.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=".")
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(base)
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.distributed", "--child",
                                       json.dumps(cfg)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outputs):
        if p.returncode:
            raise RuntimeError(f"a rank failed (exit {p.returncode}):\n{err[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child")
    parser.add_argument("--expert-steps", type=int, default=100, help="SGD steps per expert")
    parser.add_argument("--n1000", type=int, default=5, help="N of the IPC 1000 iteration")
    parser.add_argument("--eval-epochs", type=int, default=30)
    parser.add_argument("--single", action="store_true", help="also 1 process x 1 thread")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    layouts = [(1, 2), (2, 1)] + ([(1, 1)] if args.single else [])
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, threads in layouts:
            cfg = {"expert_steps": args.expert_steps, "n1000": args.n1000,
                   "eval_epochs": args.eval_epochs, "out": str(Path(tmp) / f"{world}x{threads}")}
            seconds.append(launch(world, threads, cfg)["seconds"])
    headers = ["kernel", "1 proc x 2 threads (s)", "2 procs x 1 thread (s)",
               "speed-up of 2 procs"] + (["1 proc x 1 thread (s)"] if args.single else [])
    rows = [[k, f"{seconds[0][k]:.2f}", f"{seconds[1][k]:.2f}",
             f"{seconds[0][k] / seconds[1][k]:.2f}x"] + [f"{s[k]:.2f}" for s in seconds[2:]]
            for k in KERNELS]
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} at the end (a shared machine: times are noisy)")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
