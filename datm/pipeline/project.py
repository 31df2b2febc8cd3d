"""What every pipeline step shares: the project's data in model space, JSON metrics, and the
distilled sets as they lie on disk.

Each step module (download, zca, buffers, distill, evaluate, export) imports only what its own
stage runs, so a DVC stage depends on exactly the code it executes (tests/test_dvc_deps.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import artifacts, data
from ..config import ConfigError, Params, Paths
from ..distributed import Group
from ..errors import UserError
from ..networks import NetSpec
from ..zca import ZCA

DISTILLED = "distilled"  # the artifact kind of a distilled set
# Run-time facts (wall time, where a run resumed) that never go into an artifact: the same
# inputs and settings must give the same bytes, however and whenever they were computed.
VOLATILE = ("seconds", "resumed_at")


def quiet(_: dict) -> None:
    """The default callback: no progress display."""


def settled(summary: dict) -> dict:
    """A step's summary without its run-time facts: what may be written into artifacts."""
    return {k: v for k, v in summary.items() if k not in VOLATILE}


def full_dataset(paths: Paths) -> tuple[float | None, float | None]:
    """The full-set reference, (mean, std) of the experts' final test accuracy, from
    metrics/buffers.json (the buffers stage); Nones before it ran."""
    try:
        summary = json.loads((paths.metrics / "buffers.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(summary, dict):
        return None, None
    return summary.get("full_dataset"), summary.get("full_dataset_std")


def environment(device: torch.device) -> dict:
    """What computed a result besides its inputs and settings: the torch and torchvision
    versions, the device kind and, on a CPU, the threads per process (they change the float
    rounding, which training amplifies). Recorded in metrics, never a host, a path or a time."""
    from importlib import metadata

    try:
        vision = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        vision = None
    return {"torch": torch.__version__, "torchvision": vision, "device": device.type,
            "threads": torch.get_num_threads() if device.type == "cpu" else None}


def check_finite(where: str | Path, **tensors: torch.Tensor) -> None:
    """A set with NaN/inf would train to chance (10 %) and be reported as a number: refuse."""
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"{where}: {' and '.join(bad)} hold NaN or inf values (a diverged "
                        "distillation?): refusing it; distill again with a lower "
                        "lr_img / lr_lr")


def set_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The identity of a distilled set (its images, labels and lr), 16 hex digits: what an
    evaluation measured, so that an export can tell whether a number is of its own tensors."""
    return artifacts.tensor_digest({k: tensors[k] for k in ("images", "labels", "lr")})[:16]


def write_json(path: Path, payload: dict) -> None:
    with artifacts.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


@dataclass
class ModelData:
    """Train and test splits in model space (whitened raw pixels, or normalized without ZCA)
    on the compute device."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    zca: ZCA
    source: str
    identity: str  # content hash of the train split and the ZCA: what experts were made from

    def spec(self, params: Params) -> NetSpec:
        return net_spec(params, self.x.shape[1:], len(self.classes))

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> pixels in [0, 1], the inverse of how `x` was made."""
        return data.to_pixels(x, self.mean, self.std, self.zca)


def net_spec(params: Params, shape: tuple[int, ...], num_classes: int) -> NetSpec:
    """The profile's ConvNet for images of `shape` (C, H, W)."""
    c, h, _ = shape
    try:
        return NetSpec(c, num_classes, h, width=params.net.width, depth=params.net.depth,
                       norm=params.net.norm)
    except ValueError as exc:  # e.g. a depth that pools these images to nothing
        raise ConfigError(f"net: {exc}") from None


def data_identity(paths: Paths) -> str:
    """What experts and distillations are made from: the training images, labels and class
    names, and the ZCA transform, by content (not file bytes or the folder they came from)."""
    train = artifacts.content_digest(paths.train, ("classes",))
    zca = artifacts.content_digest(paths.zca, ("enabled",))
    return f"{train[:16]}:{zca[:16]}"


def device_of(params: Params, group: Group) -> torch.device:
    """Where a step computes: its rank's own device on several ranks (its GPU), else the
    profile's `device`."""
    return group.device if group.distributed else params.torch_device()


def model_data(paths: Paths, device: torch.device) -> ModelData:
    train, test = data.Split.load(paths.train), data.Split.load(paths.test)
    zca = ZCA.load(paths.zca)
    to = lambda s: data.to_model_space(s.images, train.mean, train.std, zca).to(device)  # noqa: E731
    return ModelData(to(train), train.labels.to(device), to(test), test.labels.to(device),
                     train.classes, train.mean, train.std, zca, train.source,
                     data_identity(paths))


def load_distilled(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return artifacts.load(path, DISTILLED)


def distilled_ipcs(paths: Paths) -> list[int]:
    folder = paths.distilled(0).parent
    found = [p.stem.removeprefix("ipc_") for p in folder.glob("ipc_*.safetensors")]
    return sorted(int(s) for s in found if s.isdigit())


def distilled_pixels(paths: Paths, tensors: dict[str, torch.Tensor], meta: dict,
                     clip: bool = True) -> torch.Tensor:
    """A distilled set's images as pixels (de-whitened with the pipeline's ZCA, or
    de-normalized with the mean and std it was distilled with): clipped to [0, 1] for viewing,
    or, with `clip` False, as they are (an export)."""
    zca = ZCA.load(paths.zca) if meta.get("zca") else ZCA()
    return data.to_pixels(tensors["images"], meta["mean"], meta["std"], zca, clip)
