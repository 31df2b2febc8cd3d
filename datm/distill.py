"""Difficulty-aligned trajectory matching (DATM): the distillation loop for one IPC.

A `Distiller` owns the whole state of a run (synthetic images, soft labels, learned lr, the
three optimizers' momenta, the RNG, the iteration and the history), can save it to a checkpoint
and continue from one, so an interrupted run ends bit-identical to an uninterrupted one on CPU.
With `select_every` on, it also keeps the best set so far on a validation split of the training
images (never the test split; docs/METHOD.md, "Selection on a validation split"), kept as state.

On W processes (a `Group`, datm/distributed.py) every rank holds the whole state and draws the
same random plan; each computes its part of every mini-batch and the gradients are summed
(datm/matching.py), so all ranks make the same update. Only the main rank writes checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import artifacts, evaluate
from .augment import AugConfig
from .config import DistillConfig
from .distributed import SINGLE, Group
from .errors import UserError
from .events import Callback
from .experts import ExpertBuffer
from .initialization import initialize
from .matching import make_plan, match
from .networks import FlatModel, NetSpec
from .precision import numerics

CHECKPOINT = "distill-checkpoint"
RESULT = "distilled"
HISTORY_COLUMNS = ("iteration", "loss", "start_epoch", "upper_bound", "lr", "skipped")
SELECT_SEED = 7013    # offset of the selection networks' seeds from evaluate.seed


class DistillError(UserError):
    """A setting or state that makes distillation impossible; the message is for a user."""


def upper_bound(cfg: DistillConfig, iteration: int) -> int:
    """U for this iteration: T+ without SG, else T growing linearly to T+ by `sg_end`."""
    if cfg.sg_start is None:
        return cfg.max_start_epoch
    grown = cfg.sg_start + int((cfg.max_start_epoch - cfg.sg_start) * iteration / cfg.sg_end)
    return min(cfg.max_start_epoch, grown)


def check_buffer(cfg: DistillConfig, buffer: ExpertBuffer) -> None:
    if buffer.matchable < cfg.last_epoch_needed:
        tail = (f" before their decay tail ({buffer.snapshots - buffer.matchable} of "
                f"{buffer.snapshots} snapshots, which no matching reads)"
                if buffer.matchable < buffer.snapshots else "")
        raise DistillError(
            f"distill ipc {cfg.ipc} reads expert snapshots up to T+ - 1 + M = "
            f"{cfg.last_epoch_needed}, but the experts hold only {buffer.matchable}{tail}: raise "
            "buffers.epochs or lower T+ / M")
    if cfg.label_epoch > buffer.snapshots:
        raise DistillError(
            f"distill ipc {cfg.ipc}: label_epoch {cfg.label_epoch} is past the experts' last "
            f"snapshot {buffer.snapshots}: use -1 (the last) or at most {buffer.snapshots}")


def initial_lr(cfg: DistillConfig, buffer: ExpertBuffer) -> float:
    """The student's first step size: the experts' mean lr over the snapshots the window reads,
    [T-, T+ - 1 + M) (their constant lr, or e.g. the late, small lrs of a cosine schedule)."""
    return buffer.lr_over(cfg.min_start_epoch, cfg.last_epoch_needed)


def segment_scale(cfg: DistillConfig, buffer: ExpertBuffer, start: int) -> float:
    """What the learned lr is multiplied by to follow the segment [start, start + M): the
    segment's own mean lr over the window's (1 for constant-lr experts; `segment_lr` off: 1)."""
    if not cfg.segment_lr:
        return 1.0
    return buffer.lr_over(start, start + cfg.expert_epochs) / initial_lr(cfg, buffer)


@dataclass
class _Momenta:
    images: torch.Tensor
    labels: torch.Tensor
    lr: torch.Tensor


@dataclass(frozen=True)
class Selection:
    """What judging a set needs: the evaluation recipe and images held out of the TRAINING split.

    Deliberately no test split here: choosing among sets by test accuracy (as the reference
    does) makes the reported test accuracy optimistic.
    """

    spec: NetSpec                  # the evaluation network
    eval_cfg: evaluate.EvalConfig  # the evaluation recipe (its lr rule, batch, momentum, ...)
    aug: AugConfig
    x_val: torch.Tensor
    y_val: torch.Tensor


@dataclass
class _Best:
    images: torch.Tensor
    labels: torch.Tensor
    lr: torch.Tensor
    iteration: int
    val_acc: float


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
    init_report: dict = field(default_factory=dict)   # how the initial set was chosen
    selection: Selection | None = None                # inputs, not state: given at create/resume
    best: _Best | None = None                         # the best set on the validation split so far
    selections: list[list[float]] = field(default_factory=list)  # [iteration, val accuracy]
    group: Group = SINGLE   # the processes computing this run together (not state)
    # The set the run started from (images, labels, lr): saved with every checkpoint and the
    # result, so "the initialization alone" is measured on exactly these tensors
    start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.fm = FlatModel(self.buffer.spec, self.images.device).train(True)
        _check_run(self.cfg, self.buffer.spec, self.selection, self.group)

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def create(cls, cfg: DistillConfig, buffer: ExpertBuffer, x_real: torch.Tensor,
               y_real: torch.Tensor, aug: AugConfig, selection: Selection | None = None,
               group: Group = SINGLE) -> Distiller:
        """Fresh state: initial images and labels from real data and the experts.

        Every rank of `group` computes the same state: the RNG is seeded by cfg.seed alone.
        """
        check_buffer(cfg, buffer)
        _check_run(cfg, buffer.spec, selection, group)  # before initialize's collectives
        generator = torch.Generator().manual_seed(cfg.seed)
        # Judged in float32 whatever `precision` is: TF32 rounding would move the experts'
        # margins, and real_hard picks exactly the images with the smallest ones.
        with numerics("float32", x_real.device):
            images, labels, report = initialize(cfg, buffer, x_real, y_real, generator,
                                                group=group)
        lr = torch.tensor(cfg.lr_init or initial_lr(cfg, buffer), device=x_real.device)
        momenta = _Momenta(torch.zeros_like(images), torch.zeros_like(labels), torch.zeros_like(lr))
        return cls(cfg, buffer, aug, images, labels, lr, generator, momenta,
                   init_report=report, selection=selection, group=group,
                   start=(images.clone(), labels.clone(), lr.clone()))

    # --- one iteration --------------------------------------------------------------------

    def step(self) -> dict:
        cfg, gen = self.cfg, self.generator
        bound = upper_bound(cfg, self.iteration)
        expert = int(torch.randint(len(self.buffer), (1,), generator=gen))
        start_epoch = int(torch.randint(cfg.min_start_epoch, bound, (1,), generator=gen))
        ends = self.buffer.snapshots_of(expert, [start_epoch, start_epoch + cfg.expert_epochs])
        start, target = ends.to(self.images.device).unbind(0)
        plan = make_plan(self.images.shape[0], cfg.batch_syn or self.images.shape[0],
                         cfg.syn_steps, self.images.shape[-1], self.aug, gen)
        # One process calls match as it always did; several pass their group.
        split = {"group": self.group} if self.group.distributed else {}
        scale = segment_scale(cfg, self.buffer, start_epoch)
        with numerics(cfg.precision, self.images.device):
            result = match(cfg.mode, self.fm, self.images, self.labels, self.lr * scale, start,
                           target, plan, self.aug, skip_above=cfg.threshold, **split)
        if result.has_grad and scale != 1.0:
            result.grad_lr = result.grad_lr * scale  # d loss / d lr through lr x scale
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
        """Iterate to `cfg.iterations`, checkpointing every `checkpoint_every` iterations.

        With selection on, the set is judged every `select_every` iterations and at the end,
        before that iteration's checkpoint, and a checkpoint follows every judgment so a kill
        never throws the (slow) evaluation away. The iteration's event then carries `val_acc`.
        A run later given more iterations keeps its old end among the candidates.
        """
        cfg = self.cfg
        # Ranks resumed from different checkpoints (e.g. machines without a shared disk) would
        # mix two runs in every all-reduce: refuse before the first one.
        if self.group.distributed:
            self.group.check_same("the distillation state", self.fingerprint())
        while self.iteration < cfg.iterations:
            info = self.step()
            judged = bool(cfg.select_every) and (self.iteration % cfg.select_every == 0
                                                 or self.iteration == cfg.iterations)
            if judged:
                info["val_acc"] = self.select()
            if judged or self.iteration % cfg.checkpoint_every == 0 \
                    or self.iteration == cfg.iterations:
                self.check_sane()  # before a checkpoint or the result keeps a diverged set
                if checkpoint and self.group.is_main:
                    self.save_checkpoint(checkpoint, identity)
            if callback:
                callback(info)

    def check_sane(self) -> None:
        """Refuse a set that diverged, naming the step size that drove it: NaN/inf anywhere,
        images beyond PIXEL_BOUND x the initial set's largest |value|, logits beyond
        LOGIT_BOUND x the initial labels' (at least LOGIT_FLOOR), or an lr outside (0, MAX_LR]."""
        problem = set_problem(self.images, self.labels, self.lr, self.start)
        if problem:
            setting, what = problem
            raise DistillError(f"distill ipc {self.cfg.ipc} diverged by iteration "
                               f"{self.iteration}: {what}: lower {setting} (now "
                               f"{getattr(self.cfg, setting):g}); the last good checkpoint "
                               "and any finished set are kept")

    def fingerprint(self) -> torch.Tensor:
        """A few numbers that differ between two states: iteration, sums of the set, lr, RNG."""
        rng = self.generator.get_state().double()
        sums = [t.sum(dtype=torch.float64).cpu() for t in (self.images, self.labels, self.lr)]
        return torch.stack([torch.tensor(float(self.iteration), dtype=torch.float64), *sums,
                            (rng * torch.arange(1, len(rng) + 1)).sum()])

    # --- selection on the validation split ------------------------------------------------

    def select(self) -> float:
        """Judge the current set on the validation split; keep it if it beats the best so far.

        Fresh evaluation networks (the evaluation recipe, `select_epochs`, `select_models`) train
        on the set at lr = learned lr x lr_scale. Every judgment uses the same network seeds, so
        sets are compared on equal terms; a tie keeps the earlier set, as the reference does.
        The evaluation has its own generators: the distillation's RNG stream is untouched.
        """
        cfg, sel = self.cfg, self.selection
        assert sel is not None  # __post_init__ refuses select_every without a selection
        lr = evaluate.distilled_lr(sel.eval_cfg, float(self.lr))
        acc = float("nan")  # a diverged set (lr or images not finite) is never chosen
        if math.isfinite(lr) and lr > 0 and bool(torch.isfinite(self.images).all()):
            acc = evaluate.evaluate_set(sel.spec, self.images.detach(), self.labels.detach(), lr,
                                        cfg.select_epochs, cfg.select_models, sel.eval_cfg,
                                        sel.aug, sel.x_val, sel.y_val,
                                        sel.eval_cfg.seed + SELECT_SEED,
                                        group=self.group)["mean"]
        self.selections.append([self.iteration, acc])
        if math.isfinite(acc) and (self.best is None or acc > self.best.val_acc):
            self.best = _Best(self.images.clone(), self.labels.clone(), self.lr.clone(),
                              self.iteration, acc)
        return acc

    # --- persistence ----------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        history = torch.tensor(self.history, dtype=torch.float64).reshape(-1, len(HISTORY_COLUMNS))
        out = {"images": self.images, "labels": self.labels, "lr": self.lr.reshape(1),
               "history": history}
        if self.start is not None:
            images, labels, lr = self.start
            out.update(init_images=images, init_labels=labels, init_lr=lr.reshape(1))
        return out

    def _selection_meta(self) -> dict:
        best = self.best
        return {"every": self.cfg.select_every, "history": self.selections,
                "iteration": best.iteration if best else None,
                "val_acc": best.val_acc if best else None}

    def save_checkpoint(self, path: str | Path, identity: str = "") -> None:
        tensors = {**self._tensors(), "m_images": self.momenta.images,
                   "m_labels": self.momenta.labels, "m_lr": self.momenta.lr.reshape(1),
                   "rng": self.generator.get_state()}
        if self.best is not None:
            tensors.update(best_images=self.best.images, best_labels=self.best.labels,
                           best_lr=self.best.lr.reshape(1))
        meta = {"identity": identity, "iteration": self.iteration, "skipped": self.skipped,
                "nonfinite": self.nonfinite, "nonfinite_run": self.nonfinite_run,
                "init": self.init_report, "selection": self._selection_meta()}
        artifacts.save(path, tensors, CHECKPOINT, meta)

    @classmethod
    def resume(cls, path: str | Path, cfg: DistillConfig, buffer: ExpertBuffer, aug: AugConfig,
               identity: str = "", device: torch.device | str = "cpu",
               selection: Selection | None = None, group: Group = SINGLE) -> Distiller | None:
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
        chosen = meta.get("selection") or {}
        best = None
        if "best_images" in tensors:
            best = _Best(to(tensors["best_images"]), to(tensors["best_labels"]),
                         to(tensors["best_lr"].reshape(())), chosen["iteration"],
                         chosen["val_acc"])
        start = None
        if "init_images" in tensors:
            start = (to(tensors["init_images"]), to(tensors["init_labels"]),
                     to(tensors["init_lr"].reshape(())))
        return cls(cfg, buffer, aug, to(tensors["images"]), to(tensors["labels"]),
                   to(tensors["lr"].reshape(())), generator, momenta, meta["iteration"],
                   meta["skipped"], meta["nonfinite"], meta["nonfinite_run"],
                   tensors["history"].tolist(), init_report=meta.get("init", {}),
                   selection=selection, best=best, selections=chosen.get("history", []),
                   group=group, start=start)

    def save_result(self, path: str | Path, meta: dict) -> Path:
        """The result: the final set, or with selection on the best one on the validation split.

        `iteration` stays the number of iterations run; `selection.iteration` names the one kept.
        """
        full = {"ipc": self.cfg.ipc, "iteration": self.iteration, "skipped": self.skipped,
                "nonfinite": self.nonfinite, "settings": asdict(self.cfg),
                "aug": asdict(self.aug), "spec": self.buffer.spec.to_dict(),
                "history_columns": list(HISTORY_COLUMNS), "init": self.init_report, **meta}
        tensors = self._tensors()
        if self.cfg.select_every:
            full["selection"] = self._selection_meta()
        if self.best is not None:
            tensors.update(images=self.best.images, labels=self.best.labels,
                           lr=self.best.lr.reshape(1))
        return artifacts.save(path, tensors, RESULT, full)


