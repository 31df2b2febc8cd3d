"""Where one distillation iteration's time goes: `recompute` (datm/matching.py) split into phases.

What `Distiller.step` (datm/distill.py) does per iteration, at the default profile's sizes
(params.yaml: Fashion-MNIST 1x28x28, 10 classes, ConvNet width 32 depth 3 instance norm, the
first conv padded by 3 as `NetSpec` builds it for 28 px, DSA color_crop_cutout_flip_scale_rotate):
IPC 10 (100 images, batch_syn 50, N 20) and IPC 1000 (10,000 images, batch_syn 200, N 10),
each at 1 and 2 threads (`torch.set_num_threads` in a fresh child process per cell).

Phases, wall ms per iteration (median of `--repeats` after one warm-up iteration):
* plan: `make_plan` (the N batch draws and augmentation draws);
* expert reads: `ExpertBuffer.snapshots_of` of two rows (start, target) of a temporary
  expert file written with `artifacts.save` (`--rows` x P float32 rows, P the ConvNet's
  parameters); the file was just written, so this is a page-cache read, as in a running stage;
* augment alone: `augment.apply` on the N batches, no autograd (for scale: the same work runs
  inside the forward and backward rows below);
* forward / backward: recompute's two loops re-run here with a timer around each piece
  (augment, network forward, cross-entropy, autograd), then `recompute` itself is timed on
  the same plan. `sum / recompute` should be within ~10 % of 1; the split is only as
  good as that check.

A second table lists the top ops by self CPU time under `torch.profiler` for one `recompute`
call per IPC at 1 thread (the profiler adds per-op overhead: read shares, not absolute ms).
The cost of 2 processes instead of 1 is what `python -m bench.distributed --single` measures
(distill IPC 10 and IPC 1000 kernels, 1x2 vs 2x1 vs 1x1); it is not repeated here.
Run: `python -m bench.iteration_profile [--repeats 5] [--threads 1 2] [--rows 80]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import in_child, table
from datm import artifacts
from datm.augment import AugConfig, apply
from datm.experts import KIND, ExpertBuffer, expert_path
from datm.matching import _distance, make_plan, recompute
from datm.networks import FlatModel, NetSpec, first_conv_padding, soft_cross_entropy

AUG = AugConfig(strategy="color_crop_cutout_flip_scale_rotate")
# (ipc, batch_syn, syn_steps) of params.yaml's distill.ipc entries
SIZES = {10: (50, 20), 1000: (200, 10)}
FWD = ("fwd augment", "fwd network", "fwd CE", "fwd autograd.grad", "fwd rest")
BWD = ("bwd augment", "bwd network", "bwd CE", "bwd grad (create_graph)",
       "bwd double backward", "bwd rest")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _spec() -> NetSpec:
    # as datm.pipeline.project.net_spec builds it for the profile: NetSpec(c, classes, h, ...)
    return NetSpec(1, 10, 28, width=32, depth=3, norm="instance")


class Timer:
    """Accumulates wall seconds per key; CPU eager ops are synchronous, so a host timer is exact."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, key: str) -> None:
        now = time.perf_counter()
        self.s[key] = self.s.get(key, 0.0) + now - self.t
        self.t = now


def _loss(fm, theta, xb, yb, draw, tm: Timer, side: str) -> torch.Tensor:
    """matching._step_loss with a lap per piece."""
    xa = apply(xb, draw, AUG)
    tm.lap(f"{side} augment")
    logits = fm(theta, xa)
    tm.lap(f"{side} network")
    ce = soft_cross_entropy(logits, yb)
    tm.lap(f"{side} CE")
    return ce


def forward_phase(fm, x, y, alpha, start, target, plan, tm: Timer):
    """recompute's first loop, its loss and host sync (one process: weight 1, no all-reduce)."""
    thetas = [start.detach()]
    with torch.enable_grad():
        for idx, draw in zip(plan.batches, plan.draws):
            theta = thetas[-1].requires_grad_()
            xb, yb = x[idx], y[idx]
            tm.lap("fwd rest")
            ce = _loss(fm, theta, xb, yb, draw, tm, "fwd")
            (g,) = torch.autograd.grad(ce, theta)
            tm.lap("fwd autograd.grad")
            thetas[-1] = theta.detach()
            thetas.append((theta - alpha * g).detach())
    final = thetas.pop()
    value = float(_distance(final, start, target))
    tm.lap("fwd rest")
    return thetas, final, value


