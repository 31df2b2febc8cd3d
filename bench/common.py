"""Shared by the bench scripts: peak-memory measurement in a fresh child process, tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch


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
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