# A working distillation can move its images far beyond their initial scale (a tiny 8 px
# `datm init` project at IPC 1, lr_img 1000: over 100x); a diverging one by orders of
# magnitude more (lr_img 1e9: 1e6x)
PIXEL_BOUND = 1000.0  # x the initial images' largest |value| (model space)
LOGIT_BOUND = 1000.0  # x the initial label logits' largest |value| ...
LOGIT_FLOOR = 1e4     # ... but at least this (hard labels start at ~11)
MAX_LR = 10.0        # as config.MAX_LR: no SGD lr of these networks trains above it


def set_problem(images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
                start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
                ) -> tuple[str, str] | None:
    """(the setting to lower, what is wrong) when a set has diverged, else None."""
    def peak(t: torch.Tensor) -> float:
        return float(t.detach().abs().max()) if t.numel() else 0.0

    if not bool(torch.isfinite(images).all()):
        return "lr_img", "its images hold NaN/inf"
    if not bool(torch.isfinite(labels).all()):
        return "lr_y", "its label logits hold NaN/inf"
    value = float(lr)
    if not math.isfinite(value) or not 0 < value <= MAX_LR:
        return "lr_lr", f"its learned lr is {value:g}, outside (0, {MAX_LR:g}]"
    if start is not None:
        limit = PIXEL_BOUND * max(peak(start[0]), 1e-6)
        if peak(images) > limit:
            return "lr_img", f"its images reach {peak(images):.3g} (bound {limit:.3g})"
        limit = max(LOGIT_FLOOR, LOGIT_BOUND * peak(start[1]))
        if peak(labels) > limit:
            return "lr_y", f"its label logits reach {peak(labels):.3g} (bound {limit:.3g})"
    return None


def _check_run(cfg: DistillConfig, spec: NetSpec, selection: Selection | None,
               group: Group) -> None:
    """What a run refuses whatever its state: raised before any collective, so every rank
    raises it alike instead of waiting in one."""
    if cfg.select_every and selection is None:
        raise DistillError(f"distill ipc {cfg.ipc}: select_every needs a validation split (a "
                           "Selection); set select_every: 0 to keep the final set")
    if group.distributed and cfg.mode != "recompute":
        raise DistillError(f"distill ipc {cfg.ipc}: mode {cfg.mode} runs in one process, not "
                           f"{group.world}: use mode recompute")
    if group.distributed and spec.norm == "batch":
        raise DistillError(f"distill ipc {cfg.ipc}: batch norm couples a mini-batch, which "
                           f"{group.world} processes split: use one process")
