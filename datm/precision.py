"""Numerics of the matching computation: strict float32, TF32 (CUDA) or bf16 autocast.

Only the network's convolutions and matrix products change precision; parameters, the adjoint
and the accumulated gradients stay float32. `bench/precision.py` measures how far each mode's
matching gradient is from a float64 reference, which is what decides whether a mode is usable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from .config import PRECISIONS


@contextmanager
def _cuda_tf32(enabled: bool) -> Iterator[None]:
    # cuDNN convolutions default to TF32 in PyTorch: "float32" has to switch it off explicitly.
    # These flags are process-wide, so they are restored on the way out.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def numerics(mode: str, device: torch.device | str):
    """A context in which the network computes at `mode` precision on `device`.

    TF32 exists only on CUDA (elsewhere it is float32); bf16 autocast works on CPU and CUDA.
    """
    if mode not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{mode}'")
    device = torch.device(device)
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        return _cuda_tf32(mode == "tf32")
    return nullcontext()
