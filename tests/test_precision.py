"""datm.precision: the numerics contexts of the matching computation."""

from __future__ import annotations

import pytest
import torch

from datm.augment import AugConfig
from datm.distill import DistillConfig
from datm.matching import make_plan, match
from datm.networks import FlatModel, NetSpec
from datm.precision import numerics


def _gradients(precision: str | None) -> torch.Tensor:
    spec = NetSpec(channels=1, num_classes=3, im_size=8, width=8, depth=2)
    fm = FlatModel(spec).train(True)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 3, generator=g)
    start = fm.init(0)
    target = start + 0.05 * (fm.init(1) - start)
    plan = make_plan(6, 3, 4, 8, AugConfig(), g)
    args = (fm, images, labels, torch.tensor(0.05), start, target, plan, AugConfig())
    if precision is None:
        return match("recompute", *args).grad_images
    with numerics(precision, "cpu"):
        return match("recompute", *args).grad_images


def test_float32_and_tf32_change_nothing_on_cpu():
    plain = _gradients(None)
    assert torch.equal(_gradients("float32"), plain)
    assert torch.equal(_gradients("tf32"), plain)  # TF32 exists only on CUDA


def test_bf16_autocast_is_used_and_stays_close():
    plain, bf16 = _gradients(None), _gradients("bf16")
    assert not torch.equal(bf16, plain)  # autocast really ran the network in bf16
    cos = torch.nn.functional.cosine_similarity(bf16.flatten(), plain.flatten(), dim=0)
    assert cos > 0.9


def test_cuda_flags_are_restored_even_after_an_error():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    from datm.precision import _cuda_tf32

    with pytest.raises(RuntimeError), _cuda_tf32(not saved[0]):
        assert torch.backends.cuda.matmul.allow_tf32 is (not saved[0])
        raise RuntimeError
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        numerics("fp8", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        DistillConfig(ipc=1, precision="half")
