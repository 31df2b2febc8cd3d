"""Expert trajectories: K networks trained on the real data, parameters saved every few steps.

Experts can train in groups as one batched model (torch.func.vmap over stacked flat parameters),
meant to keep a GPU busy with small ConvNets; a group of one is the plain one-at-a-time loop.
On an H100 one width-128 ConvNet at batch 256 already saturates the GPU (batched x8: 0.95x the
images/s at 8x the memory, bench/RESULTS.md), so every profile uses groups of one. Each
finished expert is one safetensors file, written atomically; an unfinished group saves its whole
state at every snapshot (`progress_<first>.safetensors`), so a killed run resumes at its last
snapshot with the same bytes and never recomputes a finished expert.

On W processes (a `Group`, datm/distributed.py; not to be confused with `ExpertConfig.group`,
the experts batched into one model) rank r trains the r-th, (r + W)-th, ... batch of missing
experts into the same (shared) folder. An expert's seeds come from its index alone, so its file
is the same bytes whichever rank, and however many, trained it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from . import artifacts, flat_minimum
from .augment import AugConfig, augment
from .compiled import maybe_compile
from .config import ExpertConfig
from .distributed import SINGLE, Group
from .errors import UserError
from .events import Callback
from .networks import FlatModel, NetSpec
from .provenance import code_digest

KIND = "expert"
PROGRESS_KIND = "expert-progress"  # an unfinished group's state at its last snapshot
PROGRESS_SECONDS = 30.0  # an unfinished group's state is saved at a snapshot this often
# No trained ConvNet weight comes near this (init ~0.1-1, trained experts < 10): a larger one
# is a diverged or damaged trajectory
MAX_WEIGHT = 1e4
# Modules whose code decides an expert's trajectory (the model-space data: data, zca).
EXPERT_CODE = ("datm.experts", "datm.flat_minimum", "datm.networks", "datm.augment", "datm.data",
               "datm.zca", "datm.compiled")


def config_hash(spec: NetSpec, cfg: ExpertConfig, aug: AugConfig, data_id: str) -> str:
    """Identity of what an expert file contains; `num_experts` and `group` do not change it."""
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("num_experts", "group")}
    # The code that computes a trajectory from model-space data: a fix there (or a layer change
    # such as the 28 px first-conv padding) must retrain experts the `persist` output keeps.
    code = code_digest(*EXPERT_CODE)
    payload = json.dumps([spec.to_dict(), recipe, asdict(aug), data_id, code], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def expert_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"expert_{index:03d}.safetensors"


def _batched_grad(fm: FlatModel, weight_decay: float, group: int, compile: bool = False):
    """(gradient, number correct) of the cross-entropy for stacked experts [G, P].

    A group of one runs plain autograd: on a CPU it is ~1.5x faster than torch.func's grad and
    ~3x faster than vmap, whose batched convolutions only pay off on a GPU; `compile` compiles
    its loss (datm/compiled.py).
    """
    def loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        logits = fm(theta, x)
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).sum()

    if group == 1:
        plain_loss = maybe_compile(loss, compile)

        def single(thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
            theta = thetas[0].detach().requires_grad_()
            with torch.enable_grad():
                value, correct = plain_loss(theta, x[0], y[0])
                (g,) = torch.autograd.grad(value, theta)
            return g[None], correct[None]
        base = single
    else:
        base = vmap(grad(loss, has_aux=True))
    if weight_decay == 0:
        return base

    def with_decay(thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        g, correct = base(thetas, x, y)
        return g + weight_decay * thetas, correct
    return with_decay


@torch.no_grad()
def accuracy(fm: FlatModel, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             chunk: int = 2048) -> list[float]:
    """Accuracy of each of the stacked parameter vectors `thetas` [G, P] on (x, y)."""
    forward = vmap(fm, in_dims=(0, None))
    correct = torch.zeros(thetas.shape[0], device=thetas.device)
    for start in range(0, x.shape[0], chunk):
        logits = forward(thetas, x[start:start + chunk])
        correct += (logits.argmax(-1) == y[start:start + chunk]).sum(-1)
    return (correct / x.shape[0]).tolist()


@dataclass
class GroupState:
    """An unfinished group of experts at a snapshot: all a later process needs to continue it
    with the same bytes (parameters, SGD velocity, each expert's RNG and epoch order, the
    trajectory rows and history so far)."""

    step: int
    thetas: torch.Tensor
    velocity: torch.Tensor
    rng: list[torch.Tensor]
    perms: torch.Tensor | None
    rows: list[torch.Tensor]
    history: dict

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"thetas": self.thetas, "velocity": self.velocity, "rows": torch.stack(self.rows),
               **{f"rng_{j}": r for j, r in enumerate(self.rng)}}
        if self.perms is not None:
            out["perms"] = self.perms
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> GroupState:
        rng = [tensors[f"rng_{j}"] for j in range(len(meta["experts"]))]
        return cls(meta["step"], tensors["thetas"], tensors["velocity"], rng,
                   tensors.get("perms"), list(tensors["rows"].unbind(0)), meta["history"])


def train_group(fm: FlatModel, seeds: list[int], x: torch.Tensor, y: torch.Tensor,
                x_test: torch.Tensor, y_test: torch.Tensor, cfg: ExpertConfig, aug: AugConfig,
                callback: Callback | None = None, state: GroupState | None = None,
                on_snapshot: Callable[[GroupState], None] | None = None
                ) -> tuple[torch.Tensor, dict]:
    """Train len(seeds) experts together; returns trajectories [G, snapshots + 1, P] and history.

    A row is recorded after every `save_every` SGD steps (counted over the whole run; 0: every
    epoch) and after the last step. History: per snapshot segment the mean lr (`lrs`) and the
    training accuracy (`train_acc`), per epoch the test accuracy (`test_acc`). `state`
    continues a group from a snapshot; `on_snapshot` gets the state at every snapshot but the
    last, which is what a resume needs.
    """
    device = x.device
    n = x.shape[0]
    bs = min(cfg.batch, n)
    steps_per_epoch = n // bs
    total = cfg.epochs * steps_per_epoch
    snapshots = set(cfg.snapshot_steps(steps_per_epoch))
    grad_fn = _batched_grad(fm, cfg.weight_decay, len(seeds), cfg.compile)
    gens = [torch.Generator().manual_seed(s + 7919) for s in seeds]
    if state is None:
        thetas = torch.stack([fm.init(s) for s in seeds]).to(device)
        state = GroupState(0, thetas, torch.zeros_like(thetas), [], None, [thetas.cpu()],
                           {"train_acc": [], "lrs": [], "test_acc": []})
    else:
        for g, rng in zip(gens, state.rng):
            g.set_state(rng)
    step, thetas, velocity, history = state.step, state.thetas.to(device), \
        state.velocity.to(device), state.history
    perms = None if state.perms is None else state.perms.to(device)
    rows = list(state.rows)
    correct = torch.zeros(len(seeds), device=device)
    seg_steps, seg_lr, tic = 0, 0.0, time.perf_counter()
    fm.train(True)
    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0:
            perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
        lr = cfg.step_lr(step, steps_per_epoch)
        idx = perms[:, within * bs:(within + 1) * bs]
        xb = torch.stack([augment(x[i], aug, g) for i, g in zip(idx, gens)])
        yb = y[idx]
        g, hits = grad_fn(thetas, xb, yb)
        correct += hits
        if cfg.rho > 0:
            # GSAM: descend along the gradient at the worst nearby point, on the same
            # augmented batch, minus alpha times g's part orthogonal to it.
            e = flat_minimum.perturbation(thetas, g, cfg.rho, cfg.adaptive)
            g_p, _ = grad_fn(thetas + e, xb, yb)
            g = flat_minimum.surrogate_gap_direction(g, g_p, cfg.alpha)
        velocity = cfg.momentum * velocity + g if cfg.momentum else g
        thetas = thetas - lr * velocity
        step, seg_steps, seg_lr = step + 1, seg_steps + 1, seg_lr + lr
        if callback:
            callback({"event": "step", "step": within + 1, "steps": steps_per_epoch,
                      "epoch": epoch})
        if step % steps_per_epoch and step not in snapshots:
            continue
        if not bool(torch.isfinite(thetas).all()):
            raise ExpertError(f"an expert diverged (NaN/inf weights) in epoch {epoch + 1} at lr "
                              f"{lr:.4g}: lower buffers.lr (finished experts are kept)")
        if step % steps_per_epoch == 0:
            history["test_acc"].append(accuracy(fm, thetas, x_test, y_test))
            if callback:
                callback({"event": "epoch", "epoch": epoch + 1, "epochs": cfg.epochs,
                          "train_acc": (correct / (seg_steps * bs)).tolist(),
                          "test_acc": history["test_acc"][-1],
                          "seconds": time.perf_counter() - tic})
            tic = time.perf_counter()
        if step in snapshots:
            rows.append(thetas.cpu())
            history["train_acc"].append((correct / (seg_steps * bs)).tolist())
            history["lrs"].append(seg_lr / seg_steps)
            correct.zero_()
            seg_steps, seg_lr = 0, 0.0
            if on_snapshot and step < total:
                on_snapshot(GroupState(step, thetas.cpu(), velocity.cpu(),
                                       [g.get_state() for g in gens],
                                       None if perms is None else perms.cpu(), rows, history))
    return torch.stack(rows, dim=1), history


PROBE_STEPS = 5


def probe(fm: FlatModel, x: torch.Tensor, y: torch.Tensor, cfg: ExpertConfig,
          aug: AugConfig) -> None:
    """A few training steps of expert 0's first epoch on its first batches: an error or a
    non-finite loss here (a setting that cannot train) is raised before anything is deleted."""
    short = replace(cfg, epochs=1, decay_epochs=0, save_every=0)
    n = min(len(x), PROBE_STEPS * min(cfg.batch, len(x)))
    seeds = [cfg.seed * 100_003]
    trajs, history = train_group(fm, seeds, x[:n], y[:n], x[:2], y[:2], short, aug)
    if not bool(torch.isfinite(trajs).all()):
        raise ExpertError(f"buffers: the experts' first {PROBE_STEPS} steps diverge (NaN/inf) at "
                          f"lr {cfg.lr}: lower buffers.lr")


class ExpertError(UserError):
    """Settings with which experts cannot train; the message is for a user."""


def train_experts(out_dir: str | Path, spec: NetSpec, x: torch.Tensor, y: torch.Tensor,
                  x_test: torch.Tensor, y_test: torch.Tensor, cfg: ExpertConfig, aug: AugConfig,
                  data_id: str = "", callback: Callback | None = None,
                  group: Group = SINGLE) -> list[Path]:
    """Make sure experts 0..K-1 exist in `out_dir`, training only the missing ones.

    With several ranks, `out_dir` must be one folder they all see, and every rank returns only
    once all K exist; the timeout of `group` must cover the wait for the slowest rank's last
    expert.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(spec, cfg, aug, data_id)
    fm = FlatModel(spec, x.device)
    # Prove the new settings can train (network builds, augmented batches run, the loss stays
    # finite) before dropping experts made with the old ones: a setting that fails must not
    # cost the finished work.
    probe(fm, x, y, cfg, aug)
    if group.is_main:  # one rank deletes, or two would race (and kill each other's temp files)
        _drop_stale(out_dir, digest, cfg.num_experts)
    todo = _missing(out_dir, cfg.num_experts, group)
    if callback:
        callback({"event": "start", "done": cfg.num_experts - len(todo),
                  "total": cfg.num_experts})
    # The batched groups are made first and dealt out whole, so each is the one a single
    # process would train: the same vmap batch, the same bytes (with groups of one, rank r
    # trains the r-th, (r + W)-th, ... missing expert).
    batches = [todo[start:start + cfg.group] for start in range(0, len(todo), cfg.group)]
    for batch in group.shard(batches):
        if callback:
            callback({"event": "group", "experts": batch})
        tic = time.perf_counter()
        progress = progress_path(out_dir, batch[0])
        state = _resumable(progress, digest, batch)

        saved = [time.monotonic()]

        def save_progress(at: GroupState, path: Path = progress, batch: list[int] = batch,
                          saved: list[float] = saved) -> None:
            # At most every PROGRESS_SECONDS: a snapshot every few steps would rewrite the
            # growing trajectory hundreds of times; any snapshot resumes to the same bytes.
            if time.monotonic() - saved[0] < PROGRESS_SECONDS:
                return
            artifacts.save(path, at.tensors(), PROGRESS_KIND,
                           {"hash": digest, "experts": batch, "step": at.step,
                            "history": at.history})
            saved[0] = time.monotonic()

        trajs, history = train_group(fm, [cfg.seed * 100_003 + k for k in batch], x, y,
                                     x_test, y_test, cfg, aug, callback, state=state,
                                     on_snapshot=save_progress)
        seconds = time.perf_counter() - tic
        steps_per_epoch = x.shape[0] // min(cfg.batch, x.shape[0])
        for j, k in enumerate(batch):
            meta = {"spec": spec.to_dict(), "config": asdict(cfg), "aug": asdict(aug),
                    "hash": digest, "index": k, "epochs": cfg.epochs,
                    "steps_per_epoch": steps_per_epoch,
                    "snapshot_steps": cfg.snapshot_steps(steps_per_epoch),
                    "matchable": cfg.matchable(steps_per_epoch),
                    "lrs": history["lrs"],
                    "train_acc": [a[j] for a in history["train_acc"]],
                    "test_acc": [a[j] for a in history["test_acc"]],
                    "images_seen": cfg.epochs * steps_per_epoch * min(cfg.batch, x.shape[0])}
            # Timings go to the callback (metrics, MLflow), never into the artifact: the same
            # settings must give the same bytes.
            artifacts.save(expert_path(out_dir, k), {"trajectory": trajs[j]}, KIND, meta)
            if callback:
                callback({"event": "expert", "index": k, "meta": meta,
                          "seconds": seconds / len(batch)})
        progress.unlink(missing_ok=True)
    group.barrier()  # the other ranks' experts exist too before anyone reads the folder
    return [expert_path(out_dir, k) for k in range(cfg.num_experts)]