def backward_phase(fm, x, y, alpha, start, target, plan, thetas, final, tm: Timer):
    """recompute's reverse sweep and final scaling."""
    lam = 2 * (final - target) / (start - target).pow(2).sum()
    gx, gy, ga = torch.zeros_like(x), torch.zeros_like(y), torch.zeros_like(alpha)
    for i in reversed(range(len(plan.batches))):
        idx, draw = plan.batches[i], plan.draws[i]
        theta = thetas[i].requires_grad_()
        xb, yb = x[idx].requires_grad_(), y[idx].requires_grad_()
        tm.lap("bwd rest")
        with torch.enable_grad():
            ce = _loss(fm, theta, xb, yb, draw, tm, "bwd")
            (g,) = torch.autograd.grad(ce, theta, create_graph=True)
            tm.lap("bwd grad (create_graph)")
            dot = (g * lam).sum()
            d_theta, d_xb, d_yb = torch.autograd.grad(dot, [theta, xb, yb])
            tm.lap("bwd double backward")
        ga -= dot.detach()
        gx.index_add_(0, idx, d_xb)
        gy.index_add_(0, idx, d_yb)
        lam = lam - alpha * d_theta
        thetas[i] = None
    out = gx * -alpha, gy * -alpha, ga
    tm.lap("bwd rest")
    return out


def _setup(ipc: int):
    fm = FlatModel(_spec()).train(True)
    gen = torch.Generator().manual_seed(0)
    n = ipc * 10
    images = torch.randn(n, 1, 28, 28, generator=gen)
    labels = torch.randn(n, 10, generator=gen)
    return fm, gen, images, labels, torch.tensor(0.01)


def _expert_file(fm: FlatModel, rows: int, gen: torch.Generator, out: Path) -> ExpertBuffer:
    start = fm.init(0)
    steps = 1e-3 * torch.randn(rows - 1, fm.num_params, generator=gen)
    traj = torch.cat([start[None], start + steps.cumsum(0)])
    meta = {"spec": fm.spec.to_dict(), "epochs": rows - 1, "config": {"lr": 0.01}}
    artifacts.save(expert_path(out, 0), {"trajectory": traj}, KIND, meta)
    return ExpertBuffer.open(out)


def _profile(fm, images, labels, lr, start, target, plan, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        recompute(fm, images, labels, lr, start, target, plan, AUG)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in ranked] + [{"op": "(all ops)", "ms": total / 1e3,
                                                    "share": 1.0, "calls": 0}]


def _pieces(fm, x, y, alpha, start, target, plan) -> dict[str, float]:
    """Both loops with laps: seconds per piece (they add up to the wall time of the call)."""
    tm = Timer()
    thetas, final, _ = forward_phase(fm, x, y, alpha, start, target, plan, tm)
    backward_phase(fm, x, y, alpha, start, target, plan, thetas, final, tm)
    return tm.s


def _whole(fm, x, y, alpha, start, target, plan) -> float:
    tic = time.perf_counter()
    recompute(fm, x, y, alpha, start, target, plan, AUG)
    return time.perf_counter() - tic


def child(cfg: dict) -> dict:
    torch.set_num_threads(cfg["threads"])
    ipc = cfg["ipc"]
    batch, steps = SIZES[ipc]
    fm, gen, images, labels, lr = _setup(ipc)
    n = images.shape[0]
    samples: dict[str, list[float]] = {}
    add = lambda k, s: samples.setdefault(k, []).append(s * 1e3)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        buffer = _expert_file(fm, cfg["rows"], gen, Path(tmp))
        for rep in range(cfg["repeats"] + 1):
            tic = time.perf_counter()
            plan = make_plan(n, batch, steps, 28, AUG, gen)
            t_plan = time.perf_counter() - tic
            s = int(torch.randint(buffer.epochs - 1, (1,), generator=gen))
            tic = time.perf_counter()
            start, target = buffer.snapshots_of(0, [s, s + 1]).unbind(0)
            t_reads = time.perf_counter() - tic
            tic = time.perf_counter()
            for idx, draw in zip(plan.batches, plan.draws):
                apply(images[idx], draw, AUG)
            t_aug = time.perf_counter() - tic
            args = (fm, images, labels, lr, start, target, plan)
            # alternate the order so a drift in machine load does not favour one side
            if rep % 2:
                t_whole, laps = _whole(*args), _pieces(*args)
            else:
                laps, t_whole = _pieces(*args), _whole(*args)
            if rep == 0:
                continue  # warm-up
            add("plan", t_plan)
            add("expert reads", t_reads)
            add("augment alone", t_aug)
            for k in FWD + BWD:
                add(k, laps.get(k, 0.0))
            add("forward", sum(laps.get(k, 0.0) for k in FWD))
            add("backward", sum(laps.get(k, 0.0) for k in BWD))
            add("sum", sum(laps.values()))
            add("recompute", t_whole)
        ops = _profile(fm, images, labels, lr, start, target, plan, cfg["top"]) \
            if cfg["profile"] else []
    return {"ms": {k: statistics.median(v) for k, v in samples.items()}, "ops": ops,
            "params": fm.num_params, "threads": torch.get_num_threads()}


