"""datm.networks: the ConvNet's feature sizes (padding 3 on 1x28x28 inputs), parameter count,
depth validation, and FlatModel on the MNIST-shaped ConvNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datm.networks import ConvNet, FlatModel, NetSpec

MNIST = NetSpec(channels=1, num_classes=10, im_size=28, width=8, depth=3)
CIFAR = NetSpec(channels=3, num_classes=10, im_size=32, width=8, depth=3)


def convs(net: ConvNet) -> list[torch.nn.Conv2d]:
    return [m for m in net.features if isinstance(m, torch.nn.Conv2d)]


def expected_params(spec: NetSpec, side: int) -> int:
    """conv3x3 weights + biases, affine instance norm (2 per channel), linear classifier."""
    w = spec.width
    first = spec.channels * w * 9 + w
    rest = (spec.depth - 1) * (w * w * 9 + w)
    norms = spec.depth * 2 * w
    classifier = w * side * side * spec.num_classes + spec.num_classes
    return first + rest + norms + classifier


def test_one_channel_28px_convnet_pads_the_first_conv_by_3_and_ends_4x4():
    net = ConvNet(MNIST)
    assert [c.padding for c in convs(net)] == [(3, 3), (1, 1), (1, 1)]
    x = torch.randn(5, 1, 28, 28)
    assert net.features(x).shape == (5, MNIST.width, 4, 4)
    assert net.features[:1](x).shape[-2:] == (32, 32)  # 28 + 2*3 - 2
    assert net.classifier.in_features == MNIST.width * 4 * 4
    assert net(x).shape == (5, 10)


def test_three_channel_32px_convnet_keeps_padding_1_and_ends_4x4():
    net = ConvNet(CIFAR)
    assert [c.padding for c in convs(net)] == [(1, 1)] * 3
    assert net.features(torch.randn(2, 3, 32, 32)).shape == (2, CIFAR.width, 4, 4)
    assert net.classifier.in_features == CIFAR.width * 4 * 4


@pytest.mark.parametrize("channels, size, depth, side", [
    (1, 28, 2, 8), (3, 28, 3, 3), (1, 32, 3, 4), (1, 8, 2, 2), (1, 28, 5, 1)])
def test_only_one_channel_28px_gets_the_wide_padding(channels, size, depth, side):
    spec = NetSpec(channels=channels, num_classes=3, im_size=size, width=4, depth=depth)
    net = ConvNet(spec)
    wide = channels == 1 and size == 28
    assert convs(net)[0].padding == ((3, 3) if wide else (1, 1))
    assert net.features(torch.randn(2, channels, size, size)).shape == (2, 4, side, side)


@pytest.mark.parametrize("spec, side", [(MNIST, 4), (CIFAR, 4),
                                        (NetSpec(3, 100, 64, width=16, depth=4), 4)])
def test_parameter_count_formula(spec, side):
    net = ConvNet(spec)
    assert sum(p.numel() for p in net.parameters()) == expected_params(spec, side)
    assert FlatModel(spec).num_params == expected_params(spec, side)


def test_depth_validation_follows_the_padded_size():
    NetSpec(channels=1, num_classes=10, im_size=28, depth=5)  # 32 -> 1x1: allowed
    with pytest.raises(ValueError, match="depth 6"):
        NetSpec(channels=1, num_classes=10, im_size=28, depth=6)
    with pytest.raises(ValueError, match="depth 5"):
        NetSpec(channels=3, num_classes=10, im_size=28, depth=5)  # 28 -> 0
    NetSpec(channels=1, num_classes=10, im_size=28, depth=6, model="resnet18")  # no pooling rule


def test_flat_model_runs_the_one_channel_28px_convnet():
    fm = FlatModel(MNIST)
    theta = fm.init(0).requires_grad_()
    assert theta.shape == (expected_params(MNIST, 4),)
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    logits = fm(theta, x)
    assert logits.shape == (6, 10) and torch.isfinite(logits).all()
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y), theta)
    assert g.shape == theta.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    # the flat view computes what the module with the same parameters computes
    net = ConvNet(MNIST)
    torch.nn.utils.vector_to_parameters(theta.detach(), list(net.parameters()))
    assert torch.allclose(net(x), logits.detach(), atol=1e-5)
