"""Differentiable Siamese augmentation (DSA), split into *draw* and *apply*.

`sample` draws the random part (one transform family per call, per-image magnitudes) from an
explicit generator; `apply` is a pure, differentiable function of the images and the draw. The
split lets the recompute gradient replay exactly the augmentation a forward step used, and makes
a run deterministic under a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import AugConfig


@dataclass(frozen=True)
class AugDraw:
    """One call's random choices: a transform family and per-image values."""

    family: str
    values: torch.Tensor


def sample(cfg: AugConfig, n: int, size: int, generator: torch.Generator) -> AugDraw | None:
    """Draw the randomness of one augmentation call for `n` images of side `size`."""
    if not cfg.enabled or not cfg.families:
        return None
    family = cfg.families[int(torch.randint(len(cfg.families), (1,), generator=generator))]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    if family == "color":
        values = u(n, 3)
    elif family == "crop":
        shift = int(size * cfg.crop + 0.5)
        values = torch.randint(-shift, shift + 1, (n, 2), generator=generator).float()
    elif family == "cutout":
        values = torch.randint(0, size, (n, 2), generator=generator).float()
    elif family == "flip":
        values = (u(n) < 0.5).float()
    elif family == "scale":
        values = u(n, 2) * (cfg.scale - 1.0 / cfg.scale) + 1.0 / cfg.scale
    else:  # rotate
        values = (u(n) - 0.5) * 2 * cfg.rotate
    return AugDraw(family, values)


def apply(x: torch.Tensor, draw: AugDraw | None, cfg: AugConfig) -> torch.Tensor:
    """Apply a draw to a batch; differentiable with respect to `x`."""
    if draw is None:
        return x
    v = draw.values.to(x.device, x.dtype)
    n, size = x.shape[0], x.shape[-1]
    if draw.family == "color":
        x = x + (v[:, 0, None, None, None] - 0.5) * cfg.brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (v[:, 1, None, None, None] * cfg.saturation) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (v[:, 2, None, None, None] + cfg.contrast) + mean
    if draw.family == "cutout":
        side = int(size * cfg.cutout + 0.5)
        grid = torch.arange(size, device=x.device, dtype=x.dtype)
        low = v - side // 2  # a side x side square around the drawn centre, clipped at the border
        rows = (grid[None, :] >= low[:, 0, None]) & (grid[None, :] < low[:, 0, None] + side)
        cols = (grid[None, :] >= low[:, 1, None]) & (grid[None, :] < low[:, 1, None] + side)
        keep = ~(rows[:, :, None] & cols[:, None, :])
        return x * keep[:, None].to(x.dtype)
    if draw.family == "flip":
        return torch.where(v[:, None, None, None] > 0.5, x.flip(3), x)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    if draw.family == "crop":
        # Integer-pixel shifts land on pixel centres (align_corners=False): an exact translation.
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = 2 * v[:, 1] / size
        theta[:, 1, 2] = 2 * v[:, 0] / size
    elif draw.family == "scale":
        theta[:, 0, 0], theta[:, 1, 1] = v[:, 0], v[:, 1]
    else:  # rotate
        rad = v * (math.pi / 180)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(rad), torch.sin(-rad)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(rad), torch.cos(rad)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def augment(x: torch.Tensor, cfg: AugConfig, generator: torch.Generator) -> torch.Tensor:
    """Draw and apply in one go, for callers that need no replay."""
    return apply(x, sample(cfg, x.shape[0], x.shape[-1], generator), cfg)
