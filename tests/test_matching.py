"""datm.matching: `unroll` is the true gradient, `recompute` equals it (float64, tiny ConvNet)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from datm.augment import AugConfig
from datm.matching import MatchResult, Plan, make_plan, match, recompute, unroll
from datm.networks import FlatModel, NetSpec

AUG = AugConfig()  # all six families, drawn per step
NUM_CLASSES = 3


@dataclass
class Problem:
    fm: FlatModel
    images: torch.Tensor
    labels: torch.Tensor
    lr: torch.Tensor
    start: torch.Tensor
    target: torch.Tensor
    plan: Plan

    def args(self, **changed):
        values = {"images": self.images, "labels": self.labels, "lr": self.lr, **changed}
        return (self.fm, values["images"], values["labels"], values["lr"], self.start,
                self.target, self.plan, AUG)


def problem(seed: int = 0, n_syn: int = 5, batch: int = 2, steps: int = 3,
            norm: str = "instance") -> Problem:
    """A random float64 matching problem; the target is where real training would lead."""
    spec = NetSpec(channels=1, num_classes=NUM_CLASSES, im_size=8, width=4, depth=2, norm=norm)
    fm = FlatModel(spec)
    fm.module.double()
    g = torch.Generator().manual_seed(seed)
    start = fm.init(seed).double()
    target = fm.init(seed + 1000).double() * 0.3 + start * 0.7
    images = torch.randn(n_syn, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randn(n_syn, NUM_CLASSES, generator=g, dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64)
    plan = make_plan(n_syn, batch, steps, 8, AUG, g)
    return Problem(fm, images, labels, lr, start, target, plan)


def loss_of(p: Problem, **changed) -> float:
    return unroll(*p.args(**changed)).loss


def test_plan_is_well_formed_and_seeded():
    aug = AugConfig()
    a = make_plan(7, 3, 10, 8, aug, torch.Generator().manual_seed(1))
    b = make_plan(7, 3, 10, 8, aug, torch.Generator().manual_seed(1))
    assert len(a.batches) == len(a.draws) == 10
    for x, y in zip(a.batches, b.batches):
        assert torch.equal(x, y)
        assert x.min() >= 0 and x.max() < 7
    # chunks of one permutation, as MTT/DATM: 3, 3, then the remaining 1, then a new permutation
    assert [x.numel() for x in a.batches] == [3, 3, 1, 3, 3, 1, 3, 3, 1, 3]
    for x, y in zip(a.draws, b.draws):
        assert x.family == y.family and torch.equal(x.values, y.values)
        assert x.values.shape[0] in (1, 3)
    # every permutation covers each image exactly once: 3 permutations in the first 9 steps
    seen = torch.cat(a.batches[:9]).bincount(minlength=7)
    assert torch.equal(seen, torch.full((7,), 3))
    # a batch larger than the set is the whole set
    whole = make_plan(4, 100, 2, 8, aug, torch.Generator().manual_seed(0))
    assert all(sorted(b.tolist()) == [0, 1, 2, 3] for b in whole.batches)
    # augmentation off: no draws
    off = make_plan(4, 2, 3, 8, AugConfig(enabled=False), torch.Generator().manual_seed(0))
    assert off.draws == [None, None, None]


@pytest.mark.parametrize("n_syn,batch", [(7, 3), (100, 30), (10, 4)])
def test_plan_batches_never_repeat_an_image(n_syn, batch):
    """A mini-batch is drawn without replacement (MTT/DATM: chunks of a permutation)."""
    for seed in range(10):
        plan = make_plan(n_syn, batch, 12, 8, AugConfig(enabled=False),
                         torch.Generator().manual_seed(seed))
        for step, idx in enumerate(plan.batches):
            assert idx.unique().numel() == idx.numel(), (seed, step, idx.tolist())


def test_plan_uses_augmentation():
    p = problem(seed=3, steps=7)
    assert all(d is not None for d in p.plan.draws)


# --- (a) unroll against central finite differences --------------------------------------------

def _central_difference(p: Problem, name: str, index: tuple, h: float) -> float:
    base = getattr(p, name)
    plus, minus = base.clone(), base.clone()
    plus[index] += h
    minus[index] -= h
    return (loss_of(p, **{name: plus}) - loss_of(p, **{name: minus})) / (2 * h)


@pytest.mark.parametrize("seed", [0, 1])
def test_unroll_gradients_match_finite_differences(seed):
    p = problem(seed=seed, n_syn=4, batch=3, steps=3)
    result = unroll(*p.args())
    assert result.has_grad and 0 < result.loss < 10
    g = torch.Generator().manual_seed(100 + seed)
    checks = []
    for _ in range(4):
        index = tuple(int(torch.randint(s, (1,), generator=g)) for s in p.images.shape)
        checks.append(("images", index, result.grad_images[index]))
    for _ in range(3):
        index = tuple(int(torch.randint(s, (1,), generator=g)) for s in p.labels.shape)
        checks.append(("labels", index, result.grad_labels[index]))
    checks.append(("lr", (), result.grad_lr))
    for name, index, analytic in checks:
        numeric = _central_difference(p, name, index, h=1e-6)
        assert float(analytic) == pytest.approx(numeric, rel=1e-4, abs=1e-9), (name, index)
    # the gradients are not trivially zero
    assert result.grad_images.abs().max() > 1e-6 and result.grad_labels.abs().max() > 1e-6
    assert abs(float(result.grad_lr)) > 1e-6


def test_unroll_gradient_shapes_and_dtypes():
    p = problem()
    result = unroll(*p.args())
    assert result.grad_images.shape == p.images.shape
    assert result.grad_labels.shape == p.labels.shape
    assert result.grad_lr.shape == p.lr.shape
    assert result.grad_images.dtype == torch.float64


def test_unroll_loss_is_the_normalized_distance():
    """loss = ||theta_N - target||^2 / ||theta_0 - target||^2, with plain SGD steps."""
    from datm.augment import apply
    from datm.networks import soft_cross_entropy

    p = problem(seed=5)
    theta = p.start.clone()
    for idx, d in zip(p.plan.batches, p.plan.draws):
        theta = theta.requires_grad_()
        ce = soft_cross_entropy(p.fm(theta, apply(p.images[idx], d, AUG)), p.labels[idx])
        (g,) = torch.autograd.grad(ce, theta)
        theta = (theta - p.lr * g).detach()
    expected = float((theta - p.target).pow(2).sum() / (p.start - p.target).pow(2).sum())
    assert unroll(*p.args()).loss == pytest.approx(expected, rel=1e-10)
    assert recompute(*p.args()).loss == pytest.approx(expected, rel=1e-10)


# --- (b) recompute equals unroll ---------------------------------------------------------------

def assert_same(a: MatchResult, b: MatchResult, rtol: float = 1e-8) -> None:
    assert a.has_grad and b.has_grad
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    for name in ("grad_images", "grad_labels", "grad_lr"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape
        scale = float(y.abs().max())
        assert scale > 0, name
        assert torch.allclose(x, y, rtol=rtol, atol=rtol * scale), (
            name, float((x - y).abs().max()), scale)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_syn,batch,steps", [(1, 1, 3), (5, 2, 1), (5, 2, 3), (7, 3, 7)])
def test_recompute_equals_unroll(seed, n_syn, batch, steps):
    p = problem(seed=seed, n_syn=n_syn, batch=batch, steps=steps)
    assert_same(recompute(*p.args()), unroll(*p.args()))


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_recompute_equals_unroll_other_norms(norm, seed):
    p = problem(seed=seed, n_syn=5, batch=3, steps=4, norm=norm)
    assert_same(recompute(*p.args()), unroll(*p.args()))


def test_recompute_does_not_modify_its_inputs():
    p = problem(seed=4)
    before = [t.clone() for t in (p.images, p.labels, p.lr, p.start, p.target)]
    recompute(*p.args())
    unroll(*p.args())
    for old, new in zip(before, (p.images, p.labels, p.lr, p.start, p.target)):
        assert torch.equal(old, new)
        assert not new.requires_grad


# --- (c) skipping -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [unroll, recompute])
def test_skip_above_below_the_loss_returns_no_gradient(method):
    p = problem(seed=6)
    full = method(*p.args())
    assert full.has_grad
    skipped = method(*p.args(), skip_above=full.loss / 2)
    assert not skipped.has_grad
    assert skipped.grad_labels is None and skipped.grad_lr is None
    assert skipped.loss == pytest.approx(full.loss, rel=1e-12)
    kept = method(*p.args(), skip_above=full.loss * 2)
    assert kept.has_grad and kept.loss == pytest.approx(full.loss, rel=1e-12)


def test_both_methods_skip_the_same_way():
    p = problem(seed=7)
    threshold = unroll(*p.args()).loss * 0.9
    a = unroll(*p.args(), skip_above=threshold)
    b = recompute(*p.args(), skip_above=threshold)
    assert not a.has_grad and not b.has_grad
    assert a.loss == pytest.approx(b.loss, rel=1e-12)


@pytest.mark.parametrize("method", [unroll, recompute])
def test_non_finite_loss_returns_no_gradient(method):
    p = problem(seed=8)
    p.target = p.start.clone()  # 0 / 0
    result = method(*p.args())
    assert not result.has_grad
    assert result.loss != result.loss or result.loss in (float("inf"), float("-inf"))


# --- (d) dispatch -------------------------------------------------------------------------------

def test_match_rejects_unknown_mode():
    p = problem()
    with pytest.raises(ValueError, match="bogus"):
        match("bogus", *p.args())


def test_match_dispatches_to_both_modes():
    p = problem(seed=9)
    assert_same(match("unroll", *p.args()), unroll(*p.args()), rtol=0)
    assert_same(match("recompute", *p.args()), recompute(*p.args()), rtol=0)
