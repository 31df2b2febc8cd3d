"""The trajectory-matching loss and its exact gradient, by two interchangeable methods.

One distillation iteration unrolls N SGD steps of a student on synthetic mini-batches,

    theta_{i+1} = theta_i - alpha * g_i,   g_i = grad_theta L(theta_i; aug_i(X[b_i]), Y[b_i]),

and scores loss = ||theta_N - target||^2 / ||theta_0 - target||^2. We need d loss / d(X, Y, alpha).

* `unroll`: autograd through all N steps (the reference). Memory grows with N.
* `recompute`: a forward pass that keeps only the N parameter vectors, then a reverse sweep that
  recomputes one step at a time and carries the adjoint lambda_i = d loss / d theta_i:

      lambda_i = lambda_{i+1} - alpha * H_i lambda_{i+1}      (Hessian-vector product)
      dX[b_i] += -alpha * d(g_i . lambda_{i+1}) / dX[b_i]     (same for Y)
      dalpha  += -g_i . lambda_{i+1}

  This is the same chain rule evaluated in a different order, so it is exact (equal to `unroll`
  up to float rounding) while holding one step's activations at a time.

Both return the loss before any backward work, so a sample over the skip threshold costs only
its forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .augment import AugConfig, AugDraw, apply
from .config import MODES
from .networks import FlatModel, soft_cross_entropy


@dataclass(frozen=True)
class Plan:
    """The randomness of one unroll, fixed up front so both methods see the same steps."""

    batches: list[torch.Tensor]          # indices into the synthetic set, one per step
    draws: list[AugDraw | None]          # augmentation draw, one per step

    def to(self, device: torch.device) -> Plan:
        """The plan on `device`, moved once so no unrolled step copies from the host."""
        return Plan([b.to(device) for b in self.batches],
                    [None if d is None else AugDraw(d.family, d.values.to(device)) for d in self.draws])


@dataclass
class MatchResult:
    loss: float
    grad_images: torch.Tensor | None = None
    grad_labels: torch.Tensor | None = None
    grad_lr: torch.Tensor | None = None

    @property
    def has_grad(self) -> bool:
        return self.grad_images is not None


def make_plan(n_syn: int, batch: int, n_steps: int, size: int, aug: AugConfig,
              generator: torch.Generator) -> Plan:
    """Batches are consecutive chunks of random permutations of the synthetic set (the last
    chunk of a permutation may be smaller), so no batch repeats an image; each step draws its aug.
    """
    from .augment import sample

    batches: list[torch.Tensor] = []
    while len(batches) < n_steps:
        batches += list(torch.randperm(n_syn, generator=generator).split(batch))
    batches = batches[:n_steps]
    draws = [sample(aug, len(b), size, generator) for b in batches]
    return Plan(batches, draws)


def _step_loss(fm: FlatModel, theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
               draw: AugDraw | None, aug: AugConfig) -> torch.Tensor:
    return soft_cross_entropy(fm(theta, apply(xb, draw, aug)), yb)


def _distance(theta: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (theta - target).pow(2).sum() / (start - target).pow(2).sum()


def _over(value: float, skip_above: float | None) -> bool:
    return not math.isfinite(value) or (skip_above is not None and value > skip_above)


def unroll(fm: FlatModel, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
           start: torch.Tensor, target: torch.Tensor, plan: Plan, aug: AugConfig,
           skip_above: float | None = None) -> MatchResult:
    """Reference gradient: plain autograd through every unrolled step."""
    plan = plan.to(images.device)  # a plan made on the CPU (make_plan's default) is fine
    x = images.detach().requires_grad_()
    y = labels.detach().requires_grad_()
    alpha = lr.detach().requires_grad_()
    with torch.enable_grad():
        theta = start.detach().requires_grad_()
        for idx, draw in zip(plan.batches, plan.draws):
            ce = _step_loss(fm, theta, x[idx], y[idx], draw, aug)
            (g,) = torch.autograd.grad(ce, theta, create_graph=True)
            theta = theta - alpha * g
        loss = _distance(theta, start, target)
        value = float(loss.detach())  # the iteration's one host sync
        if _over(value, skip_above):
            return MatchResult(value)
        gx, gy, ga = torch.autograd.grad(loss, [x, y, alpha])
    return MatchResult(value, gx, gy, ga)


def recompute(fm: FlatModel, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
              start: torch.Tensor, target: torch.Tensor, plan: Plan, aug: AugConfig,
              skip_above: float | None = None) -> MatchResult:
    """Exact gradient with activation memory independent of N (see the module docstring)."""
    plan = plan.to(images.device)  # a plan made on the CPU (make_plan's default) is fine
    x, y, alpha = images.detach(), labels.detach(), lr.detach()
    thetas = [start.detach()]
    with torch.enable_grad():
        for idx, draw in zip(plan.batches, plan.draws):
            theta = thetas[-1].requires_grad_()
            (g,) = torch.autograd.grad(_step_loss(fm, theta, x[idx], y[idx], draw, aug), theta)
            thetas[-1] = theta.detach()
            thetas.append((theta - alpha * g).detach())
    final = thetas.pop()
    loss = _distance(final, start, target)
    value = float(loss)  # the iteration's one host sync
    if _over(value, skip_above):
        return MatchResult(value)

    lam = 2 * (final - target) / (start - target).pow(2).sum()
    gx, gy = torch.zeros_like(x), torch.zeros_like(y)
    ga = torch.zeros_like(alpha)
    for i in reversed(range(len(plan.batches))):
        idx, draw = plan.batches[i], plan.draws[i]
        theta = thetas[i].requires_grad_()
        xb = x[idx].requires_grad_()
        yb = y[idx].requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(_step_loss(fm, theta, xb, yb, draw, aug), theta,
                                       create_graph=True)
            dot = (g * lam).sum()
            d_theta, d_xb, d_yb = torch.autograd.grad(dot, [theta, xb, yb])
        ga -= dot.detach()
        # The -alpha factor of dX, dY is applied once after the sweep: no per-step host sync.
        gx.index_add_(0, idx, d_xb)
        gy.index_add_(0, idx, d_yb)
        lam = lam - alpha * d_theta
        thetas[i] = None  # type: ignore[call-overload]  # free as we go
    return MatchResult(value, gx * -alpha, gy * -alpha, ga)


def match(mode: str, *args, **kwargs) -> MatchResult:
    """Dispatch to `recompute` (default) or `unroll`; both take the same arguments."""
    if mode not in MODES:
        raise ValueError(f"gradient mode must be one of {MODES}, got '{mode}'")
    return (recompute if mode == "recompute" else unroll)(*args, **kwargs)
