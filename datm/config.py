"""params.yaml -> typed config objects, with one-line errors for unknown or bad keys.

Every config class lives here, so loading params imports no algorithm code: a DVC stage then
depends only on the modules it runs (tests/test_dvc_deps.py derives that from the imports).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

# The choices each setting allows; the modules that act on them import them from here.
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "imagefolder")
INITS = ("real_correct", "real_hard", "real", "noise")
LABELS = ("expert", "hard")
ARCHS = ("convnet", "convnet_bn", "resnet18")
NORMS = ("instance", "batch", "none")
MODELS = ("convnet", "resnet18")
MODES = ("recompute", "unroll")
PRECISIONS = ("float32", "tf32", "bf16")
SCHEDULES = ("constant", "cosine")
MAX_LR = 10.0  # an SGD lr above this diverges on any network here: a typo, not a setting
# The distillation's own step sizes: 100x the largest published ones (lr_img 1e4 at Tiny
# ImageNet IPC 1, lr_y 10, lr_lr 1e-4); beyond them a set only diverges
MAX_LR_IMG, MAX_LR_Y, MAX_LR_LR = 1e6, 1e3, 1e-2
MAX_SEED = 2**40  # seeds derived from it (expert k: seed x 100003 + k) stay in torch's 64 bits
WINDOWS = ("manual", "auto")
_EXPERTS_ARE_FULLSET = ("the experts train on the full set to convergence and are the full-set "
                        "reference (buffers.epochs, buffers.schedule); delete this key")
# Settings of earlier versions, and what replaced them: an old params file gets the reason.
REMOVED = {**{f"evaluate.fullset_{k}": _EXPERTS_ARE_FULLSET
              for k in ("epochs", "lr", "batch", "models")},
           "launch.fullset": _EXPERTS_ARE_FULLSET}
SECTIONS = ("data", "zca", "net", "augment", "buffers", "distill", "evaluate", "launch")


class ConfigError(UserError, ValueError):
    """A params file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class AugConfig:
    """DSA settings; defaults are the published 'color_crop_cutout_flip_scale_rotate' values."""

    enabled: bool = True
    strategy: str = "color_crop_cutout_flip_scale_rotate"
    scale: float = 1.2
    rotate: float = 15.0
    crop: float = 0.125
    cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown augmentation family {sorted(unknown)}; choose from {FAMILIES}")
        _check_ranges("augment", [
            (self.scale >= 1, f"scale must be >= 1 (images scaled within [1/scale, scale]), "
                              f"got {self.scale}"),
            (0 <= self.crop < 1, f"crop must lie in [0, 1) (a share of the side), got {self.crop}"),
            (0 <= self.cutout <= 1, f"cutout must lie in [0, 1], got {self.cutout}"),
            (0 <= self.rotate <= 180, f"rotate must lie in [0, 180] degrees, got {self.rotate}"),
            (min(self.brightness, self.saturation, self.contrast) >= 0,
             "brightness, saturation and contrast must be >= 0"),
        ])

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(f for f in self.strategy.split("_") if f)


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion_mnist"
    root: str = "datasets"
    im_size: int = 0          # imagefolder only: resize to this side (0: keep 32)
    channels: int = 3         # imagefolder only: 1 (grayscale) or 3 (RGB)
    test_fraction: float = 0.2  # imagefolder without a test/ folder: held-out share per class
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"data.name must be one of {DATASETS}, got '{self.name}'")
        if self.channels not in (1, 3) or self.im_size < 0:
            raise ValueError(f"data.channels must be 1 or 3 and data.im_size >= 0, got "
                             f"{self.channels} and {self.im_size}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"data.test_fraction must lie in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class DistillConfig:
    """One IPC's settings; names: docs/METHOD.md, "Settings and the paper's symbols"."""

    ipc: int
    # manual: the window below (T-, T, T+); auto: chosen from the experts' training curve and
    # the IPC's share of the training set when the distillation starts (datm/windows.py)
    window: str = "manual"
    syn_steps: int = 20               # N
    expert_epochs: int = 2            # M
    min_start_epoch: int = 0          # T-
    sg_start: int | None = None       # T (None: no sequential generation, U = T+)
    max_start_epoch: int = 4          # T+
    sg_end: int = 0                   # iterations over which U grows from T to T+
    batch_syn: int = 0                # 0: the whole synthetic set each step
    lr_img: float = 100.0
    lr_y: float = 2.0
    lr_lr: float = 1e-5
    lr_init: float = 0.0              # 0: the experts' mean lr over the epochs the window reads
    # Each iteration's student steps use the learned lr times the sampled segment's own expert
    # lr over the window's mean (a cosine schedule's epochs differ by tens of %); constant: 1
    segment_lr: bool = True
    # window auto, small sets: sequential generation, U from ceil(T+ / 2) to T+ over sg_end
    # iterations (0: half the run)
    sequential: bool = True
    iterations: int = 100
    threshold: float = 1.0
    init: str = "real_correct"
    labels: str = "expert"            # expert logits (DATM) or hard one-hot (always, for noise)
    label_epoch: int = -1             # experts' epoch that judges init images and gives soft labels
                                      # (-1: their last, the reference's Label_Model_Timestamp)
    learn_labels: bool = True
    mode: str = "recompute"
    precision: str = "float32"        # float32 | tf32 (CUDA) | bf16 autocast; see bench/precision.py
    seed: int = 0
    checkpoint_every: int = 25
    grid_every: int = 100             # iterations between image grids in MLflow
    max_nonfinite: int = 10           # consecutive NaN/inf losses before giving up
    # Selection on a validation split of the training images (never the test split): every
    # `select_every` iterations and at the end, train `select_models` fresh evaluation networks
    # for `select_epochs` on the current set and keep the best. 0: keep the final set.
    select_every: int = 0
    select_val_per_class: int = 100   # training images per class held out to judge the sets
    select_epochs: int = 300
    select_models: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.ipc >= 1, "ipc must be >= 1"),
            (self.batch_syn >= 0, "batch_syn must be >= 0 (0: the whole set each step)"),
            (min(self.lr_img, self.lr_y, self.lr_lr) >= 0 and self.lr_init >= 0,
             "lr_img, lr_y, lr_lr and lr_init must be >= 0"),
            (self.lr_img <= MAX_LR_IMG and self.lr_y <= MAX_LR_Y and self.lr_lr <= MAX_LR_LR
             and self.lr_init <= MAX_LR,
             f"lr_img must be <= {MAX_LR_IMG:g}, lr_y <= {MAX_LR_Y:g}, lr_lr <= {MAX_LR_LR:g} and "
             f"lr_init <= {MAX_LR:g} (the published settings go to 1e4, 10, 1e-4 and 0.01): a "
             "larger step diverges"),
            (self.threshold > 0, "threshold must be > 0"),
            (self.grid_every >= 1 and self.max_nonfinite >= 1,
             "grid_every and max_nonfinite must be >= 1"),
            (self.window in WINDOWS, f"window must be one of {WINDOWS}"),
            (self.syn_steps >= 1 and self.expert_epochs >= 1, "syn_steps and expert_epochs must be >= 1"),
            (0 <= self.min_start_epoch < self.max_start_epoch,
             f"need 0 <= T- ({self.min_start_epoch}) < T+ ({self.max_start_epoch})"),
            (self.sg_start is None or self.min_start_epoch < self.sg_start <= self.max_start_epoch,
             f"SG start T ({self.sg_start}) must lie in (T-, T+]"),
            (self.sg_start is None or self.sg_end >= 1, "sg_end must be >= 1 with sequential generation"),
            (self.iterations >= 0 and self.checkpoint_every >= 1, "iterations >= 0, checkpoint_every >= 1"),
            (self.init in INITS, f"init must be one of {INITS}"),
            (self.labels in LABELS, f"labels must be one of {LABELS}"),
            (self.mode in MODES, f"mode must be one of {MODES}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.label_epoch >= -1, "label_epoch must be -1 (the experts' last epoch) or >= 0"),
            (self.select_every >= 0, "select_every must be >= 0 (0: keep the final set)"),
            (min(self.select_val_per_class, self.select_epochs, self.select_models) >= 1,
             "select_val_per_class, select_epochs and select_models must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"distill ipc {self.ipc}: {message}")

    @property
    def last_epoch_needed(self) -> int:
        """Start epochs are drawn below T+, so the deepest epoch read is T+ - 1 + M."""
        return self.max_start_epoch - 1 + self.expert_epochs

    def digest(self, extra: str = "") -> str:
        """Identity of a run; settings that do not change its result are left out.

        `iterations` only says where to stop (no schedule depends on it), so a run given more
        iterations resumes from its checkpoint instead of starting over. With selection off its
        other settings change nothing either.
        """
        skip = ("checkpoint_every", "grid_every", "iterations")
        if not self.select_every:
            skip += ("select_val_per_class", "select_epochs", "select_models")
        keep = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps([keep, extra], sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EvalConfig:
    models: int = 5               # fresh networks per set; mean and std are over these
    epochs: int = 1000
    batch: int = 256              # of the distilled and random sets
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr: float = 0.0               # 0: the distilled set's learned lr (times lr_scale)
    lr_scale: float = 1.0         # multiplies the learned lr; 1 is the paper's protocol
    random_lr: float = 0.01       # lr of the random-real-subset baseline
    arch: str = "convnet"
    # Other architectures each distilled set (and a random real subset, same recipe) is also
    # evaluated on: the cross-architecture table (crossarch@<ipc>); empty: none.
    cross_archs: tuple[str, ...] = ()
    augment: bool = True
    # torch.compile each network's forward (datm/compiled.py): the same training, fused
    # kernels (other float rounding); pays for a large set's thousands of steps, not a small one's
    compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bool("evaluate.compile", self.compile)
        for arch in (self.arch, *self.cross_archs):
            if arch not in ARCHS:
                raise ValueError(f"arch must be one of {ARCHS}, got '{arch}'")
        if min(self.models, self.epochs, self.batch) < 1:
            raise ValueError("models, epochs and batch must be >= 1")
        _check_ranges("evaluate", [
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.lr <= MAX_LR, f"lr must lie in [0, {MAX_LR}] (0: the learned lr x "
                                     f"lr_scale), got {self.lr}"),
            (0 < self.lr_scale <= MAX_LR and 0 < self.random_lr <= MAX_LR,
             f"lr_scale and random_lr must lie in (0, {MAX_LR}]"),
        ])


@dataclass(frozen=True)
class ExpertConfig:
    num_experts: int = 5
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch: int = 256
    # The experts' lr per epoch: constant (the reference's experts) or cosine, lr * (1 + cos(pi
    # e / epochs)) / 2 in epoch e, which converges in a few epochs (docs/METHOD.md, "Experts")
    schedule: str = "constant"
    # constant only: the last `decay_epochs` epochs decay the lr to 0 by a cosine, step by step.
    # The matching never reads them (a constant-lr trajectory is the one a student can follow);
    # they make the final epoch, the full-set reference and the soft labels, a converged one.
    decay_epochs: int = 0
    # Parameters are recorded every `save_every` SGD steps (0: after every epoch); windows and M
    # count these snapshots, so the expert steps a student covers are M x save_every.
    save_every: int = 0
    # Flat-minimum experts by GSAM (flat_minimum.py); rho 0 = plain SGD (the MTT baseline).
    # The presets use the DATM reference values: rho 0.01, alpha 0.3, adaptive true.
    rho: float = 0.0          # perturbation radius
    alpha: float = 0.0        # surrogate-gap weight; 0 with adaptive false is SAM
    adaptive: bool = False    # radius scaled per parameter by |w| (ASAM-style)
    group: int = 1            # experts trained together as one batched model
    compile: bool = False     # torch.compile the loss (datm/compiled.py); groups of one only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.epochs < 1 or self.batch < 1 or self.group < 1:
            raise ValueError("buffers: num_experts, epochs, batch and group must be >= 1")
        _check_ranges("buffers", [
            (0 < self.lr <= MAX_LR, f"lr must lie in (0, {MAX_LR}], got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
        ])
        if self.schedule not in SCHEDULES:
            raise ValueError(f"buffers.schedule must be one of {SCHEDULES}, got '{self.schedule}'")
        if not 0 <= self.decay_epochs < self.epochs:
            raise ValueError(f"buffers.decay_epochs must lie in [0, epochs) ({self.epochs}), "
                             f"got {self.decay_epochs}")
        if self.decay_epochs and self.schedule != "constant":
            raise ValueError("buffers.decay_epochs needs schedule: constant (a cosine schedule "
                             "decays over the whole run already)")
        if self.save_every < 0:
            raise ValueError(f"buffers.save_every must be >= 0 (0: once per epoch), got "
                             f"{self.save_every}")
        if self.rho < 0:
            raise ValueError(f"buffers.rho must be >= 0 (0: plain SGD), got {self.rho}")
        if self.alpha < 0:
            raise ValueError(f"buffers.alpha must be >= 0 (0: no surrogate-gap term), "
                             f"got {self.alpha}")
        _check_bool("buffers.adaptive", self.adaptive)
        _check_bool("buffers.compile", self.compile)
        if self.compile and self.group > 1:
            raise ValueError("buffers.compile needs group 1 (a batched group trains by vmap, "
                             "which is not compiled)")

    def step_lr(self, step: int, steps_per_epoch: int) -> float:
        """The lr of (0-based, counted over the whole run) SGD step `step` under `schedule`."""
        if self.schedule == "cosine":
            return self.lr * (1 + math.cos(math.pi * (step // steps_per_epoch) / self.epochs)) / 2
        flat = self.constant_steps(steps_per_epoch)
        if step < flat:
            return self.lr
        tail = self.epochs * steps_per_epoch - flat
        return self.lr * (1 + math.cos(math.pi * (step - flat + 0.5) / tail)) / 2

    def constant_steps(self, steps_per_epoch: int) -> int:
        """The steps before the decay tail (all of them without one)."""
        return (self.epochs - self.decay_epochs) * steps_per_epoch

    def snapshot_steps(self, steps_per_epoch: int) -> list[int]:
        """The SGD steps after which parameters are recorded: 0 (the init), every `save_every`
        (or every epoch) and the last step, so a trajectory always ends converged."""
        total = self.epochs * steps_per_epoch
        every = self.save_every or steps_per_epoch
        return sorted({*range(0, total, every), total})

    def matchable(self, steps_per_epoch: int) -> int:
        """The last snapshot a matching may read: the last one before the decay tail."""
        flat = self.constant_steps(steps_per_epoch)
        return max(i for i, s in enumerate(self.snapshot_steps(steps_per_epoch)) if s <= flat)


@dataclass(frozen=True)
class LaunchConfig:
    """Processes per stage on this machine (`launch`): a stage given W > 1 re-runs itself under
    torchrun (stages/launch.py). Any W gives the same outputs at the same threads per process,
    but on a CPU W sets those threads (cores / W), which change float rounding: so each count
    is a DVC param of its stage."""

    buffers: int = 1
    baseline: int = 1
    distill: int = 1
    evaluate: int = 1
    crossarch: int = 1
    decompose: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value < 1:
                raise ValueError(f"launch.{f.name} must be >= 1 (processes of the stage on "
                                 f"this machine), got {value}")


@dataclass(frozen=True)
class NetConfig:
    width: int = 128
    depth: int = 3
    norm: str = "instance"

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"width and depth must be >= 1, got {self.width} and {self.depth}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got '{self.norm}'")


@dataclass(frozen=True)
class ZCAConfig:
    enabled: bool = True
    eps: float = 0.1

    def __post_init__(self) -> None:
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


@dataclass(frozen=True)
class Paths:
    """Where every artifact lives, relative to the project root."""

    root: Path = Path(".")

    @property
    def train(self) -> Path:
        return self.root / "data" / "train.safetensors"

    @property
    def test(self) -> Path:
        return self.root / "data" / "test.safetensors"

    @property
    def zca(self) -> Path:
        return self.root / "artifacts" / "zca.safetensors"

    @property
    def buffers(self) -> Path:
        return self.root / "artifacts" / "buffers"

    def distilled(self, ipc: int) -> Path:
        return self.root / "artifacts" / "distilled" / f"ipc_{ipc}.safetensors"

    def checkpoint(self, ipc: int) -> Path:
        return self.root / "checkpoints" / f"distill_ipc_{ipc}.safetensors"

    def evaluation(self, ipc: int) -> Path:
        return self.root / "metrics" / "evaluate" / f"ipc_{ipc}.json"

    def crossarch(self, ipc: int) -> Path:
        return self.root / "metrics" / "crossarch" / f"ipc_{ipc}.json"

    def decompose(self, ipc: int) -> Path:
        return self.root / "metrics" / "decompose" / f"ipc_{ipc}.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def _typed(value: Any, kind: Any, key: str) -> Any:
    """`value` checked against a field's annotation (int, float, bool, str, X | None).

    YAML gives `width: "32"` as a string and `lr: 1e-3` as a string too (no dot): a wrong type
    must stop the stage before it touches an artifact, not crash it halfway through.
    """
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} must be set (got an empty value)")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            (item,) = {a for a in typing.get_args(option) if a is not Ellipsis}
            return tuple(_typed(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    names = " or ".join("null" if o is type(None) else "a list" if typing.get_origin(o) is tuple
                        else getattr(o, "__name__", str(o)) for o in options)
    if isinstance(value, str) and float in options:
        try:  # YAML reads 1e-5 (no dot) as a string: accept it when it is a plain number
            return _typed(float(value), kind, key)
        except ValueError:
            pass
    raise ConfigError(f"{key} must be {names}, got {type(value).__name__} {value!r}")


def _build(cls: type, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    for key in unknown:
        removed = REMOVED.get(f"{where.split('.')[0]}.{key}")
        if removed:
            raise ConfigError(f"{where}.{key} is no longer a setting: {removed}")
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    values = {k: _typed(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


@dataclass(frozen=True)
class Params:
    """All settings of a profile, parsed from the params.yaml mapping."""

    data: DataConfig
    zca: ZCAConfig
    net: NetConfig
    augment: AugConfig
    buffers: ExpertConfig
    evaluate: EvalConfig
    distills: dict[int, DistillConfig]
    evaluate_ipc: dict[int, dict]  # per-IPC overrides of `evaluate` (validated)
    device: str = "auto"
    launch: LaunchConfig = LaunchConfig()
    # The IPCs with a crossarch@<ipc> stage (each set on evaluate.cross_archs) and with a
    # decompose@<ipc> stage (images vs labels); evaluate.cross_ipcs and evaluate.decompose_ipcs
    cross_ipcs: tuple[int, ...] = ()
    decompose_ipcs: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> Params:
        unknown = sorted(set(raw) - set(SECTIONS) - {"seed", "device"})
        if unknown:
            known = ", ".join(sorted({*SECTIONS, "seed", "device"}))
            raise ConfigError(f"unknown top-level key '{unknown[0]}'; known: {known}")
        # A missing section would silently mean code defaults (e.g. paper-size experts); DVC
        # also refuses a stage whose param (launch.<stage>) is missing, after the others ran.
        missing = [s for s in SECTIONS if s not in raw]
        if missing:
            raise ConfigError(f"params lack the '{missing[0]}' section (every profile sets "
                              f"{', '.join(SECTIONS)}; see params.yaml)")
        seed = _typed(raw.get("seed", 0), int, "seed")
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seed must lie in [0, 2^40], got {seed}")
        device = _typed(raw.get("device", "auto"), str, "device")
        _check_device(device)
        params = cls(
            data=_build(DataConfig, {"seed": seed, **(raw["data"] or {})}, "data"),
            zca=_build(ZCAConfig, raw["zca"], "zca"),
            net=_build(NetConfig, raw["net"], "net"),
            augment=_build(AugConfig, raw["augment"], "augment"),
            buffers=_build(ExpertConfig, {"seed": seed, **(raw["buffers"] or {})}, "buffers"),
            evaluate=_build(EvalConfig, {"seed": seed, **_without_table(raw["evaluate"])},
                            "evaluate"),
            distills=_distills(raw["distill"], seed),
            evaluate_ipc=_evaluate_ipc(raw["evaluate"], raw["distill"], seed),
            device=device,
            launch=_launch(raw["launch"]),
            cross_ipcs=_ipc_list(raw["evaluate"], "cross_ipcs"),
            decompose_ipcs=_ipc_list(raw["evaluate"], "decompose_ipcs"),
        )
        _check_across(params)
        return params

    @property
    def ipcs(self) -> list[int]:
        """`distill.ipcs`: the IPCs the pipeline distills (one distill@<ipc> stage each)."""
        return sorted(self.distills)

    def evaluation(self, ipc: int) -> EvalConfig:
        """The evaluation recipe of one IPC's sets (distilled and random real): `evaluate`
        overlaid with `evaluate.ipc.<ipc>`, e.g. fewer epochs for a large set on a CPU."""
        self.distill(ipc)  # a clear error for an IPC that is not configured
        return dataclasses.replace(self.evaluate, **self.evaluate_ipc.get(ipc, {}))

    @property
    def wants_compile(self) -> bool:
        """Whether any plain training loop of the profile asks for torch.compile."""
        return self.buffers.compile or self.evaluate.compile or any(
            own.get("compile") for own in self.evaluate_ipc.values())

    def without_compile(self) -> Params:
        """The profile with every `compile` off: what runs where torch.compile cannot."""
        return dataclasses.replace(
            self, buffers=dataclasses.replace(self.buffers, compile=False),
            evaluate=dataclasses.replace(self.evaluate, compile=False),
            evaluate_ipc={ipc: {**own, "compile": False} if "compile" in own else own
                          for ipc, own in self.evaluate_ipc.items()})

    def distill(self, ipc: int) -> DistillConfig:
        """The settings of one IPC: distill.defaults overlaid with distill.ipc.<ipc>."""
        if ipc not in self.distills:
            listed = ", ".join(map(str, self.ipcs)) or "none"
            raise ConfigError(f"IPC {ipc} is not in params (distill.ipcs lists: {listed})")
        return self.distills[ipc]

    def torch_device(self) -> torch.device:
        """The compute device; a CUDA device that this machine lacks is a ConfigError."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise ConfigError(f"device: {self.device} but this machine has "
                                  f"{count or 'no'} CUDA GPU{'s' if count != 1 else ''}: "
                                  "use device: auto or cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"device: {self.device} but this machine has no Apple GPU (MPS): "
                              "use device: auto or cpu")
        return device


def _ipc_table(section: dict, where: str) -> dict[int, dict]:
    """A per-IPC table (`distill.ipc`, `evaluate.ipc`): integer or digit-string keys.

    `dvc exp run -S distill.ipc.10.lr_img=50` works on string keys, and a string key added by
    an override must never be silently ignored.
    """
    table: dict[int, dict] = {}
    for key, own in (section.get("ipc") or {}).items():
        if not str(key).isdigit():
            raise ConfigError(f"{where}.{key}: keys of {where} are IPCs (integers)")
        if int(key) in table:
            raise ConfigError(f"{where} lists IPC {key} twice (as {key!r} and {int(key)})")
        if own is not None and not isinstance(own, dict):
            raise ConfigError(f"{where}.{key} must be a mapping of settings")
        if own and "ipc" in own:
            raise ConfigError(f"{where}.{key}.ipc: the IPC is the table's key, drop this key")
        table[int(key)] = own or {}
    return table


STAGE_LISTS = ("cross_ipcs", "decompose_ipcs")  # evaluate's lists of IPCs with a stage each


def _without_table(section: Any) -> dict:
    """The `evaluate` section's settings of the recipe (EvalConfig): not its per-IPC table,
    nor its lists of the IPCs that get a stage."""
    if section is not None and not isinstance(section, dict):
        raise ConfigError("evaluate must be a mapping of settings")
    return {k: v for k, v in (section or {}).items() if k not in ("ipc", *STAGE_LISTS)}


def _ipc_list(section: Any, key: str) -> tuple[int, ...]:
    """evaluate.cross_ipcs / decompose_ipcs: which distilled IPCs get that stage (DVC's
    foreach: an IPC not listed has no stage at all, so no process is started for it)."""
    value = (section or {}).get(key) or []
    if not isinstance(value, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in value):
        raise ConfigError(f"evaluate.{key} must be a list of IPCs, e.g. [10] (or [])")
    return tuple(sorted(set(value)))


def _evaluate_ipc(section: Any, distill: Any, seed: int) -> dict[int, dict]:
    """`evaluate.ipc`: per-IPC overrides of the `evaluate` section, each checked as the
    EvalConfig it makes (types, ranges)."""
    base = {"seed": seed, **_without_table(section)}
    table = _ipc_table(section or {}, "evaluate.ipc")
    ipcs = (distill or {}).get("ipcs") or [] if isinstance(distill, dict) else []
    # Every distilled IPC has an entry (maybe {}): DVC's baseline@N / evaluate@N depend on
    # evaluate.ipc.<N> alone, so that one IPC's recipe change re-runs that IPC only, and DVC
    # refuses a stage whose param key is missing. Entries of IPCs not distilled are kept, as
    # distill.ipc's are (`dvc exp run -S distill.ipcs=[1,10]` needs no other edit).
    missing = [i for i in ipcs if i not in table]
    if missing:
        raise ConfigError(
            f"evaluate.ipc has no entry for IPC {missing[0]}: give every IPC of distill.ipcs "
            f'one (\'"{missing[0]}": {{}}\' for the evaluate section as it is); DVC\'s '
            f"evaluate@{missing[0]} depends on evaluate.ipc.{missing[0]}")
    for ipc, own in table.items():
        _build(EvalConfig, {**base, **own}, f"evaluate.ipc.{ipc}")
    return {ipc: {k: _typed(v, typing.get_type_hints(EvalConfig)[k], f"evaluate.ipc.{ipc}.{k}")
                  for k, v in own.items()} for ipc, own in table.items()}


def _distills(section: Any, seed: int) -> dict[int, DistillConfig]:
    """Every listed IPC's DistillConfig: distill.defaults overlaid with distill.ipc.<ipc>."""
    if not isinstance(section, dict):
        raise ConfigError("distill must be a mapping with ipcs, defaults and ipc")
    unknown = sorted(set(section) - {"ipcs", "defaults", "ipc"})
    if unknown:
        raise ConfigError(f"unknown key distill.{unknown[0]}; known: defaults, ipc, ipcs")
    listed = section.get("ipcs")
    if not isinstance(listed, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in listed):
        raise ConfigError("distill.ipcs must be a list of positive integers, e.g. [1, 10, 50]")
    if not listed:  # every later stage (evaluate, summary) is per IPC: nothing would run
        raise ConfigError("distill.ipcs is empty: list at least one IPC, e.g. [10]")
    table = _ipc_table(section, "distill.ipc")
    defaults = section.get("defaults") or {}
    return {ipc: _build(DistillConfig, {"seed": seed, **defaults, **table.get(ipc, {}), "ipc": ipc},
                        f"distill.ipc.{ipc}")
            for ipc in sorted(listed)}


def _launch(section: Any) -> LaunchConfig:
    """`launch`: every stage's count, as DVC needs each launch.<stage> param to exist."""
    if not isinstance(section, dict):
        raise ConfigError("launch must be a mapping of stage: processes")
    missing = [f.name for f in dataclasses.fields(LaunchConfig)
               if not isinstance(section, dict) or f.name not in section]
    if missing:
        raise ConfigError(f"params lack launch.{missing[0]}: every stage has a count of "
                          "processes (1: one process); DVC's stages depend on each")
    return _build(LaunchConfig, section, "launch")


def _check_ranges(section: str, checks: list[tuple[bool, str]]) -> None:
    """The first failed check of a section, as its one-line error."""
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{section}: {message}")


def _check_across(params: Params) -> None:
    """Rules between sections, checked when params load, so before any stage runs: a setting
    that a later stage would refuse must never let an earlier one replace finished work (a
    `buffers.epochs` too short for a window would otherwise retrain, i.e. delete, the experts
    that distill@N then refuses)."""
    for key in STAGE_LISTS:
        extra = sorted(set(getattr(params, key)) - set(params.ipcs))
        if extra:
            raise ConfigError(f"evaluate.{key} lists IPC {extra[0]}, which distill.ipcs does "
                              f"not ({', '.join(map(str, params.ipcs))})")
    if params.cross_ipcs and not any(params.evaluation(i).cross_archs for i in params.cross_ipcs):
        raise ConfigError("evaluate.cross_ipcs lists IPCs but evaluate.cross_archs is empty: "
                          "name the other architectures, e.g. [convnet_bn]")
    counts = _snapshot_counts(params)
    if counts is None:  # snapshots every save_every steps of a data set of unknown size:
        return          # distill@N checks its window against the experts it reads
    matchable, last = counts
    for ipc, cfg in sorted(params.distills.items()):
        if cfg.window == "auto":  # chosen from the experts, to fit them (datm/windows.py)
            if cfg.expert_epochs > matchable:
                raise ConfigError(f"distill ipc {ipc}: expert_epochs (M) {cfg.expert_epochs} "
                                  f"is more than the {matchable} expert snapshots a matching "
                                  "reads (buffers.epochs less decay_epochs)")
        elif cfg.last_epoch_needed > matchable:
            raise ConfigError(
                f"distill ipc {ipc} reads expert snapshots up to T+ - 1 + M = "
                f"{cfg.last_epoch_needed} (max_start_epoch {cfg.max_start_epoch} - 1 + "
                f"expert_epochs {cfg.expert_epochs}), but the experts have {matchable} before "
                "their decay tail: raise buffers.epochs or lower max_start_epoch / expert_epochs")
        if cfg.label_epoch > last:
            raise ConfigError(
                f"distill ipc {ipc}: label_epoch {cfg.label_epoch} is past the experts' last "
                f"snapshot ({last}): use -1 (the last) or at most {last}")


# Training images of the built-in data sets: with buffers.save_every, how many snapshots the
# experts will have is known before they train.
TRAIN_IMAGES = {"fashion_mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000,
                "tiny_imagenet": 100_000}


def _snapshot_counts(params: Params) -> tuple[int, int] | None:
    """(the last snapshot a matching may read, the last snapshot) of the experts these params
    train, or None where that depends on a data set's size not known before it loads."""
    cfg = params.buffers
    if not cfg.save_every:
        return cfg.epochs - cfg.decay_epochs, cfg.epochs
    images = TRAIN_IMAGES.get(params.data.name)
    if images is None:
        return None
    steps_per_epoch = images // min(cfg.batch, images)
    return cfg.matchable(steps_per_epoch), len(cfg.snapshot_steps(steps_per_epoch)) - 1


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_device(device: str) -> None:
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{device}'")


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return Params.from_dict(_merge(raw, overrides or {}))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out
