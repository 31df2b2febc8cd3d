"""datm.flat_minimum and GSAM experts: one step against a hand computation, SAM as a special
case, the adaptive radius, and deterministic GSAM training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_AUG, TINY_SPEC, blobs
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datm import artifacts
from datm.augment import AugConfig
from datm.experts import KIND, ExpertConfig, config_hash, expert_path, train_experts, train_group
from datm.flat_minimum import perturbation, surrogate_gap_direction
from datm.networks import FlatModel, build

CFG = ExpertConfig(num_experts=1, epochs=2, lr=0.05, batch=16, seed=0)
GSAM = dict(rho=0.05, alpha=0.3, adaptive=True)


@pytest.fixture
def float64():
    """Build networks and data in float64, so that a hand computation can match to ~1e-10."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def rows(seed: int, shape=(3, 40)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float64 (theta, g, g_p) stacks with rows of clearly different scales."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([[0.1], [1.0], [7.0]])
    return tuple(scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
                 for _ in range(3))


def hand_gsam_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float,
                   rho: float, alpha: float, adaptive: bool) -> torch.Tensor:
    """One GSAM step written out on an nn.Module with autograd, independently of datm."""
    params = list(net.parameters())
    w = parameters_to_vector(params).detach().clone()

    def gradient_at(vec: torch.Tensor) -> torch.Tensor:
        vector_to_parameters(vec, params)
        loss = F.cross_entropy(net(x), y)
        return parameters_to_vector(torch.autograd.grad(loss, params))

    g = gradient_at(w)
    if adaptive:
        e = rho * w * w * g / (torch.sqrt(((w * g) ** 2).sum()) + 1e-12)
    else:
        e = rho * g / (torch.sqrt((g ** 2).sum()) + 1e-12)
    g_p = gradient_at(w + e)
    g_par = torch.dot(g, g_p) / torch.dot(g_p, g_p) * g_p
    g_vert = g - g_par
    return w - lr * (g_p - alpha * g_vert)


@pytest.mark.parametrize("rho, alpha, adaptive, group", [
    (0.05, 0.3, True, 1), (0.05, 0.3, True, 2), (0.05, 0.3, False, 1), (0.05, 0.0, False, 1),
    (0.01, 2.0, True, 2)])
def test_one_train_group_step_equals_a_hand_computed_gsam_step(float64, rho, alpha, adaptive,
                                                               group):
    x, y = blobs(16, 3, channels=1, size=8, seed=3)
    x_test, y_test = blobs(6, 3, channels=1, size=8, seed=4)
    cfg = ExpertConfig(epochs=1, lr=0.1, batch=16, rho=rho, alpha=alpha, adaptive=adaptive)
    seeds = [11, 12][:group]
    fm = FlatModel(TINY_SPEC)
    # One full batch and no augmentation: exactly one step on a known batch (the loss is a mean,
    # so the shuffle inside the batch does not matter).
    traj, _ = train_group(fm, seeds, x, y, x_test, y_test, cfg, AugConfig(enabled=False))
    assert traj.dtype == torch.float64 and traj.shape == (group, 2, fm.num_params)
    for j, seed in enumerate(seeds):
        net = build(TINY_SPEC)
        vector_to_parameters(fm.init(seed), list(net.parameters()))
        assert torch.equal(traj[j, 0], parameters_to_vector(net.parameters()).detach())
        want = hand_gsam_step(net, x, y, cfg.lr, rho, alpha, adaptive)
        assert torch.allclose(traj[j, 1], want, rtol=0, atol=1e-10), \
            float((traj[j, 1] - want).abs().max())
        # the step is not a plain SGD step: the test would notice the GSAM part missing
        plain = hand_gsam_step(net, x, y, cfg.lr, 0.0, 0.0, False)
        assert (traj[j, 1] - plain).abs().max() > 1e-6


def test_alpha_zero_non_adaptive_is_sam():
    theta, g, g_p = rows(0)
    rho = 0.05
    e = perturbation(theta, g, rho, adaptive=False)
    for i in range(theta.shape[0]):  # SAM: rho * g / ||g||, each expert with its own norm
        assert torch.allclose(e[i], rho * g[i] / (g[i].norm() + 1e-12), rtol=1e-13, atol=0)
        assert e[i].norm().item() == pytest.approx(rho, rel=1e-10)
    assert torch.equal(surrogate_gap_direction(g, g_p, 0.0), g_p)


