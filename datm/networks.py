"""Networks and a flat-parameter view of them.

Trajectory matching treats a network's parameters as one vector (experts store [epochs+1, P]
trajectories; the student is unrolled on that vector). `FlatModel` runs any nn.Module on such a
vector through torch.func.functional_call, so the expert, the student and the evaluation share
one architecture definition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_

from .config import MODELS, NORMS


@dataclass(frozen=True)
class NetSpec:
    """Everything needed to rebuild a network; stored in every artifact that holds parameters."""

    channels: int
    num_classes: int
    im_size: int
    model: str = "convnet"
    width: int = 128
    depth: int = 3
    norm: str = "instance"

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got '{self.model}'")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got '{self.norm}'")
        if self.model == "convnet" and convnet_feature_size(self) < 1:
            raise ValueError(f"depth {self.depth} pools a {self.im_size}px image to nothing")

    def to_dict(self) -> dict:
        return asdict(self)


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "instance":
        # Instance norm with affine parameters, as GroupNorm with one channel per group:
        # unlike nn.InstanceNorm2d it has no running statistics, so train and eval agree.
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def first_conv_padding(spec: NetSpec) -> int:
    """Padding of the ConvNet's first conv3x3: 3 for 1-channel 28px images, else 1.

    The DC/DSA/MTT ConvNet, and DD-Ranking's, behind the published MNIST/Fashion-MNIST numbers
    pad the first conv of a 1x28x28 input by 3 (28 -> 32), so that it pools like a 32px image
    (depth 3 ends at 4x4, not 3x3); matching that keeps our numbers comparable to theirs.
    """
    return 3 if spec.channels == 1 and spec.im_size == 28 else 1


def convnet_feature_size(spec: NetSpec) -> int:
    """Side of the ConvNet's last feature map: each block halves it (rounding down)."""
    return (spec.im_size + 2 * first_conv_padding(spec) - 2) >> spec.depth


class ConvNet(nn.Module):
    """depth x [conv3x3 -> norm -> ReLU -> avgpool2] -> linear (the DC/MTT/DATM ConvNet)."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = spec.channels
        for block in range(spec.depth):
            padding = first_conv_padding(spec) if block == 0 else 1
            layers += [nn.Conv2d(channels, spec.width, 3, padding=padding),
                       _norm_layer(spec.norm, spec.width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            channels = spec.width
        self.features = nn.Sequential(*layers)
        size = convnet_feature_size(spec)
        self.classifier = nn.Linear(channels * size * size, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _resnet18(spec: NetSpec) -> nn.Module:
    from torchvision.models import resnet18

    norm = {"instance": lambda c: nn.GroupNorm(c, c), "batch": nn.BatchNorm2d,
            "none": lambda c: nn.Identity()}[spec.norm]
    net = resnet18(num_classes=spec.num_classes, norm_layer=norm)
    # Small images: a 3x3 stride-1 stem and no max-pool keep 28/32px inputs from vanishing.
    net.conv1 = nn.Conv2d(spec.channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def build(spec: NetSpec) -> nn.Module:
    if spec.model == "resnet18":
        return _resnet18(spec)
    return ConvNet(spec)


class FlatModel:
    """Run a module on a flat parameter vector: `fm(theta, x)`."""

    def __init__(self, spec: NetSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.module = build(spec).to(device)
        # Batch norm always uses batch statistics here: running-statistic updates are in-place
        # buffer writes that torch.func transforms forbid, and the student never evaluates.
        replace_all_batch_norm_modules_(self.module)
        self.names = [n for n, _ in self.module.named_parameters()]
        self.shapes = [p.shape for _, p in self.module.named_parameters()]
        self.sizes = [p.numel() for _, p in self.module.named_parameters()]
        self.num_params = sum(self.sizes)
        # Parameters live in the flat vector only; the module keeps buffers (BN statistics).
        for name in self.names:
            _delete_param(self.module, name)

    def init(self, seed: int) -> torch.Tensor:
        """A fresh flat parameter vector with PyTorch's default init, fully set by `seed`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = build(self.spec)
        return torch.cat([p.detach().flatten() for p in fresh.parameters()]).to(self.device)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = theta.split(self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.unflatten(theta), (x,))

    def train(self, mode: bool = True) -> FlatModel:
        self.module.train(mode)
        return self


def _delete_param(module: nn.Module, dotted: str) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    delattr(module, leaf)


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """mean over the batch of sum(-log_softmax(logits) * softmax(target_logits))."""
    return -(F.log_softmax(logits, dim=1) * F.softmax(target_logits, dim=1)).sum(1).mean()
