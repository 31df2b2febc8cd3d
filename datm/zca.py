"""ZCA whitening: fit on training images, whiten for the model, de-whiten for people.

The definition is kornia's `ZCAWhitening(eps)`, which the DATM reference uses on raw [0, 1]
pixels (docs/METHOD.md, "ZCA whitening"): covariance with 1/(N-1), eps added to its eigenvalues.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import artifacts
from .artifacts import ArtifactError

KIND = "zca"
# What the pipeline fits on. Recorded in the artifact because a transform fitted on normalized
# images (datm before this was recorded) whitens a different space: silently wrong if reused.
SPACE = "pixels"
# Tiny ImageNet (3x64x64 = 12288) must fit: its float64 covariance is 1.2 GB, and eigh needs a
# few more such matrices. At 3x128x128 (49152) one matrix alone would be 19 GB.
MAX_DIM = 16384


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
            "mean": self.mean.cpu(), "matrix": self.matrix.cpu(), "inverse": self.inverse.cpu()}
        space = {"space": SPACE} if self.enabled else {}
        return artifacts.save(path, tensors, KIND, {"enabled": self.enabled, **space, **(meta or {})})

    @classmethod
    def load(cls, path: str | Path) -> ZCA:
        tensors, meta = artifacts.load(path, KIND)
        if not meta.get("enabled"):
            return cls()
        if meta.get("space") != SPACE:
            raise ArtifactError(f"{path} was fitted on {meta.get('space', 'normalized images')}, "
                                f"not raw [0, 1] {SPACE}: rerun the zca stage (`datm zca`)")
        return cls(tensors["mean"], tensors["matrix"], tensors["inverse"])


def fit(x: torch.Tensor, eps: float = 0.1, chunk: int = 2048, scale: float = 1.0) -> ZCA:
    """Fit on images [N, C, H, W] (scaled by `scale`): T = U diag((s + eps)^-1/2) U^T.

    U, s: eigenvectors and eigenvalues of the covariance (1/(N-1)) of the flattened images;
    the inverse is U diag((s + eps)^1/2) U^T. The work runs in float64 on x's device, `chunk`
    images at a time, so uint8 images with `scale` 1/255 never exist as floats all at once.
    """
    n, d = x.shape[0], x[0].numel()
    if d > MAX_DIM:
        raise ValueError(f"ZCA on {d}-dimensional images needs {d}x{d} float64 matrices "
                         f"({d * d * 8 / 2**30:.0f} GiB each); set zca.enabled: false "
                         f"(limit {MAX_DIM} dimensions)")
    if n < 2:
        raise ValueError(f"ZCA needs at least two images to estimate a covariance, got {n}")
    flat = x.flatten(1)
    starts = range(0, n, chunk)
    rows = lambda start: flat[start:start + chunk].double() * scale  # noqa: E731
    mean = torch.zeros(d, dtype=torch.float64, device=x.device)
    for start in starts:  # two passes: centring before the products keeps float64 accurate
        mean += rows(start).sum(0)
    mean /= n
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for start in starts:
        part = rows(start) - mean
        cov.addmm_(part.T, part)
    cov /= n - 1
    evals, evecs = torch.linalg.eigh(cov)
    del cov  # at 12288 dimensions each D x D matrix is 1.2 GB
    # Rounding can leave tiny negative eigenvalues where the true ones are 0 (N <= D).
    evals = evals.clamp(min=0) + eps
    matrix = (evecs * evals.rsqrt()) @ evecs.T
    inverse = (evecs * evals.sqrt()) @ evecs.T
    return ZCA(mean.float(), matrix.float(), inverse.float())