def test_adaptive_perturbation_formula():
    theta, g, _ = rows(1)
    rho = 0.01
    e = perturbation(theta, g, rho, adaptive=True)
    for i in range(theta.shape[0]):
        w, gi = theta[i], g[i]
        want = rho * w ** 2 * gi / ((w * gi).norm() + 1e-12)
        assert torch.allclose(e[i], want, rtol=1e-13, atol=0)
        assert e[i].norm().item() == pytest.approx(
            rho * (w ** 2 * gi).norm().item() / (w * gi).norm().item(), rel=1e-9)
        # in the coordinates scaled by |w| the radius is rho (up to the 1e-12 guard)
        assert (e[i] / w.abs()).norm().item() == pytest.approx(rho, rel=1e-9)
    assert not torch.allclose(e, perturbation(theta, g, rho, adaptive=False))
    # each row is perturbed on its own: stacking experts changes nothing
    assert torch.allclose(perturbation(theta[1:2], g[1:2], rho, True), e[1:2], rtol=1e-14)


def test_surrogate_gap_direction_formula():
    _, g, g_p = rows(2)
    alpha = 0.3
    d = surrogate_gap_direction(g, g_p, alpha)
    for i in range(g.shape[0]):
        g_vert = g[i] - (g[i] @ g_p[i]) / (g_p[i] @ g_p[i]) * g_p[i]
        assert abs(g_vert @ g_p[i]) < 1e-10 * g[i].norm() * g_p[i].norm()
        assert torch.allclose(d[i], g_p[i] - alpha * g_vert, rtol=0, atol=1e-12)
        # the surrogate-gap term leaves the descent on the perturbed loss unchanged
        assert (d[i] @ g_p[i]).item() == pytest.approx((g_p[i] @ g_p[i]).item(), rel=1e-12)
    # a zero perturbed gradient gives no direction and no NaN
    zero = surrogate_gap_direction(g, torch.zeros_like(g), alpha)
    assert torch.equal(zero, -alpha * g)


def trajectory(path: Path) -> torch.Tensor:
    return artifacts.load(path, KIND)[0]["trajectory"].clone()


def test_gsam_experts_are_deterministic_and_differ_from_sgd_and_sam(tmp_path, tiny_data):
    x, y, xt, yt = tiny_data

    def run(name: str, cfg: ExpertConfig) -> torch.Tensor:
        paths = train_experts(tmp_path / name, TINY_SPEC, x, y, xt, yt, cfg, TINY_AUG, "tiny")
        return trajectory(paths[0])

    gsam_cfg = replace(CFG, **GSAM)
    gsam = run("gsam", gsam_cfg)
    again = run("gsam_again", gsam_cfg)
    plain = run("sgd", CFG)
    sam = run("sam", replace(CFG, rho=GSAM["rho"]))
    assert torch.isfinite(gsam).all()
    assert torch.equal(gsam, again)
    assert torch.equal(gsam[0], plain[0])  # same init ...
    assert not torch.allclose(gsam[1:], plain[1:])  # ... other training
    assert not torch.allclose(gsam[1:], sam[1:])
    meta = artifacts.read_meta(expert_path(tmp_path / "gsam", 0), KIND)
    assert {k: meta["config"][k] for k in GSAM} == GSAM


def test_alpha_and_adaptive_change_the_hash():
    base = config_hash(TINY_SPEC, replace(CFG, rho=0.01), TINY_AUG, "d")
    assert config_hash(TINY_SPEC, replace(CFG, rho=0.01, alpha=0.3), TINY_AUG, "d") != base
    assert config_hash(TINY_SPEC, replace(CFG, rho=0.01, adaptive=True), TINY_AUG, "d") != base


@pytest.mark.parametrize("bad, key", [({"rho": -0.1}, "buffers.rho"),
                                      ({"alpha": -0.3}, "buffers.alpha"),
                                      ({"adaptive": "yes"}, "buffers.adaptive")])
def test_invalid_gsam_settings_are_refused(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ExpertConfig(**bad)
