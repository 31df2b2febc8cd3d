"""datm.zca: whitening is kornia's, invertible, whitens, is symmetric; disabled means identity.

And the model space built on it (data.to_model_space / to_pixels, the pipeline's zca step): with
ZCA on, whitened raw [0, 1] pixels without per-channel normalization, as the DATM reference.
"""

from __future__ import annotations

import helpers
import kornia
import numpy as np
import pytest
import torch

from datm import artifacts, data, evaluate, export, pipeline, zca
from datm.artifacts import ArtifactError
from datm.config import Params, Paths


def correlated(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random images with strongly correlated pixels and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    d = int(torch.tensor(shape).prod())
    mix = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(-1, 1, d)
    z = torch.randn(n, d, generator=g) * scales
    return (z @ mix + 3.0).view(n, *shape)


def pixel_images(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """uint8 images whose pixels are correlated, so the covariance spans eigenvalues both far
    above and below eps = 0.1 once scaled to [0, 1]."""
    return (torch.sigmoid(correlated(n, shape, seed) - 3.0) * 255).round().to(torch.uint8)


def sample_cov(flat: torch.Tensor) -> torch.Tensor:
    """Covariance with 1/(N-1), the definition kornia and datm fit with."""
    flat = flat.double()
    centred = flat - flat.mean(0)
    return centred.T @ centred / (flat.shape[0] - 1)


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


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 6, 6)])
def test_fit_equals_kornia_zca_whitening(shape):
    """kornia's ZCAWhitening(eps=0.1) is what the DATM reference fits: the same mean, transform
    and inverse, and the same whitened and de-whitened images."""
    x = pixel_images(200, shape, seed=5).double() / 255
    ours = zca.fit(x, eps=0.1, chunk=64)
    theirs = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(x)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:  # float32 storage against float64
        return (a.double() - b).abs().max() <= 1e-6 * b.abs().max()

    assert close(ours.mean, theirs.mean_vector.flatten())
    assert close(ours.matrix, theirs.transform_matrix)
    assert close(ours.inverse, theirs.transform_inv)
    white = theirs(x)
    assert close(ours.whiten(x), white)
    assert close(ours.dewhiten(white), theirs.inverse_transform(white))
    w = torch.randn(7, *shape, dtype=torch.float64)  # and off the training data
    assert close(ours.dewhiten(w), theirs.inverse_transform(w))


@pytest.mark.parametrize("eps", [1e-3, 0.1, 1.0])
def test_whitened_covariance_in_the_eigenbasis(eps):
    x = correlated(400, (1, 4, 4), seed=2)
    fitted = zca.fit(x, eps=eps)
    white = fitted.whiten(x).flatten(1)
    assert white.mean(0).abs().max() < 1e-3  # centred
    # cov of whitened data = cov (cov + eps)^-1: in the data's eigenbasis U (cov = U diag(s) U^T)
    # exactly diag(s / (s + eps)), all below 1.
    s, u = torch.linalg.eigh(sample_cov(x.flatten(1)))
    in_basis = u.T @ sample_cov(white) @ u
    assert torch.allclose(in_basis, torch.diag(s / (s + eps)), atol=1e-4)
    assert (s / (s + eps)).max() < 1


def test_small_eps_gives_near_identity_covariance():
    # well-conditioned but strongly rotated data: every eigenvalue of its covariance is O(1)
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    x = (torch.randn(400, 16, generator=g) * torch.linspace(1, 3, 16) @ q.T + 1.0).view(400, 1, 4, 4)
    assert sample_cov(x.flatten(1)).diagonal().std() > 0.1  # far from white to begin with
    white = zca.fit(x, eps=1e-4).whiten(x).flatten(1)
    cov = sample_cov(white)
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


def test_fit_on_uint8_with_scale_equals_fit_on_pixels():
    images = pixel_images(150, (3, 4, 4), seed=6)
    a = zca.fit(images, eps=0.1, chunk=16, scale=1 / 255)
    b = zca.fit(images.double() / 255, eps=0.1)
    for name in ("mean", "matrix", "inverse"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-6), name


def test_too_large_images_are_refused_before_any_work():
    with pytest.raises(ValueError, match="zca.enabled"):
        zca.fit(torch.zeros(2, 3, 128, 128))


def test_tiny_imagenet_dimension_is_allowed():
    # The reference whitens Tiny ImageNet (3x64x64 = 12288): shapes only, on the meta device.
    fitted = zca.fit(torch.zeros(2, 3, 64, 64, device="meta"), eps=0.1)
    assert fitted.matrix.shape == (12288, 12288) and fitted.matrix.device.type == "meta"


def test_saved_transform_says_it_was_fitted_on_pixels(tmp_path):
    path = zca.fit(correlated(20, (1, 2, 2)), eps=0.1).save(tmp_path / "zca.safetensors")
    assert artifacts.read_meta(path, zca.KIND)["space"] == "pixels"
    # one from before the space was recorded whitened normalized images: refuse it
    tensors, meta = artifacts.load(path, zca.KIND)
    del meta["space"]
    artifacts.save(path, tensors, zca.KIND, meta)
    with pytest.raises(ArtifactError, match="rerun the zca stage"):
        zca.ZCA.load(path)


# --- model space: data.to_model_space / to_pixels -----------------------------------------------

