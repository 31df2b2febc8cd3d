"""datm vs the plain MTT/DATM implementation: one distillation iteration, and expert training.

Table 1: time per distillation iteration and peak memory at the published CIFAR-10 settings
(ConvNet width 128, depth 3, instance norm; random 3x32x32 stand-in images, 10 classes; the
start vector is a fresh init and the target start + small noise, since M does not affect timing):

    setting   N steps   batch_syn   images
    ipc10          80         100      100
    ipc50          80         500      500
    ipc1000       100        1000    10000

An iteration is N student steps plus the gradient of the matching loss into images, soft labels
and the learnable lr, computed three ways, all from the same datm.matching.Plan (same batches,
same DSA draws) with datm's augmentation and soft cross-entropy, so the work per step is equal:

* datm recompute: datm.matching.match("recompute"), memory independent of N;
* datm unroll: datm.matching.match("unroll"), autograd through all N steps;
* plain: written here the way the original MTT/DATM code does it: an nn.Module-free ConvNet on a
  flat parameter vector, a growing list `student_params`, autograd.grad(create_graph=True) at
  every step and one .backward() through the whole unroll at the end.

Every cell runs in a fresh child process, so its peak memory is its own: GPU
torch.cuda.max_memory_allocated; CPU peak RSS minus that of a child that did everything but the
iteration. Time is the best of --repeats iterations after one warm-up. Before launching a cell
its memory is estimated (bytes autograd keeps per unrolled step, counted with saved-tensor hooks
on a 2- and 4-image step and extrapolated to batch_syn, times N); a cell whose estimate x 1.3
exceeds the available memory (GPU: torch.cuda.mem_get_info free; CPU: 80 % of MemAvailable)
prints "skipped: est. X GiB", and a child that fails (out of memory) becomes a "failed: ..." cell.

Table 2: expert training throughput (images/s), datm.experts.train_group with one group of G
experts (one vmap-batched model) vs G single-expert runs, one epoch each, same ConvNet, random
3x32x32 data, batch 256, DSA on.

Run (defaults are the published sizes, meant for a GPU):
    python -m bench.speed
    python -m bench.speed --settings ipc10 --repeats 5 --experts 16
CPU, scaled down (N / 8, IPC and batch_syn / 10, width 32; a few minutes on 2 cores):
    python -m bench.speed --width 32 --steps-scale 8 --images-scale 10 --repeats 1 \\
        --experts 2 --expert-images 2048 [--threads 1 when another job shares the cores]
Check that the plain gradient equals datm's (float64, tiny sizes; exits 1 if not):
    python -m bench.speed --check
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from functools import cache, partial

import torch
import torch.nn.functional as F

from bench.common import best_seconds, device, expert_seconds, in_child, machine, peak_mib, table
from bench.matching import _setup
from datm.augment import AugConfig, AugDraw, apply, sample
from datm.config import FAMILIES
from datm.experts import ExpertConfig
from datm.matching import Plan, make_plan, match
from datm.networks import FlatModel, NetSpec, soft_cross_entropy

# name: (N syn steps, batch_syn, images per class), CIFAR-10 (docs/METHOD.md, "Published settings")
SETTINGS = {"ipc10": (80, 100, 10), "ipc50": (80, 500, 50), "ipc1000": (100, 1000, 1000)}
IMPLS = ("recompute", "unroll", "plain")
# The estimate counts what autograd saves; allocator overhead and backward transients came to
# 1.1-1.3x that in CPU runs, so a cell is only launched when est x SAFETY fits.
SAFETY = 1.3
LABELS = {"recompute": "datm recompute", "unroll": "datm unroll", "plain": "plain (MTT)"}
CHANNELS, SIZE, CLASSES = 3, 32, 10


# ---- the plain implementation -------------------------------------------------------------

def plain_shapes(spec: NetSpec) -> list[tuple[int, ...]]:
    """Parameter shapes of the ConvNet in datm's flat order (conv w, b, norm w, b per block,
    then the classifier), so the plain forward reads the same start vectors as datm."""
    shapes: list[tuple[int, ...]] = []
    channels, size = spec.channels, spec.im_size
    for _ in range(spec.depth):
        shapes += [(spec.width, channels, 3, 3), (spec.width,), (spec.width,), (spec.width,)]
        channels, size = spec.width, size // 2
    return shapes + [(spec.num_classes, channels * size * size), (spec.num_classes,)]


def plain_forward(theta: torch.Tensor, x: torch.Tensor, spec: NetSpec) -> torch.Tensor:
    """The ConvNet as plain functions of a flat parameter vector (instance norm only)."""
    shapes = plain_shapes(spec)
    params = [p.view(s) for p, s in zip(theta.split([math.prod(s) for s in shapes]), shapes)]
    h = x
    for block in range(spec.depth):
        w, b, nw, nb = params[4 * block:4 * block + 4]
        h = F.conv2d(h, w, b, padding=1)
        h = F.group_norm(h, spec.width, nw, nb)
        h = F.avg_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), params[-2], params[-1])


def _plain_step(spec: NetSpec, theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
                draw: AugDraw | None, aug: AugConfig, lr: torch.Tensor) -> torch.Tensor:
    ce = soft_cross_entropy(plain_forward(theta, apply(xb, draw, aug), spec), yb)
    grad = torch.autograd.grad(ce, theta, create_graph=True)[0]
    return theta - lr * grad


def plain_iteration(spec: NetSpec, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
                    start: torch.Tensor, target: torch.Tensor, plan: Plan, aug: AugConfig) -> float:
    """One MTT-style iteration; leaves the gradients in images.grad, labels.grad and lr.grad
    (all three must be leaves with requires_grad). Returns the matching loss."""
    for leaf in (images, labels, lr):
        leaf.grad = None
    student_params = [start.detach().clone().requires_grad_(True)]
    for idx, draw in zip(plan.batches, plan.draws):
        student_params.append(_plain_step(spec, student_params[-1], images[idx], labels[idx],
                                          draw, aug, lr))
    loss = (student_params[-1] - target).pow(2).sum() / (start - target).pow(2).sum()
    loss.backward()
    return float(loss.detach())


def _datm_step(fm: FlatModel, theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
               draw: AugDraw | None, aug: AugConfig, lr: torch.Tensor) -> torch.Tensor:
    ce = soft_cross_entropy(fm(theta, apply(xb, draw, aug)), yb)
    (grad,) = torch.autograd.grad(ce, theta, create_graph=True)
    return theta - lr * grad


# ---- memory estimate ----------------------------------------------------------------------

def _kept_bytes(step: Callable, fm: FlatModel, batch: int, family: str) -> int:
    """Bytes of the distinct storages autograd saves for one unrolled step of `batch` images.

    Saved tensors are what an unroll keeps alive until its final backward; counting storages
    (not tensors) avoids counting a parameter view once per use.
    """
    spec = fm.spec
    gen = torch.Generator().manual_seed(0)
    aug = AugConfig(strategy=family)
    theta = fm.init(0).requires_grad_()
    x = torch.randn(batch, spec.channels, spec.im_size, spec.im_size, requires_grad=True)
    y = torch.randn(batch, spec.num_classes, requires_grad=True)
    lr = torch.tensor(0.01, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(theta, x, y, sample(aug, batch, spec.im_size, gen), aug, lr)
    return sum(storages.values())


@cache
def _probe(spec: NetSpec, plain: bool) -> list[tuple[int, int]]:
    """(bytes kept by a 2-image step, by a 4-image step) for each augmentation family."""
    fm = FlatModel(spec, "cpu")
    step = partial(_plain_step, spec) if plain else partial(_datm_step, fm)
    return [(_kept_bytes(step, fm, 2, f), _kept_bytes(step, fm, 4, f)) for f in FAMILIES]


def estimate_bytes(spec: NetSpec, impl: str, n_steps: int, batch: int, n_images: int) -> int:
    """Rough peak memory of one iteration (float32), from a cheap 2- and 4-image probe on CPU.

    Unroll and plain keep every step's graph (N steps, plus about one step of transient grads in
    the final backward); recompute keeps N+1 parameter vectors and one step's graph with its
    double backward. The largest augmentation family is assumed.
    """
    per_step = max(small + (large - small) // 2 * (batch - 2)
                   for small, large in _probe(spec, impl == "plain"))
    data = 2 * 4 * n_images * (spec.channels * spec.im_size ** 2 + spec.num_classes)  # + grads
    if impl == "recompute":
        return (n_steps + 1) * sum(math.prod(s) for s in plain_shapes(spec)) * 4 + 2 * per_step + data
    return (n_steps + 1) * per_step + data


def available_bytes(dev: torch.device) -> tuple[int, str]:
    """Memory a cell may use, and where that figure comes from."""
    if dev.type == "cuda":
        # Asked in a child: a CUDA context in this process would take memory from every cell.
        return int(in_child("bench.speed", {"kind": "gpu_free"})["free"]), "GPU free"
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return int(0.8 * info["MemAvailable"]), "80% of MemAvailable"


# ---- child processes ----------------------------------------------------------------------

def _child_match(cfg: dict) -> dict:
    dev, fm, images, labels, lr, start, target, gen = _setup(cfg)
    if cfg["impl"] == "baseline":
        return {"seconds": 0.0, "peak_mib": peak_mib(dev)}
    aug = AugConfig()
    if cfg["impl"] == "plain":
        leaves = [t.detach().clone().requires_grad_() for t in (images, labels, lr)]
        run = lambda plan: plain_iteration(fm.spec, *leaves, start, target, plan, aug)  # noqa: E731
    else:
        run = lambda plan: match(cfg["impl"], fm, images, labels, lr, start, target, plan, aug)  # noqa: E731
    plan = lambda: make_plan(images.shape[0], cfg["batch"], cfg["steps"], cfg["size"], aug, gen)  # noqa: E731
    return {"seconds": best_seconds(run, plan, cfg["repeats"], dev), "peak_mib": peak_mib(dev)}


def _child_experts(cfg: dict) -> dict:
    dev = device()
    gen = torch.Generator().manual_seed(0)
    n = cfg["images"]
    x = torch.randn(n, CHANNELS, SIZE, SIZE, generator=gen).to(dev)
    y = torch.randint(0, CLASSES, (n,), generator=gen).to(dev)
    fm = FlatModel(NetSpec(CHANNELS, CLASSES, SIZE, width=cfg["width"], depth=cfg["depth"]), dev)
    g = cfg["experts"]
    groups = [list(range(g))] if cfg["batched"] else [[k] for k in range(g)]
    seconds = expert_seconds(fm, groups, x, y, ExpertConfig(epochs=1, batch=cfg["batch"]),
                             AugConfig())
    return {"seconds": seconds, "images_per_s": g * n / seconds, "peak_mib": peak_mib(dev)}


def _child(cfg: dict) -> dict:
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    if cfg["kind"] == "gpu_free":
        return {"free": torch.cuda.mem_get_info()[0], "machine": machine()}
    return _child_match(cfg) if cfg["kind"] == "match" else _child_experts(cfg)


def _cell(cfg: dict) -> dict | str:
    """A child's result, or the reason it failed, as a table cell."""
    try:
        return in_child("bench.speed", cfg)
    except RuntimeError as err:
        msg = str(err)
        oom = any(s in msg.lower() for s in ("out of memory", "can't allocate memory"))
        return "failed: OOM" if oom else f"failed: {msg[:60]}"


