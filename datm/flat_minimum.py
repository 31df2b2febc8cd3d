"""GSAM: the flat-minimum step the DATM reference trains its experts with.

GSAM (Zhuang et al. 2022, "Surrogate Gap Guided Sharpness-Aware Minimization") on parameters w
with mini-batch loss L, one step:

    g     = grad L(w)
    e     = rho * w^2 * g / (||w * g|| + 1e-12)        adaptive (products elementwise)
    e     = rho * g / (||g|| + 1e-12)                  non-adaptive
    g_p   = grad L(w + e)                              same (augmented) mini-batch
    g_par = (g . g_p / ||g_p||^2) g_p,   g_vert = g - g_par
    d     = g_p - alpha * g_vert                       then the usual SGD step along d

Descending along g_p minimizes the perturbed loss (SAM); -alpha * g_vert additionally shrinks
the surrogate gap L(w + e) - L(w) without changing the descent on the perturbed loss (g_vert is
orthogonal to g_p). With alpha = 0 and adaptive off this is SAM. The adaptive form scales the
radius per coordinate by |w|, so that ||e / |w||| = rho: the neighbourhood is invariant to the
rescaling of weights that leaves a ReLU network's function unchanged.

Every tensor here is a stack of flat parameter vectors [G, P] (train_group trains G experts at
once); norms and inner products are per row, so each expert sees only its own parameters.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def _row_norm(v: torch.Tensor) -> torch.Tensor:
    return v.norm(dim=1, keepdim=True)


def perturbation(theta: torch.Tensor, g: torch.Tensor, rho: float,
                 adaptive: bool) -> torch.Tensor:
    """The ascent step e [G, P] at parameters `theta` [G, P] with gradient `g` [G, P]."""
    if adaptive:
        return rho * theta.square() * g / (_row_norm(theta * g) + EPS)
    return rho * g / (_row_norm(g) + EPS)


def surrogate_gap_direction(g: torch.Tensor, g_p: torch.Tensor, alpha: float) -> torch.Tensor:
    """Descent direction d = g_p - alpha * (part of g orthogonal to g_p), per row [G, P]."""
    if alpha == 0:
        return g_p
    # A zero g_p has no direction to project on: the clamp turns 0/0 into g_par = 0.
    coef = (g * g_p).sum(dim=1, keepdim=True) / g_p.square().sum(dim=1, keepdim=True).clamp_min(
        torch.finfo(g_p.dtype).tiny)
    g_vert = g - coef * g_p
    return g_p - alpha * g_vert