def progress_path(out_dir: Path, first: int) -> Path:
    """The unfinished group starting at expert `first`: its state at its last snapshot."""
    return Path(out_dir) / f"progress_{first:03d}.safetensors"


def _resumable(path: Path, digest: str, batch: list[int]) -> GroupState | None:
    """The saved state of this very group under these settings, or None (start it afresh)."""
    if not path.exists():
        return None
    try:
        tensors, meta = artifacts.load(path, PROGRESS_KIND)
    except artifacts.ArtifactError:
        return None  # a damaged state is retrained rather than trusted
    if meta.get("hash") != digest or meta.get("experts") != batch:
        return None
    return GroupState.from_tensors(tensors, meta)


def _missing(out_dir: Path, total: int, group: Group) -> list[int]:
    """The experts not yet in `out_dir`, as the main rank sees them, on every rank.

    One listing, shared: a rank listing the folder later could already see an expert another
    rank has just written, and the ranks would shard different lists. The collective also keeps
    the others from writing before the main rank has dropped stale files.
    """
    if not group.distributed:
        return [k for k in range(total) if not expert_path(out_dir, k).exists()]
    flags = torch.zeros(total, dtype=torch.float64, device=group.device)
    if group.is_main:
        flags += torch.tensor([not expert_path(out_dir, k).exists() for k in range(total)],
                              dtype=torch.float64, device=group.device)
    return [k for k, f in enumerate(group.all_reduce_sum(flags).tolist()) if f]