def stats_and_zca(images: torch.Tensor, enabled: bool) -> tuple[list[float], list[float], zca.ZCA]:
    mean, std = data.channel_stats(images)
    return mean, std, zca.fit(images, eps=0.1, scale=1 / 255) if enabled else zca.ZCA()


@pytest.mark.parametrize("enabled", [True, False])
def test_to_pixels_inverts_to_model_space(enabled):
    images = pixel_images(300, (3, 4, 4), seed=7)
    mean, std, fitted = stats_and_zca(images, enabled)
    x = data.to_model_space(images, mean, std, fitted)
    assert x.dtype == torch.float32 and x.shape == images.shape
    back = data.to_pixels(x, mean, std, fitted)
    assert torch.allclose(back, images.float() / 255, atol=1e-5)


def test_model_space_with_zca_is_whitened_raw_pixels():
    images = pixel_images(300, (3, 4, 4), seed=8)
    mean, std, fitted = stats_and_zca(images, True)
    x = data.to_model_space(images, mean, std, fitted)
    assert torch.equal(x, fitted.whiten(images.float() / 255))
    assert x.flatten(1).mean(0).abs().max() < 1e-4  # the whitening's own centring, per pixel
    # No per-channel normalization: the mean/std metadata plays no part, either way.
    other_mean, other_std = [m + 0.3 for m in mean], [3 * s for s in std]
    assert torch.equal(data.to_model_space(images, other_mean, other_std, fitted), x)
    assert torch.equal(data.to_pixels(x, other_mean, other_std, fitted),
                       data.to_pixels(x, mean, std, fitted))
    # (without ZCA it does: normalized per channel)
    off = data.to_model_space(images, mean, std, zca.ZCA())
    assert torch.allclose(off, data.normalize(images, mean, std))
    assert not torch.allclose(data.to_model_space(images, other_mean, other_std, zca.ZCA()), off)


# --- the pipeline's zca step and the sets it reads back -----------------------------------------

@pytest.fixture
def project(tmp_path) -> Paths:
    """Tiny 1x8x8 uint8 train/test splits, saved the way the download stage saves them."""
    paths = Paths(tmp_path)
    stats = None
    for path, n, seed in ((paths.train, 60, 0), (paths.test, 30, 100)):
        images, labels = helpers.learnable_uint8(n, 3, 1, 8, seed=seed)
        split = data.Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                           ["a", "b", "c"], "tiny-standin")
        stats = stats or data.channel_stats(split.images)
        split.mean, split.std = stats
        split.save(path, "train" if path == paths.train else "test")
    return paths


def test_zca_step_fits_on_raw_pixels(project):
    pipeline.fit_zca(Params.from_dict(helpers.tiny_params()), project)
    assert artifacts.read_meta(project.zca, zca.KIND)["space"] == "pixels"
    train = data.Split.load(project.train)
    fitted = zca.ZCA.load(project.zca)
    expected = zca.fit(train.images.double() / 255, eps=0.1)
    assert torch.allclose(fitted.matrix, expected.matrix, atol=1e-5)
    assert torch.allclose(fitted.mean, expected.mean, atol=1e-6)
    md = pipeline.model_data(project, torch.device("cpu"))
    assert md.x.flatten(1).mean(0).abs().max() < 1e-4  # fitted on the very space it whitens
    assert torch.allclose(md.x, fitted.whiten(train.images.float() / 255))
    assert torch.allclose(md.pixels(md.x) * 255, train.images.float(), atol=1e-3)


@pytest.mark.parametrize("fmt", ["safetensors", "png"])
def test_evaluate_from_reads_exports_back_into_the_pipelines_model_space(project, tmp_path,
                                                                        monkeypatch, fmt):
    """Lossless: the network inputs themselves. png: pixels, decoded and whitened by the run's
    ZCA, within the 8 bits of each image's range (the ZCA scales an error by at most
    (min eigenvalue + eps)^-1/2 <= eps^-1/2)."""
    params = Params.from_dict(helpers.tiny_params())
    pipeline.fit_zca(params, project)
    md = pipeline.model_data(project, torch.device("cpu"))
    x = md.x[:6] * 3  # pixels far outside [0, 1], as distilled sets have them
    pixels = data.to_pixels(x, md.mean, md.std, md.zca, clip=False)
    assert pixels.min() < -0.5 and pixels.max() > 1.5
    folder = export.export(x, pixels, torch.eye(3).repeat(2, 1), 0.01, md.classes,
                           tmp_path / "export", fmt, {})
    seen = []

    def fake_evaluate_set(spec, x, *args, **kwargs):
        seen.append(x)
        return {"mean": 0.0, "std": 0.0, "accs": [], "seconds": [0.0]}

    monkeypatch.setattr(evaluate, "evaluate_set", fake_evaluate_set)
    pipeline.evaluate_from(params, project, folder)
    if fmt == "safetensors":
        assert torch.equal(seen[0], x)
    else:
        step = float(((pixels.flatten(1).amax(1) - pixels.flatten(1).amin(1)) / 510).max())
        bound = step * pixels[0].numel() ** 0.5 / params.zca.eps ** 0.5
        assert (seen[0] - x).abs().max() < bound
        assert not torch.equal(seen[0], x)  # 8 bits: close, not equal