# ---- tables -------------------------------------------------------------------------------

def matching_table(args: argparse.Namespace, dev: torch.device) -> str:
    avail, avail_src = available_bytes(dev)
    spec = NetSpec(CHANNELS, CLASSES, SIZE, width=args.width, depth=args.depth)
    rows = []
    for name in args.settings:
        n_steps, batch, ipc = SETTINGS[name]
        n_steps = max(1, round(n_steps / args.steps_scale))
        ipc = max(1, ipc // args.images_scale)
        batch = min(max(1, batch // (args.batch_scale or args.images_scale)), ipc * CLASSES)
        base = {"kind": "match", "threads": args.threads, "repeats": args.repeats, "ipc": ipc,
                "batch": batch, "steps": n_steps, "width": args.width, "depth": args.depth,
                "channels": CHANNELS, "size": SIZE, "classes": CLASSES}
        floor = 0.0
        if dev.type == "cpu":
            res = _cell({**base, "impl": "baseline"})
            floor = res["peak_mib"] if isinstance(res, dict) else 0.0
        results: dict[str, dict | str] = {}
        est: dict[str, int] = {}
        for impl in args.impls:
            est[impl] = estimate_bytes(spec, impl, n_steps, batch, ipc * CLASSES)
            if dev.type == "cpu":
                avail, _ = available_bytes(dev)  # the other load on a shared machine moves
            if est[impl] * SAFETY > avail:
                results[impl] = f"skipped: est. {est[impl] / 2**30:.1f} GiB"
            else:
                results[impl] = _cell({**base, "impl": impl})
            print(f"{name} {impl}: {results[impl]}", flush=True)
        plain = results.get("plain")
        for impl in args.impls:
            res = results[impl]
            row = [name, n_steps, batch, ipc * CLASSES, LABELS[impl]]
            if isinstance(res, str):
                rows.append(row + [res, "", f"{est[impl] / 2**20:.0f}", "", ""])
                continue
            mem = res["peak_mib"] - floor
            ratios = ["", ""]
            if isinstance(plain, dict):
                ratios = [f"{plain['seconds'] / res['seconds']:.2f}x",
                          f"{(plain['peak_mib'] - floor) / max(mem, 1e-9):.1f}x"]
            rows.append(row + [f"{res['seconds']:.3f}", f"{mem:.0f}", f"{est[impl] / 2**20:.0f}",
                               *ratios])
    memory = "peak allocated MiB" if dev.type == "cuda" else "peak RSS MiB over baseline"
    head = (f"ConvNet width {args.width} depth {args.depth} instance norm, {CHANNELS}x{SIZE}x{SIZE}"
            f" random images, {CLASSES} classes, DSA on; best of {args.repeats} after 1 warm-up; "
            f"memory: {memory}; cells skipped above {avail / 2**30:.1f} GiB ({avail_src})")
    return head + "\n" + table(["setting", "N", "batch_syn", "images", "implementation", "s/it",
                                "MiB", "est. MiB", "plain/this time", "plain/this MiB"], rows)


def experts_table(args: argparse.Namespace) -> str:
    base = {"kind": "experts", "threads": args.threads, "experts": args.experts,
            "images": args.expert_images, "width": args.width, "depth": args.depth,
            "batch": args.expert_batch}
    results = {}
    for label, batched in (("one at a time", False), (f"batched x{args.experts}", True)):
        results[label] = _cell({**base, "batched": batched})
        print(f"experts {label}: {results[label]}", flush=True)
    single = results["one at a time"]
    rows = []
    for label, res in results.items():
        if isinstance(res, str):
            rows.append([label, res, "", "", ""])
            continue
        ratio = f"{res['images_per_s'] / single['images_per_s']:.2f}x" if isinstance(single, dict) else ""
        rows.append([label, f"{res['seconds']:.1f}", f"{res['images_per_s']:.0f}",
                     f"{res['peak_mib']:.0f}", ratio])
    head = (f"expert training: {args.experts} experts x 1 epoch of {args.expert_images} random "
            f"{CHANNELS}x{SIZE}x{SIZE} images, ConvNet width {args.width} depth {args.depth} "
            f"instance norm, batch {args.expert_batch}, DSA on")
    return head + "\n" + table(["mode", "seconds", "images/s", "peak MiB", "vs one at a time"], rows)


# ---- gradient check -----------------------------------------------------------------------

def check(seeds: int = 3, tol: float = 1e-8) -> bool:
    """plain == datm recompute == datm unroll in float64 on a tiny setting, same plans."""
    cfg = {"channels": 3, "classes": 4, "size": 16, "width": 8, "depth": 2, "ipc": 3}
    dev, fm, images, labels, lr, start, target, gen = _setup(cfg)
    images, labels, lr, start, target = (t.double() for t in (images, labels, lr, start, target))
    assert [tuple(s) for s in fm.shapes] == plain_shapes(fm.spec), "plain layout != datm's"
    aug = AugConfig()
    worst = 0.0
    for seed in range(seeds):
        gen.manual_seed(seed)
        plan = make_plan(images.shape[0], 5, 7, cfg["size"], aug, gen)  # 12 images: uneven batches
        leaves = [t.clone().requires_grad_() for t in (images, labels, lr)]
        loss = plain_iteration(fm.spec, *leaves, start, target, plan, aug)
        for mode in ("recompute", "unroll"):
            ref = match(mode, fm, images, labels, lr, start, target, plan, aug)
            errs = [abs(loss - ref.loss) / abs(ref.loss)]
            for leaf, want in zip(leaves, (ref.grad_images, ref.grad_labels, ref.grad_lr)):
                errs.append(float((leaf.grad - want).abs().max() / want.abs().max()))
            worst = max(worst, *errs)
            families = ",".join(d.family for d in plan.draws if d is not None)
            print(f"seed {seed} plain vs {mode}: relative error loss {errs[0]:.1e}, images "
                  f"{errs[1]:.1e}, labels {errs[2]:.1e}, lr {errs[3]:.1e}  [{families}]")
    print(f"worst {worst:.1e}: {'ok' if worst < tol else 'MISMATCH'} (tolerance {tol:.0e})")
    return worst < tol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help="only the float64 gradient check")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps-scale", type=float, default=1, help="divide N by this")
    parser.add_argument("--images-scale", type=int, default=1, help="divide IPC by this")
    parser.add_argument("--batch-scale", type=int, help="divide batch_syn (default: --images-scale)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8, help="G, experts per batched group")
    parser.add_argument("--expert-images", type=int, default=50000)
    parser.add_argument("--expert-batch", type=int, default=256)
    parser.add_argument("--no-experts", action="store_true", help="skip the expert table")
    parser.add_argument("--threads", type=int, help="CPU threads per cell (1 on a shared machine: "
                        "two torch processes spinning on the same cores can run 10-40x slower)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        raise SystemExit(0 if check() else 1)
    dev = device()
    # On a GPU the header comes from a child, keeping CUDA out of this process (see available_bytes).
    header = in_child("bench.speed", {"kind": "gpu_free"})["machine"] if dev.type == "cuda" else machine()
    tic = time.perf_counter()
    tables = [matching_table(args, dev)]
    if not args.no_experts:
        tables.append(experts_table(args))
    print(f"\n{header}; {time.perf_counter() - tic:.0f} s in all")
    for text in tables:
        print("\n" + text)


if __name__ == "__main__":
    main()