ROWS = [("plan (make_plan)", "plan"), ("expert reads (2 rows)", "expert reads"),
        ("augment alone (N batches, no grad)", "augment alone"),
        *[(k, k) for k in FWD], ("= forward (N steps)", "forward"),
        *[(k, k) for k in BWD], ("= backward (reverse sweep)", "backward"),
        ("sum forward + backward", "sum"), ("recompute() timed", "recompute")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ipcs", type=int, nargs="+", default=[10, 1000], choices=sorted(SIZES))
    parser.add_argument("--rows", type=int, default=80, help="rows of the temporary expert file")
    parser.add_argument("--top", type=int, default=8, help="ops in the profiler table")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    cells = {}
    for ipc in args.ipcs:
        for threads in args.threads:
            cfg = {"ipc": ipc, "threads": threads, "repeats": args.repeats, "rows": args.rows,
                   "top": args.top, "profile": threads == min(args.threads)}
            cells[ipc, threads] = in_child("bench.iteration_profile", cfg)
            print(f"IPC {ipc}, {threads} thread(s) done", flush=True)
    keys = list(cells)
    params = next(iter(cells.values()))["params"]
    pad = first_conv_padding(_spec())
    print(f"\n{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads "
          f"{'/'.join(str(t) for t in args.threads)} (set per child), load average "
          f"{os.getloadavg()[0]:.1f} at the end (a shared machine: times are noisy)")
    print(f"ConvNet width 32 depth 3 instance norm, first conv padding {pad}, P = {params:,}; "
          f"DSA {AUG.strategy}; expert file {args.rows} x P float32; wall ms per iteration, "
          f"median of {args.repeats} after 1 warm-up")
    headers = ["phase"] + [f"IPC {i} (b {SIZES[i][0]}, N {SIZES[i][1]}) {t} thr" for i, t in keys]
    rows = [[label] + [f"{cells[c]['ms'][k]:.1f}" for c in keys] for label, k in ROWS]
    ratio = lambda c: cells[c]["ms"]["sum"] / cells[c]["ms"]["recompute"]  # noqa: E731
    rows.append(["sum / recompute"] + [f"{ratio(c):.2f}" for c in keys])
    net = lambda c: (cells[c]["ms"]["fwd network"] + cells[c]["ms"]["bwd network"])  # noqa: E731
    grad = lambda c: sum(cells[c]["ms"][k] for k in ("fwd autograd.grad",  # noqa: E731
                                                     "bwd grad (create_graph)",
                                                     "bwd double backward"))
    aug = lambda c: cells[c]["ms"]["fwd augment"] + cells[c]["ms"]["bwd augment"]  # noqa: E731
    for label, part in (("network forward share of sum", net), ("autograd share of sum", grad),
                        ("augment (in loops) share of sum", aug)):
        rows.append([label] + [f"{100 * part(c) / cells[c]['ms']['sum']:.0f} %" for c in keys])
    rows.append(["iteration: plan + reads + recompute"]
                + [f"{sum(cells[c]['ms'][k] for k in ('plan', 'expert reads', 'recompute')):.1f}"
                   for c in keys])
    print(table(headers, rows))
    profiled = [c for c in keys if cells[c]["ops"]]
    for c in profiled:
        print(f"\ntorch.profiler, one recompute(), IPC {c[0]}, {c[1]} thread(s): top {args.top} "
              "ops by self CPU time")
        print(table(["op", "self ms", "share", "calls"],
                    [[o["op"], f"{o['ms']:.1f}", f"{100 * o['share']:.1f} %", o["calls"] or ""]
                     for o in cells[c]["ops"]]))


if __name__ == "__main__":
    main()
