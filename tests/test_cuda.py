"""On CUDA: the matching gradient, resume and the precision switch behave as on the CPU.

Skipped without a GPU, except the check that `datm.precision.numerics` sets and restores the
process-wide TF32 flags, which needs none (the flags are plain settings until a kernel runs).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import TINY_AUG

from datm.augment import AugConfig
from datm.distill import DistillConfig, Distiller
from datm.matching import make_plan, recompute, unroll
from datm.networks import FlatModel, NetSpec
from datm.precision import numerics

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --- recompute == unroll in float64 ---------------------------------------------------------------

def problem(device: torch.device, seed: int, norm: str, n_syn: int = 7, batch: int = 3,
            steps: int = 5) -> tuple:
    """A random float64 matching problem on `device` (as tests/test_matching.py's)."""
    spec = NetSpec(channels=1, num_classes=3, im_size=8, width=4, depth=2, norm=norm)
    fm = FlatModel(spec, device)
    fm.module.double()
    g = torch.Generator().manual_seed(seed)
    start = fm.init(seed).double()
    target = fm.init(seed + 1000).double() * 0.3 + start * 0.7
    images = torch.randn(n_syn, 1, 8, 8, generator=g, dtype=torch.float64).to(device)
    labels = torch.randn(n_syn, 3, generator=g, dtype=torch.float64).to(device)
    lr = torch.tensor(0.1, dtype=torch.float64, device=device)
    plan = make_plan(n_syn, batch, steps, 8, AugConfig(), g)  # on the CPU: match moves it
    return fm, images, labels, lr, start, target, plan, AugConfig()


@needs_cuda
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_recompute_equals_unroll_on_cuda_in_float64(norm, seed):
    """Same tolerance as on the CPU (1e-8 relative): in float64 the two methods differ only by
    summation order, which on a GPU (atomics in cuDNN backward and index_add_) is ~1e-15."""
    args = problem(CUDA, seed, norm)
    a, b = recompute(*args), unroll(*args)
    assert a.has_grad and b.has_grad
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    for name in ("grad_images", "grad_labels", "grad_lr"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.device.type == "cuda" and x.dtype == torch.float64, name
        scale = float(y.abs().max())
        assert scale > 0, name
        assert torch.allclose(x, y, rtol=1e-8, atol=1e-8 * scale), (
            name, float((x - y).abs().max()), scale)


# --- resume on CUDA ----------------------------------------------------------------------------

CFG = DistillConfig(ipc=2, syn_steps=2, expert_epochs=1, min_start_epoch=0, sg_start=1,
                    max_start_epoch=3, sg_end=3, batch_syn=4, lr_img=10.0, lr_y=2.0,
                    lr_lr=1e-3, iterations=6, threshold=10.0, checkpoint_every=2, seed=0)


@needs_cuda
def test_distill_resumed_on_cuda_ends_as_the_uninterrupted_run(tmp_path, tiny_buffer, tiny_data):
    """A checkpoint holds the exact float32 state and the (CPU) generator, so on the CPU the two
    runs are bit-equal (test_distill.py). On a GPU index_add_ and cuDNN's backward kernels sum
    with atomics in no fixed order, so even two uninterrupted runs may differ in the last bits
    each iteration; over 6 iterations that stays far below rtol 1e-4 / atol 1e-5 (the bound the
    CPU test of recompute vs unroll distillation uses). The sampling is on the CPU generator:
    it must be identical."""
    x, y = (t.to(CUDA) for t in tiny_data[:2])
    full = Distiller.create(CFG, tiny_buffer, x, y, TINY_AUG)
    full.run(checkpoint=tmp_path / "full.safetensors", identity="run")
    first = Distiller.create(replace(CFG, iterations=4), tiny_buffer, x, y, TINY_AUG)
    first.run(checkpoint=tmp_path / "part.safetensors", identity="run")
    resumed = Distiller.resume(tmp_path / "part.safetensors", CFG, tiny_buffer, TINY_AUG,
                               identity="run", device=CUDA)
    assert resumed is not None and resumed.iteration == 4
    resumed.run(checkpoint=tmp_path / "part.safetensors", identity="run")

    assert resumed.iteration == full.iteration == 6
    assert resumed.images.device.type == "cuda" and resumed.lr.device.type == "cuda"
    sampling = lambda d: [(r[0], r[2], r[3]) for r in d.history]  # noqa: E731
    assert sampling(resumed) == sampling(full)  # iteration, start epoch, bound: exactly
    assert resumed.skipped == full.skipped and resumed.skipped < 6
    assert torch.allclose(resumed.images, full.images, rtol=1e-4, atol=1e-5)
    assert torch.allclose(resumed.labels, full.labels, rtol=1e-4, atol=1e-5)
    assert float(resumed.lr) == pytest.approx(float(full.lr), rel=1e-5)
    losses = torch.tensor([[r[1] for r in h] for h in (resumed.history, full.history)])
    assert torch.allclose(losses[0], losses[1], rtol=1e-4)


# --- the TF32 switch -------------------------------------------------------------------------------

def flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("before", [(False, True), (True, False)])
def test_numerics_sets_and_restores_the_tf32_flags(before):
    saved = flags()
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        with numerics("tf32", "cuda"):
            assert flags() == (True, True)
            with numerics("float32", "cuda"):  # nested: strict float32 turns cuDNN's off too
                assert flags() == (False, False)
            assert flags() == (True, True)
        assert flags() == before
        with numerics("float32", "cuda"):
            assert flags() == (False, False)
        assert flags() == before
        with numerics("tf32", "cpu"):  # elsewhere TF32 is float32 and the flags stay
            assert flags() == before
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@needs_cuda
def test_tf32_really_changes_cuda_matmul_and_conv():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs an Ampere or newer GPU")
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(512, 512, generator=g).to(CUDA) for _ in range(2))
    x = torch.randn(8, 16, 32, 32, generator=g).to(CUDA)
    w = torch.randn(32, 16, 3, 3, generator=g).to(CUDA)
    exact = (a.double() @ b.double(), torch.nn.functional.conv2d(x.double(), w.double()))

    def errors(mode: str) -> list[float]:
        with numerics(mode, CUDA):
            got = (a @ b, torch.nn.functional.conv2d(x, w))
        return [float((g.double() - e).abs().max() / e.abs().max()) for g, e in zip(got, exact)]

    strict, tf32 = errors("float32"), errors("tf32")
    # float32 rounds at ~1e-7, TF32 (10-bit mantissa) at ~1e-3: orders of magnitude apart
    assert max(strict) < 1e-5, strict
    assert min(tf32) > 10 * max(strict), (tf32, strict)
