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

On W ranks (`group`, datm/distributed.py) `recompute` computes the same iteration. Each step's
batch b_i is cut into W contiguous parts b_i^r; the step loss is a MEAN over b_i, so rank r's
part is weighted by |b_i^r| / |b_i| and the parts' gradients sum to the batch gradient:

      g_i = sum_r g_i^r                      (all-reduce g, then the same SGD step everywhere)
      lambda_i = lambda_{i+1} - alpha * sum_r H_i^r lambda_{i+1}   (all-reduce d_theta)
      dalpha  += -sum_r g_i^r . lambda_{i+1}  (summed locally over i, all-reduced once)
      dX[b_i^r] on rank r only                (each image is in one part: all-reduced once)

so every rank holds the same theta_i, loss and skip decision (checked), and the same gradients,
equal to one process's up to float rounding. The augmentation draw is per image, so it splits
with the batch; batch norm is not (its statistics couple a batch), so it is refused for W > 1,
as is `unroll` (its graph would need a differentiable all-reduce).

Both return the loss before any backward work, so a sample over the skip threshold costs only
its forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .augment import AugConfig, AugDraw, apply
from .config import MODES
from .distributed import SINGLE, Group, shard_range
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


def _part(idx: torch.Tensor, draw: AugDraw | None,
          group: Group) -> tuple[torch.Tensor, AugDraw | None, float]:
    """This rank's part of one step's batch, its draw, and its weight |b^r| / |b| in the mean."""
    if group.world == 1:
        return idx, draw, 1.0
    part = shard_range(len(idx), group.rank, group.world)
    mine = idx[part]
    return (mine, None if draw is None else AugDraw(draw.family, draw.values[part]),
            len(mine) / len(idx))


def _part_loss(fm: FlatModel, theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
               draw: AugDraw | None, aug: AugConfig, weight: float) -> torch.Tensor:
    ce = _step_loss(fm, theta, xb, yb, draw, aug)
    return ce if weight == 1.0 else ce * weight


def _check_group(fm: FlatModel, group: Group) -> None:
    if group.world > 1 and fm.spec.norm == "batch":
        raise ValueError("batch norm couples the images of a mini-batch, so a batch split across "
                         f"{group.world} ranks would change the loss: use one process, or "
                         "norm instance / none")


def _distance(theta: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (theta - target).pow(2).sum() / (start - target).pow(2).sum()


def _over(value: float, skip_above: float | None) -> bool:
    return not math.isfinite(value) or (skip_above is not None and value > skip_above)


def unroll(fm: FlatModel, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
           start: torch.Tensor, target: torch.Tensor, plan: Plan, aug: AugConfig,
           skip_above: float | None = None, group: Group = SINGLE) -> MatchResult:
    """Reference gradient: plain autograd through every unrolled step (one process only)."""
    if group.world > 1:
        raise ValueError(f"gradient mode 'unroll' runs in one process, not {group.world}: "
                         "use mode 'recompute' (the same gradient) with several processes")
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
              skip_above: float | None = None, group: Group = SINGLE) -> MatchResult:
    """Exact gradient with activation memory independent of N (see the module docstring);
    on `group`'s W ranks each computes its part of every batch (ditto)."""
    _check_group(fm, group)
    plan = plan.to(images.device)  # a plan made on the CPU (make_plan's default) is fine
    x, y, alpha = images.detach(), labels.detach(), lr.detach()
    thetas = [start.detach()]
    with torch.enable_grad():
        for idx, draw in zip(plan.batches, plan.draws):
            idx, draw, weight = _part(idx, draw, group)
            theta = thetas[-1].requires_grad_()
            if len(idx):
                (g,) = torch.autograd.grad(
                    _part_loss(fm, theta, x[idx], y[idx], draw, aug, weight), theta)
            else:  # a batch smaller than W leaves some ranks without images
                g = torch.zeros_like(theta)
            g = group.all_reduce_sum(g)
            thetas[-1] = theta.detach()
            thetas.append((theta - alpha * g).detach())
    final = thetas.pop()
    loss = _distance(final, start, target)
    value = float(loss)  # the iteration's one host sync
    # Equal thetas give equal losses, so equal skip decisions; checked, as a rank that took
    # another branch would deadlock the next collective.
    group.check_same("the matching loss", loss)
    if _over(value, skip_above):
        return MatchResult(value)

    lam = 2 * (final - target) / (start - target).pow(2).sum()
    gx, gy = torch.zeros_like(x), torch.zeros_like(y)
    ga = torch.zeros_like(alpha)
    for i in reversed(range(len(plan.batches))):
        idx, draw, weight = _part(plan.batches[i], plan.draws[i], group)
        theta = thetas[i].requires_grad_()
        if len(idx):
            xb = x[idx].requires_grad_()
            yb = y[idx].requires_grad_()
            with torch.enable_grad():
                (g,) = torch.autograd.grad(_part_loss(fm, theta, xb, yb, draw, aug, weight),
                                           theta, create_graph=True)
                dot = (g * lam).sum()
                d_theta, d_xb, d_yb = torch.autograd.grad(dot, [theta, xb, yb])
            ga -= dot.detach()
            # The -alpha factor of dX, dY is applied once after the sweep: no per-step host sync.
            gx.index_add_(0, idx, d_xb)
            gy.index_add_(0, idx, d_yb)
        else:
            d_theta = torch.zeros_like(theta)
        # H_i lambda is the sum of the ranks' parts; the next step's adjoint needs all of it.
        lam = lam - alpha * group.all_reduce_sum(d_theta)
        thetas[i] = None  # type: ignore[call-overload]  # free as we go
    gx, gy, ga = _sum_over_ranks(group, gx, gy, ga)
    return MatchResult(value, gx * -alpha, gy * -alpha, ga)


def _sum_over_ranks(group: Group, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over the ranks, in one collective (one flat buffer)."""
    if group.world == 1:
        return list(tensors)
    flat = group.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    parts = flat.split([t.numel() for t in tensors])
    return [part.view_as(t).to(t.dtype) for part, t in zip(parts, tensors)]


def match(mode: str, *args, **kwargs) -> MatchResult:
    """Dispatch to `recompute` (default) or `unroll`; both take the same arguments (`group`
    included: default one process)."""
    if mode not in MODES:
        raise ValueError(f"gradient mode must be one of {MODES}, got '{mode}'")
    return (recompute if mode == "recompute" else unroll)(*args, **kwargs)
