"""Test-wide settings: one intra-op thread (tiny tensors; a busy 2-core CPU), tiny fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from every test

# Tiny tensors gain nothing from a second thread, and on a loaded 2-core machine the thread
# hand-offs cost ~100x the work itself.
torch.set_num_threads(1)

import helpers  # noqa: E402
from helpers import TINY_AUG, TINY_SPEC  # noqa: E402

from datm.experts import ExpertBuffer, ExpertConfig, train_experts  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data():
    """(x, y, x_test, y_test): 64 + 30 learnable 1x8x8 images of 3 classes, float32."""
    x, y = helpers.blobs(94, 3, channels=1, size=8, seed=0)
    return x[:64], y[:64], x[64:], y[64:]


@pytest.fixture(scope="session")
def tiny_buffer(tmp_path_factory, tiny_data):
    """Three 5-epoch experts on `tiny_data` (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("buffer")
    cfg = ExpertConfig(num_experts=3, epochs=5, lr=0.05, batch=16, seed=0)
    x, y, xt, yt = tiny_data
    train_experts(out, TINY_SPEC, x, y, xt, yt, cfg, TINY_AUG, data_id="tiny")
    return ExpertBuffer.open(out)
