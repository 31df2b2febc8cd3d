"""ZCA whitening: fit on training images, whiten for the model, de-whiten for people."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import artifacts

KIND = "zca"
MAX_DIM = 8192  # a D x D transform beyond this is too large to be worth it (Tiny ImageNet: off)


@dataclass(frozen=True)
class ZCA:
    """x_white = (x - mean) @ matrix ; x = x_white @ inverse + mean (per flattened image).

    With `mean` None the transform is the identity (`zca.enabled: false`).
    """

    mean: torch.Tensor | None = None
    matrix: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        return self.mean is not None

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        flat = x.flatten(1) - self.mean.to(x)
        return (flat @ self.matrix.to(x)).view_as(x)

    def dewhiten(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x.flatten(1) @ self.inverse.to(x) + self.mean.to(x)).view_as(x)

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        tensors = {} if not self.enabled else {
            "mean": self.mean, "matrix": self.matrix, "inverse": self.inverse}
        return artifacts.save(path, tensors, KIND, {"enabled": self.enabled, **(meta or {})})

    @classmethod
    def load(cls, path: str | Path) -> ZCA:
        tensors, meta = artifacts.load(path, KIND)
        if not meta.get("enabled"):
            return cls()
        return cls(tensors["mean"], tensors["matrix"], tensors["inverse"])


def fit(x: torch.Tensor, eps: float = 0.1, chunk: int = 8192) -> ZCA:
    """Fit on images [N, C, H, W] (already normalized); `eps` regularizes small eigenvalues."""
    d = x[0].numel()
    if d > MAX_DIM:
        raise ValueError(f"ZCA on {d}-dimensional images needs a {d}x{d} matrix; "
                         f"set zca.enabled: false (limit {MAX_DIM})")
    flat = x.flatten(1)
    mean = flat.double().mean(0)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, flat.shape[0], chunk):  # bounded memory for large N
        part = flat[start:start + chunk].double() - mean
        cov += part.T @ part
    cov /= flat.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp(min=0)
    matrix = evecs @ torch.diag((evals + eps).rsqrt()) @ evecs.T
    inverse = evecs @ torch.diag((evals + eps).sqrt()) @ evecs.T
    return ZCA(mean.float(), matrix.float(), inverse.float())
