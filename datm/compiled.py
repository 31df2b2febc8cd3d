"""torch.compile for the plain training loops: the experts' loss and the evaluation networks.

Compiling fuses each block's norm, ReLU and pooling into a few kernels; on a CPU, where those
memory-bound ops take about half of a ConvNet step, the profile's batches (64, 128) train
1.35-1.4x faster (bench/compile.py). The training is the same, the float rounding is not: a
compiled run gives other bytes than an eager one, and the same bytes run to run. So `compile`
is a setting of the stages it touches (buffers.compile, evaluate.compile and
evaluate.ipc.<N>.compile), part of the experts' identity and of an evaluation's recorded recipe.

Compiling costs 10-30 s per process and shape before the first step, so it pays for thousands
of steps (experts, a large set's evaluation), not for an IPC 1 evaluation's few hundred. A
machine without a C++ compiler cannot compile: the stages then train eager, say so in one
warning line, and record `compile: false` (`compiler_missing`, stages/common.load).
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def maybe_compile(fn: F, enabled: bool) -> F:
    """`fn` compiled (one graph per input shape, no dynamic shapes: a partial last batch gets
    its own), or `fn` itself when not `enabled`."""
    if not enabled:
        return fn
    # On a machine without CUDA, inductor's C++ builder logs "No CUDA runtime is found" once
    # per process: nothing is wrong, and a CPU user should not read it as a problem.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(fn, dynamic=False)  # type: ignore[return-value]


def compiler_missing() -> str | None:
    """Why torch.compile cannot run on this machine, or None: inductor builds its kernels with
    a C++ compiler against Python's headers (on a CPU; Triton's launcher needs them on a GPU)."""
    names = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    if not any(name and shutil.which(name) for name in names):
        return "no C++ compiler on PATH (c++, g++, clang++ or $CXX)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python headers (Python.h: Debian's python3-dev)"
    return None
