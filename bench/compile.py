"""torch.compile in the plain training loops (datm/compiled.py), as the profile uses it.

Two kernels, each eager vs compiled through datm's own code: one SGD step of the evaluation
ConvNet (the default profile's: 1x28x28, width 32, depth 3, instance norm, DSA on every batch,
momentum 0.9; `maybe_compile(model)` as evaluate.train_and_test does) at the batches the
profile trains with (25: IPC 1-50, 128: IPC 1000), on 1 thread (each of the 2 evaluation
processes has one); and one expert step (`experts._batched_grad`, its compiled loss; batch 64,
the buffers stage's 2 threads). Each cell runs in a fresh process, so its peak memory and its
compile time are its own (the first step: compiling, with inductor's on-disk cache as it is).
The loss after the timed steps is compared with eager's from the same seeds: compiled kernels
fuse and reorder float sums, so bytes are not expected to agree.
Run: `python -m bench.compile [--steps 40]`.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.common import in_child, peak_mib, step_timing, table
from datm.augment import AugConfig, augment
from datm.compiled import maybe_compile
from datm.experts import _batched_grad
from datm.networks import FlatModel, NetSpec, build, soft_cross_entropy

SPEC = NetSpec(channels=1, num_classes=10, im_size=28, width=32, depth=3)
AUG = AugConfig(strategy="color_crop_cutout_flip_scale_rotate")
# (kernel, batch, threads): the profile's
CELLS = (("evaluation", 25, 1), ("evaluation", 128, 1), ("experts", 64, 2))


def _evaluation_step(cfg: dict, gen: torch.Generator):
    torch.manual_seed(0)
    model = build(SPEC)
    forward = maybe_compile(model, cfg["compiled"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    b = cfg["batch"]
    x = torch.randn(b, 1, 28, 28, generator=gen)
    t = torch.randn(b, 10, generator=gen)

    def step() -> float:
        loss = soft_cross_entropy(forward(augment(x, AUG, gen)), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)
    return step


def _expert_step(cfg: dict, gen: torch.Generator):
    fm = FlatModel(SPEC)
    grad_fn = _batched_grad(fm, 0.0, 1, cfg["compiled"])
    state = {"theta": fm.init(0)[None]}
    b = cfg["batch"]
    x = torch.randn(b, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (b,), generator=gen)

    def step() -> float:
        xb = augment(x, AUG, gen)[None]
        g, _ = grad_fn(state["theta"], xb, y[None])
        state["theta"] = state["theta"] - 0.05 * g
        return float(F.cross_entropy(fm(state["theta"][0], x), y))
    return step


def _child(cfg: dict) -> dict:
    torch.set_num_threads(cfg["threads"])
    gen = torch.Generator().manual_seed(1)
    make = _evaluation_step if cfg["kernel"] == "evaluation" else _expert_step
    first, ms, loss = step_timing(make(cfg, gen), cfg["steps"])
    return {"first": first, "ms": ms, "loss": loss, "peak": peak_mib(torch.device("cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    rows = []
    for kernel, batch, threads in CELLS:
        cells = {compiled: in_child("bench.compile", {"kernel": kernel, "threads": threads,
                                                       "batch": batch, "steps": args.steps,
                                                       "compiled": compiled})
                 for compiled in (False, True)}
        eager, comp = cells[False], cells[True]
        rows.append([kernel, batch, threads, f"{eager['ms']:.1f}", f"{comp['ms']:.1f}",
                     f"{eager['ms'] / comp['ms']:.2f}x", f"{comp['first']:.1f}",
                     f"{eager['peak']:.0f} / {comp['peak']:.0f}",
                     f"{abs(comp['loss'] - eager['loss']) / abs(eager['loss']):.1e}"])
    print(f"{torch.get_num_threads()} CPUs seen, torch {torch.__version__}")
    print(table(["kernel", "batch", "threads", "eager ms/step", "compiled ms/step", "speed-up",
                 "first step s", "peak MiB eager / compiled", "loss rel. diff"], rows))


if __name__ == "__main__":
    main()
