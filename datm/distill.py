"""Difficulty-aligned trajectory matching (DATM): the distillation loop for one IPC.

A `Distiller` owns the whole state of a run (synthetic images, soft labels, learned lr, the
three optimizers' momenta, the RNG, the iteration and the history), can save it to a checkpoint
and continue from one, so an interrupted run ends bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import artifacts
from .augment import AugConfig
from .errors import UserError
from .events import Callback
from .experts import ExpertBuffer
from .matching import MODES, make_plan, match
from .networks import FlatModel
from .precision import PRECISIONS, numerics

CHECKPOINT = "distill-checkpoint"
RESULT = "distilled"
INITS = ("real_correct", "real", "noise")
LABELS = ("expert", "hard")
HISTORY_COLUMNS = ("iteration", "loss", "start_epoch", "upper_bound", "lr", "skipped")


class DistillError(UserError):
    """A setting or state that makes distillation impossible; the message is for a user."""


@dataclass(frozen=True)
class DistillConfig:
    """One IPC's settings; names follow ALGORITHM.md section 4 (N, M, T-, T, T+, ...)."""

    ipc: int
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
    lr_init: float = 0.0              # 0: the experts' lr
    iterations: int = 100
    threshold: float = 1.0
    init: str = "real_correct"
    labels: str = "expert"            # expert logits (DATM) or hard one-hot (always, for noise)
    learn_labels: bool = True
    mode: str = "recompute"
    precision: str = "float32"        # float32 | tf32 (CUDA) | bf16 autocast; see bench/precision.py
    seed: int = 0
    checkpoint_every: int = 25
    grid_every: int = 100             # iterations between image grids in MLflow
    max_nonfinite: int = 10           # consecutive NaN/inf losses before giving up

    def __post_init__(self) -> None:
        checks = [
            (self.ipc >= 1, "ipc must be >= 1"),
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
        iterations resumes from its checkpoint instead of starting over.
        """
        skip = ("checkpoint_every", "grid_every", "iterations")
        keep = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps([keep, extra], sort_keys=True).encode()).hexdigest()[:16]


def upper_bound(cfg: DistillConfig, iteration: int) -> int:
    """U for this iteration: T+ without SG, else T growing linearly to T+ by `sg_end`."""
    if cfg.sg_start is None:
        return cfg.max_start_epoch
    grown = cfg.sg_start + int((cfg.max_start_epoch - cfg.sg_start) * iteration / cfg.sg_end)
    return min(cfg.max_start_epoch, grown)


def check_buffer(cfg: DistillConfig, buffer: ExpertBuffer) -> None:
    if buffer.epochs < cfg.last_epoch_needed:
        raise DistillError(
            f"distill ipc {cfg.ipc} reads expert epochs up to T+ - 1 + M = {cfg.last_epoch_needed}, "
            f"but the experts hold only {buffer.epochs}: raise buffers.epochs or lower T+ / M")


def _hard_logits(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    # Logits whose softmax puts 1 - 1e-4 on the true class: one-hot as far as CE can tell.
    margin = math.log(1e4 * (num_classes - 1)) if num_classes > 1 else 0.0
    return torch.nn.functional.one_hot(y, num_classes).float() * margin


@dataclass
class _Momenta:
    images: torch.Tensor
    labels: torch.Tensor
    lr: torch.Tensor


@dataclass
class Distiller:
    cfg: DistillConfig
    buffer: ExpertBuffer
    aug: AugConfig
    images: torch.Tensor
    labels: torch.Tensor
    lr: torch.Tensor
    generator: torch.Generator
    momenta: _Momenta
    iteration: int = 0
    skipped: int = 0
    nonfinite: int = 0
    nonfinite_run: int = 0
    history: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fm = FlatModel(self.buffer.spec, self.images.device).train(True)

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def create(cls, cfg: DistillConfig, buffer: ExpertBuffer, x_real: torch.Tensor,
               y_real: torch.Tensor, aug: AugConfig) -> Distiller:
        """Fresh state: initial images and labels from real data and the experts."""
        check_buffer(cfg, buffer)
        generator = torch.Generator().manual_seed(cfg.seed)
        images, labels = initialize(cfg, buffer, x_real, y_real, generator)
        lr = torch.tensor(cfg.lr_init or buffer.lr, device=x_real.device)
        momenta = _Momenta(torch.zeros_like(images), torch.zeros_like(labels), torch.zeros_like(lr))
        return cls(cfg, buffer, aug, images, labels, lr, generator, momenta)

    # --- one iteration --------------------------------------------------------------------

    def step(self) -> dict:
        cfg, gen = self.cfg, self.generator
        bound = upper_bound(cfg, self.iteration)
        expert = int(torch.randint(len(self.buffer), (1,), generator=gen))
        start_epoch = int(torch.randint(cfg.min_start_epoch, bound, (1,), generator=gen))
        ends = self.buffer.epochs_of(expert, [start_epoch, start_epoch + cfg.expert_epochs])
        start, target = ends.to(self.images.device).unbind(0)
        plan = make_plan(self.images.shape[0], cfg.batch_syn or self.images.shape[0],
                         cfg.syn_steps, self.images.shape[-1], self.aug, gen)
        with numerics(cfg.precision, self.images.device):
            result = match(cfg.mode, self.fm, self.images, self.labels, self.lr, start, target,
                           plan, self.aug, skip_above=cfg.threshold)
        finite = math.isfinite(result.loss)
        if not finite:
            self.nonfinite += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= cfg.max_nonfinite:
                raise DistillError(
                    f"distill ipc {cfg.ipc}: the matching loss was NaN/inf {self.nonfinite_run} "
                    f"iterations in a row at iteration {self.iteration}: lower lr_img or lr_lr")
        else:
            self.nonfinite_run = 0
        if result.has_grad:
            self._update(result.grad_images, result.grad_labels, result.grad_lr)
        else:
            self.skipped += 1
        self.history.append([self.iteration, result.loss, start_epoch, bound, float(self.lr),
                             self.skipped])
        self.iteration += 1
        return {"event": "iteration", "iteration": self.iteration,
                "iterations": cfg.iterations, "loss": result.loss,
                "start_epoch": start_epoch, "upper_bound": bound, "lr": float(self.lr),
                "skipped": self.skipped, "nonfinite": self.nonfinite, "updated": result.has_grad,
                "expert": expert}

    def _update(self, g_images: torch.Tensor, g_labels: torch.Tensor, g_lr: torch.Tensor) -> None:
        """SGD with momentum (torch.optim.SGD's rule), kept by hand so its state is three tensors."""
        cfg, m = self.cfg, self.momenta
        m.images = 0.5 * m.images + g_images
        self.images = self.images - cfg.lr_img * m.images
        m.lr = 0.5 * m.lr + g_lr
        self.lr = self.lr - cfg.lr_lr * m.lr
        if cfg.learn_labels:
            m.labels = 0.9 * m.labels + g_labels
            self.labels = self.labels - cfg.lr_y * m.labels

    def run(self, callback: Callback | None = None, checkpoint: str | Path | None = None,
            identity: str = "") -> None:
        """Iterate to `cfg.iterations`, checkpointing every `checkpoint_every` iterations."""
        while self.iteration < self.cfg.iterations:
            info = self.step()
            if checkpoint and (self.iteration % self.cfg.checkpoint_every == 0
                               or self.iteration == self.cfg.iterations):
                self.save_checkpoint(checkpoint, identity)
            if callback:
                callback(info)

    # --- persistence ----------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        history = torch.tensor(self.history, dtype=torch.float64).reshape(-1, len(HISTORY_COLUMNS))
        return {"images": self.images, "labels": self.labels, "lr": self.lr.reshape(1),
                "history": history}

    def save_checkpoint(self, path: str | Path, identity: str = "") -> None:
        tensors = {**self._tensors(), "m_images": self.momenta.images,
                   "m_labels": self.momenta.labels, "m_lr": self.momenta.lr.reshape(1),
                   "rng": self.generator.get_state()}
        meta = {"identity": identity, "iteration": self.iteration, "skipped": self.skipped,
                "nonfinite": self.nonfinite, "nonfinite_run": self.nonfinite_run}
        artifacts.save(path, tensors, CHECKPOINT, meta)

    @classmethod
    def resume(cls, path: str | Path, cfg: DistillConfig, buffer: ExpertBuffer, aug: AugConfig,
               identity: str = "", device: torch.device | str = "cpu") -> Distiller | None:
        """The state saved at `path`, or None if there is none for this exact run."""
        if not Path(path).exists():
            return None
        try:
            tensors, meta = artifacts.load(path, CHECKPOINT)
        except artifacts.ArtifactError:
            return None  # a damaged checkpoint means starting over, not failing
        if meta.get("identity") != identity or meta["iteration"] > cfg.iterations:
            return None  # another run, or one already past this run's end: start over
        check_buffer(cfg, buffer)
        generator = torch.Generator()
        generator.set_state(tensors["rng"])
        to = lambda t: t.to(device)  # noqa: E731
        momenta = _Momenta(to(tensors["m_images"]), to(tensors["m_labels"]),
                           to(tensors["m_lr"].reshape(())))
        return cls(cfg, buffer, aug, to(tensors["images"]), to(tensors["labels"]),
                   to(tensors["lr"].reshape(())), generator, momenta, meta["iteration"],
                   meta["skipped"], meta["nonfinite"], meta["nonfinite_run"],
                   tensors["history"].tolist())

    def save_result(self, path: str | Path, meta: dict) -> Path:
        full = {"ipc": self.cfg.ipc, "iteration": self.iteration, "skipped": self.skipped,
                "nonfinite": self.nonfinite, "settings": asdict(self.cfg),
                "aug": asdict(self.aug), "spec": self.buffer.spec.to_dict(),
                "history_columns": list(HISTORY_COLUMNS), **meta}
        return artifacts.save(path, self._tensors(), RESULT, full)


# --- initialization ----------------------------------------------------------------------------

@torch.no_grad()
def initialize(cfg: DistillConfig, buffer: ExpertBuffer, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial synthetic images [C*ipc, ...] (class-major) and label logits [C*ipc, C]."""
    num_classes = buffer.spec.num_classes
    if cfg.init == "noise":
        # Noise has no class content for experts to judge: its labels are the hard classes.
        images = torch.randn(num_classes * cfg.ipc, *x.shape[1:], generator=generator)
        class_ids = torch.arange(num_classes).repeat_interleave(cfg.ipc)
        return images.to(x.device), _hard_logits(class_ids, num_classes).to(x.device)
    per_class = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
    short = [(c, len(i)) for c, i in enumerate(per_class) if len(i) < cfg.ipc]
    if short:
        c, n = short[0]
        raise DistillError(f"IPC {cfg.ipc} needs {cfg.ipc} real images per class, but class {c} "
                           f"has {n}: lower the IPC or use init: noise")
    epoch = min(cfg.max_start_epoch, buffer.epochs)
    fm = FlatModel(buffer.spec, x.device).train(True)
    thetas = torch.cat([buffer.epochs_of(k, [epoch]) for k in range(len(buffer))]).to(x.device)
    reference = int(torch.randint(len(buffer), (1,), generator=generator))
    chosen = []
    for c, idx in enumerate(per_class):
        order = idx[torch.randperm(len(idx), generator=generator).to(idx.device)]
        if cfg.init == "real_correct":
            pool = order[: max(8 * cfg.ipc, 256)]
            right = fm(thetas[reference], x[pool]).argmax(1) == c
            # Correct ones first (in random order), then the rest if a class has too few.
            order = torch.cat([pool[right], pool[~right], order[len(pool):]])
        chosen.append(order[: cfg.ipc])
    index = torch.cat(chosen)
    images = x[index].clone()
    if cfg.labels == "hard":
        return images, _hard_logits(y[index], num_classes).to(x.device)
    return images, expert_logits(fm, thetas, x[index], y[index])


def expert_logits(fm: FlatModel, thetas: torch.Tensor, x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """Per image, the mean logits of the experts that classify it correctly (all if none do)."""
    logits = torch.stack([fm(t, x) for t in thetas])                  # [K, n, C]
    right = (logits.argmax(-1) == y).float()                          # [K, n]
    weight = torch.where(right.sum(0, keepdim=True) > 0, right, torch.ones_like(right))
    return (logits * weight[..., None]).sum(0) / weight.sum(0)[:, None]
