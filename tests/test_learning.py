"""Tests behind the learning itself: the distiller's update step against a hand-computed oracle,
and, on a tiny problem with fixed seeds, that distillation lowers the matching loss and makes a
set that trains better than its own initialization and than random real images.

Breaks tried (each fails a test here): momentum 0.9 for the images, the image step with `+`,
lr_y scaling the images, labels updated with learn_labels off, the distiller skipping its
update (`has_grad` ignored), and the matching gradient's sign flipped in datm/matching.py.
"""

from __future__ import annotations

from dataclasses import replace

import helpers
import pytest
import torch

from datm import evaluate
from datm.augment import AugConfig
from datm.config import DistillConfig, EvalConfig, ExpertConfig
from datm.distill import Distiller
from datm.experts import ExpertBuffer, train_experts
from datm.matching import MatchResult
from datm.networks import NetSpec

# --- the update step ------------------------------------------------------------------------


def _distiller(tiny_buffer, tiny_data, **cfg) -> Distiller:
    x, y, _, _ = tiny_data
    base = DistillConfig(ipc=2, syn_steps=2, expert_epochs=1, max_start_epoch=3, batch_syn=4,
                         lr_img=10.0, lr_y=2.0, lr_lr=1e-3, iterations=2, threshold=1e9)
    return Distiller.create(replace(base, **cfg), tiny_buffer, x, y, helpers.TINY_AUG)


def test_the_update_is_sgd_with_momentum_05_05_09_and_its_own_lr_per_tensor(tiny_buffer,
                                                                           tiny_data,
                                                                           monkeypatch):
    """docs/METHOD.md, "The three optimizers": images SGD(lr_img, momentum 0.5), the learned lr
    SGD(lr_lr, momentum 0.5), labels SGD(lr_y, momentum 0.9); two steps by hand."""
    d = _distiller(tiny_buffer, tiny_data, lr_img=3.0, lr_y=7.0, lr_lr=0.01)
    x0, y0, a0 = d.images.clone(), d.labels.clone(), d.lr.clone()
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(x0.shape, generator=gen), torch.randn(y0.shape, generator=gen),
              torch.randn((), generator=gen)) for _ in range(2)]
    feed = iter(grads)

    def fake_match(*args, **kwargs):
        gx, gy, ga = next(feed)
        return MatchResult(0.5, gx, gy, ga)

    monkeypatch.setattr("datm.distill.match", fake_match)
    d.step()
    d.step()
    (gx1, gy1, ga1), (gx2, gy2, ga2) = grads
    x1 = x0 - 3.0 * gx1
    x2 = x1 - 3.0 * (0.5 * gx1 + gx2)
    y1 = y0 - 7.0 * gy1
    y2 = y1 - 7.0 * (0.9 * gy1 + gy2)
    a1 = a0 - 0.01 * ga1
    a2 = a1 - 0.01 * (0.5 * ga1 + ga2)
    assert torch.allclose(d.images, x2, atol=1e-6)
    assert torch.allclose(d.labels, y2, atol=1e-6)
    assert torch.allclose(d.lr, a2, atol=1e-7)


def test_frozen_labels_do_not_move_and_a_skipped_iteration_changes_nothing(tiny_buffer,
                                                                         tiny_data, monkeypatch):
    d = _distiller(tiny_buffer, tiny_data, learn_labels=False)
    y0 = d.labels.clone()
    monkeypatch.setattr("datm.distill.match", lambda *a, **k: MatchResult(
        0.5, torch.ones_like(d.images), torch.ones_like(d.labels), torch.tensor(1.0)))
    d.step()
    assert torch.equal(d.labels, y0) and not torch.equal(d.images, d.images * 0 + 1)
    x1, a1 = d.images.clone(), d.lr.clone()
    monkeypatch.setattr("datm.distill.match", lambda *a, **k: MatchResult(2.0))  # skipped
    d.step()
    assert torch.equal(d.images, x1) and torch.equal(d.lr, a1) and d.skipped == 1


# --- distillation learns ---------------------------------------------------------------------

SPEC = NetSpec(channels=1, num_classes=3, im_size=8, width=8, depth=2)
AUG = AugConfig(enabled=False)  # a deterministic, easy-to-read problem
EVAL = EvalConfig(models=3, epochs=30, batch=64, lr_scale=1.0, augment=False, seed=0)


@pytest.fixture(scope="module")
def hard_blobs(tmp_path_factory):
    """3 classes of 1x8x8 images: a fixed pattern per class under heavy noise (std 2 against
    the pattern's 1), so that one real image is a poor stand-in for its class; experts trained
    on 600 of them (SGD, 6 epochs)."""
    x, y = helpers.blobs(1200, 3, channels=1, size=8, seed=3, noise=2.0)
    x_train, y_train, x_test, y_test = x[:600], y[:600], x[600:], y[600:]
    out = tmp_path_factory.mktemp("hard-blobs-experts")
    cfg = ExpertConfig(num_experts=3, epochs=6, lr=0.05, batch=32, seed=0)
    train_experts(out, SPEC, x_train, y_train, x_test, y_test, cfg, AUG, data_id="hard-blobs")
    return x_train, y_train, x_test, y_test, ExpertBuffer.open(out)


def _accuracy(x, targets, lr, data) -> float:
    return evaluate.evaluate_set(SPEC, x, targets, lr, EVAL.epochs, EVAL.models, EVAL, AUG,
                                 data[2], data[3], EVAL.seed)["mean"]


@pytest.mark.slow
def test_distillation_lowers_the_loss_and_beats_its_init_and_random_real(hard_blobs):
    """IPC 1 from random real images (init real, hard labels: any gain is the images'), 100
    iterations: the matching loss falls by a third, and the set beats its own initial images
    and random real subsets of the same size (the mean of three draws), trained the same way,
    by more than 10 points each (measured: 77.3 % against 59.4 and 61.5, torch 2.15)."""
    x, y, _, _, buffer = hard_blobs
    cfg = DistillConfig(ipc=1, syn_steps=10, expert_epochs=1, min_start_epoch=0,
                        max_start_epoch=3, batch_syn=3, lr_img=30.0, lr_lr=1e-5,
                        iterations=100, threshold=10.0, init="real", labels="hard",
                        learn_labels=False, seed=0)
    d = Distiller.create(cfg, buffer, x, y, AUG)
    init_images, labels = d.images.clone(), d.labels.clone()
    losses = [d.step()["loss"] for _ in range(cfg.iterations)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 2 / 3 * first, (first, last)
    lr = float(d.lr)
    distilled = _accuracy(d.images, labels, lr, hard_blobs)
    initial = _accuracy(init_images, labels, lr, hard_blobs)
    draws = [evaluate.random_subset(y, 1, 3, seed=s) for s in (11, 12, 13)]
    random_real = sum(_accuracy(x[i], y[i], lr, hard_blobs) for i in draws) / len(draws)
    assert distilled > initial + 0.10, (distilled, initial)
    assert distilled > random_real + 0.10, (distilled, random_real)