def _drop_stale(out_dir: Path, digest: str, keep: int) -> None:
    """Remove experts made with other settings (or beyond K) so they are never mixed in."""
    for path in sorted(out_dir.glob("expert_*.safetensors")):
        try:
            meta = artifacts.read_meta(path, KIND)
            stale = meta.get("hash") != digest or meta.get("index", keep) >= keep
        except artifacts.ArtifactError:
            stale = True  # a damaged file is retrained rather than trusted
        if stale:
            path.unlink()
    for path in sorted(out_dir.glob("progress_*.safetensors")):
        try:
            stale = artifacts.read_meta(path, PROGRESS_KIND).get("hash") != digest
        except artifacts.ArtifactError:
            stale = True
        if stale:
            path.unlink()
    for tmp in [*out_dir.glob(".expert_*.tmp"), *out_dir.glob(".progress_*.tmp")]:
        tmp.unlink()


@dataclass
class ExpertBuffer:
    """Read access to a directory of experts: metadata up front, epochs on demand."""

    paths: list[Path]
    metas: list[dict]

    @classmethod
    def open(cls, directory: str | Path) -> ExpertBuffer:
        paths = sorted(Path(directory).glob("expert_*.safetensors"))
        if not paths:
            raise artifacts.ArtifactError(f"no experts in {directory}: run the buffers stage")
        metas = [artifacts.read_meta(p, KIND) for p in paths]
        return cls(paths, metas)

    @property
    def spec(self) -> NetSpec:
        return NetSpec(**self.metas[0]["spec"])

    @property
    def epochs(self) -> int:
        return min(m["epochs"] for m in self.metas)

    @property
    def snapshots(self) -> int:
        """The last row of every trajectory (the converged end): epochs, or more snapshots
        with `save_every`."""
        return min(len(m.get("snapshot_steps", range(m["epochs"] + 1))) - 1 for m in self.metas)

    @property
    def matchable(self) -> int:
        """The last snapshot a matching may read: before a decay tail, or the end."""
        return min(m.get("matchable", self.snapshots) for m in self.metas)

    @property
    def steps_per_snapshot(self) -> float:
        """Expert SGD steps between two snapshots (the first segment's, they are all equal
        but for a shorter last one)."""
        meta = self.metas[0]
        steps = meta.get("snapshot_steps")
        return float(steps[1] - steps[0]) if steps else float(meta.get("steps_per_epoch", 0))

    @property
    def lr(self) -> float:
        return float(self.metas[0]["config"]["lr"])

    def lr_over(self, first: int, last: int) -> float:
        """The experts' mean lr over snapshot segments first..last - 1 (their schedule's; `lr`
        when constant): the lr a student follows those segments with."""
        lrs = self.metas[0].get("lrs") or [self.lr] * self.snapshots
        part = lrs[first:max(last, first + 1)]
        return float(sum(part) / len(part))

    def __len__(self) -> int:
        return len(self.paths)

    def snapshots_of(self, expert: int, rows: list[int]) -> torch.Tensor:
        """Parameters of one expert at the given snapshots, [len(rows), P], read lazily; a
        non-finite or diverged row (a damaged or hand-edited file) is named, never used."""
        thetas = artifacts.load_rows(self.paths[expert], "trajectory", rows, KIND)
        bad = [r for r, t in zip(rows, thetas) if not bool(torch.isfinite(t).all())
               or float(t.abs().max()) > MAX_WEIGHT]
        if bad:
            raise artifacts.ArtifactError(
                f"{self.paths[expert]}: snapshot {bad[0]} holds NaN/inf or weights above "
                f"{MAX_WEIGHT:g} (a diverged or damaged expert): delete the file and run "
                "buffers again to retrain it")
        return thetas
