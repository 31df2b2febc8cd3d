"""Pictures of synthetic sets: one row per class, de-whitened pixels."""

from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import atomic_path

GRID_PER_CLASS = 10  # images shown per class: a grid of IPC 50 would be 50 columns wide


def class_grid(pixels: torch.Tensor, num_classes: int, per_row: int = GRID_PER_CLASS,
               min_side: int = 64) -> torch.Tensor:
    """Pixels [C*ipc, ch, H, W] (class-major, in [0, 1]) -> one grid image [ch, H', W'].

    Small images are enlarged (nearest neighbour) to at least `min_side` so a person sees them.
    """
    from torchvision.utils import make_grid

    ipc = pixels.shape[0] // num_classes
    shown = min(ipc, per_row)
    rows = pixels.view(num_classes, ipc, *pixels.shape[1:])[:, :shown].flatten(0, 1).float().cpu()
    factor = max(1, -(-min_side // rows.shape[-1]))
    if factor > 1:
        rows = rows.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    return make_grid(rows, nrow=shown, padding=2, pad_value=1.0)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Save a [ch, H, W] float image in [0, 1] as PNG, atomically."""
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(image, str(tmp), format="png")
    return Path(path)
