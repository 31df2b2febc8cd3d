"""Shared by the bench scripts: peak memory in a fresh child process, expert timing, tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from datm.augment import AugConfig
from datm.experts import ExpertConfig, train_group
from datm.networks import FlatModel


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(dev: torch.device) -> float:
    """GPU: peak allocated by torch. CPU: peak resident set of this process (a fresh child)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(module: str, config: dict) -> dict:
    """Run one measurement in a fresh interpreter so its peak memory is its own."""
    out = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(config)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "."})
    if out.returncode < 0:
        # A child killed by a signal (usually the kernel's OOM killer) leaves no useful stderr.
        raise RuntimeError(f"killed by signal {-out.returncode} (out of memory?)")
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_seconds(run: Callable[[object], object], prepare: Callable[[], object], repeats: int,
                 dev: torch.device) -> float:
    """Best wall time of run(prepare()) over `repeats` calls after one warm-up (prepare untimed)."""
    times = []
    for i in range(repeats + 1):
        arg = prepare()
        reset_peak(dev)
        sync(dev)
        tic = time.perf_counter()
        run(arg)
        sync(dev)
        if i:
            times.append(time.perf_counter() - tic)
    return min(times)


def step_timing(step: Callable[[], object], steps: int, warm: int = 2) -> tuple[float, float, object]:
    """(seconds of the first call, mean ms per step over `steps` timed calls, the last call's
    result). The first call is eager's warm-up or torch.compile's compilation; `warm` untimed
    calls follow it so that allocator and caches are settled."""
    tic = time.perf_counter()
    step()
    first = time.perf_counter() - tic
    for _ in range(warm):
        step()
    out = None
    tic = time.perf_counter()
    for _ in range(steps):
        out = step()
    return first, (time.perf_counter() - tic) / steps * 1e3, out


def expert_seconds(fm: FlatModel, groups: list[list[int]], x: torch.Tensor, y: torch.Tensor,
                   cfg: ExpertConfig, aug: AugConfig) -> float:
    """Wall seconds to train each seed group (one train_group call per group) on (x, y).

    The warm-up uses the first group whole, so a batched group's vmap path is warm too.
    """
    n = min(x.shape[0], 2 * cfg.batch)
    train_group(fm, groups[0], x[:n], y[:n], x[:64], y[:64], cfg, aug)
    reset_peak(x.device)
    sync(x.device)
    tic = time.perf_counter()
    for seeds in groups:
        train_group(fm, seeds, x, y, x[:64], y[:64], cfg, aug)
    sync(x.device)
    return time.perf_counter() - tic


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(fmt, cells[1:])])


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
