"""datm.zca: whitening is invertible, whitens, is symmetric; disabled means identity."""

from __future__ import annotations

import pytest
import torch

from datm import zca


def correlated(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random images with strongly correlated pixels and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    d = int(torch.tensor(shape).prod())
    mix = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(-1, 1, d)
    z = torch.randn(n, d, generator=g) * scales
    return (z @ mix + 3.0).view(n, *shape)


def population_cov(flat: torch.Tensor) -> torch.Tensor:
    flat = flat.double()
    centred = flat - flat.mean(0)
    return centred.T @ centred / flat.shape[0]


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 4), (3, 8, 8)])
def test_dewhiten_inverts_whiten(shape):
    x = correlated(300, shape)
    fitted = zca.fit(x, eps=0.1)
    white = fitted.whiten(x)
    assert white.shape == x.shape
    back = fitted.dewhiten(white)
    assert back.shape == x.shape
    rel = (back - x).norm() / x.norm()
    assert rel < 1e-4, rel
    # and the other way round, on arbitrary inputs in whitened space
    w = torch.randn(5, *shape)
    rel = (fitted.whiten(fitted.dewhiten(w)) - w).norm() / w.norm()
    assert rel < 1e-4, rel


def test_transform_is_symmetric_and_inverse_is_inverse():
    fitted = zca.fit(correlated(200, (3, 4, 4), seed=1), eps=0.05)
    d = 48
    assert fitted.mean.shape == (d,)
    assert fitted.matrix.shape == (d, d) and fitted.inverse.shape == (d, d)
    assert torch.allclose(fitted.matrix, fitted.matrix.T, atol=1e-5 * fitted.matrix.abs().max())
    assert torch.allclose(fitted.inverse, fitted.inverse.T,
                          atol=1e-5 * fitted.inverse.abs().max())
    product = fitted.matrix.double() @ fitted.inverse.double()
    assert torch.allclose(product, torch.eye(d, dtype=torch.float64), atol=1e-4)
    # positive definite (a ZCA transform is the inverse square root of cov + eps I)
    assert torch.linalg.eigvalsh(fitted.matrix.double()).min() > 0


@pytest.mark.parametrize("eps", [1e-3, 0.1, 1.0])
def test_whitened_covariance_eigenvalues(eps):
    x = correlated(400, (1, 4, 4), seed=2)
    fitted = zca.fit(x, eps=eps)
    white = fitted.whiten(x).flatten(1)
    assert white.mean(0).abs().max() < 1e-3  # centred
    evals = torch.linalg.eigvalsh(population_cov(white))
    # cov of whitened data = cov (cov + eps)^-1: eigenvalues lambda / (lambda + eps) < 1
    assert evals.max() <= 1 + 1e-4
    assert evals.min() >= -1e-6
    # and they are exactly lambda / (lambda + eps) for the data's eigenvalues lambda
    lam = torch.linalg.eigvalsh(population_cov(x.flatten(1)))
    assert torch.allclose(evals, lam / (lam + eps), atol=1e-4)


def test_small_eps_gives_near_identity_covariance():
    # well-conditioned but strongly rotated data: every eigenvalue of its covariance is O(1)
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    x = (torch.randn(400, 16, generator=g) * torch.linspace(1, 3, 16) @ q.T + 1.0).view(400, 1, 4, 4)
    assert population_cov(x.flatten(1)).diagonal().std() > 0.1  # far from white to begin with
    white = zca.fit(x, eps=1e-4).whiten(x).flatten(1)
    cov = population_cov(white)
    assert torch.allclose(cov, torch.eye(16, dtype=torch.float64), atol=1e-3)


def test_fit_is_independent_of_chunk_size():
    x = correlated(100, (1, 4, 4), seed=4)
    a, b = zca.fit(x, eps=0.1), zca.fit(x, eps=0.1, chunk=7)
    assert torch.allclose(a.matrix, b.matrix, atol=1e-5)
    assert torch.allclose(a.mean, b.mean, atol=1e-6)


def test_whiten_keeps_dtype_and_device_of_input():
    fitted = zca.fit(correlated(50, (1, 4, 4)), eps=0.1)
    x = correlated(3, (1, 4, 4)).double()
    assert fitted.whiten(x).dtype == torch.float64
    assert fitted.dewhiten(x).dtype == torch.float64


def test_whiten_is_differentiable():
    fitted = zca.fit(correlated(50, (1, 4, 4)), eps=0.1)
    x = correlated(3, (1, 4, 4), seed=9).requires_grad_()
    fitted.whiten(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_disabled_is_identity():
    identity = zca.ZCA()
    assert not identity.enabled
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(identity.whiten(x), x)
    assert torch.equal(identity.dewhiten(x), x)


def test_too_large_images_are_refused_before_any_work():
    with pytest.raises(ValueError, match="zca.enabled"):
        zca.fit(torch.zeros(2, 3, 64, 64))
