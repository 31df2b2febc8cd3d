"""Pictures of synthetic sets: one row per class, de-whitened pixels."""

from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import atomic_path


def class_grid(pixels: torch.Tensor, num_classes: int, per_row: int = 10) -> torch.Tensor:
    """Pixels [C*ipc, ch, H, W] (class-major, in [0, 1]) -> one grid image [ch, H', W']."""
    from torchvision.utils import make_grid

    ipc = pixels.shape[0] // num_classes
    shown = min(ipc, per_row)
    rows = pixels.view(num_classes, ipc, *pixels.shape[1:])[:, :shown].flatten(0, 1)
    return make_grid(rows.float().cpu(), nrow=shown, padding=1, pad_value=1.0)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Save a [ch, H, W] float image in [0, 1] as PNG, atomically."""
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(image, str(tmp), format="png")
    return Path(path)
