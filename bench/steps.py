"""Time per SGD step of the loops the default profile spends its time in, by batch size, eager
and under torch.compile: an expert step (the flat-parameter ConvNet, cross-entropy, autograd)
and an evaluation step (the ConvNet module, SGD with momentum), DSA on every batch, on the
default profile's network (1x28x28, width 32, depth 3, instance norm). ms per image is what a
whole epoch costs, whatever the batch. Each cell runs in a fresh process (one thread count, its
own compile; inductor's on-disk cache makes a second compile of the same graph fast).
Run: `python -m bench.steps [--threads 2] [--batches 32 64 128 256] [--no-compile]`.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.common import in_child, step_timing, table
from datm.augment import AugConfig, augment
from datm.networks import FlatModel, NetSpec, build

SPEC = NetSpec(channels=1, num_classes=10, im_size=28, width=32, depth=3)
AUG = AugConfig()


def _child(cfg: dict) -> dict:
    torch.set_num_threads(cfg["threads"])
    gen = torch.Generator().manual_seed(0)
    b = cfg["batch"]
    x = torch.randn(b, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (b,), generator=gen)
    if cfg["kind"] == "expert":
        fm = FlatModel(SPEC, torch.device("cpu")).train(True)
        forward = torch.compile(fm) if cfg["compiled"] else fm
        state = {"theta": fm.init(0)}

        def step() -> None:
            theta = state["theta"].detach().requires_grad_()
            loss = F.cross_entropy(forward(theta, augment(x, AUG, gen)), y)
            (g,) = torch.autograd.grad(loss, theta)
            state["theta"] = theta.detach() - 0.1 * g
    else:
        model = build(SPEC)
        forward = torch.compile(model) if cfg["compiled"] else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step() -> None:
            loss = F.cross_entropy(forward(augment(x, AUG, gen)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    first, ms, _ = step_timing(step, cfg["steps"], warm=3)
    return {"ms": ms, "first": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[25, 64, 128, 256])
    parser.add_argument("--images", type=int, default=2560, help="images timed per cell")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    rows = []
    for kind in ("expert", "eval"):
        base = None
        for batch in args.batches:
            for compiled in (False,) if args.no_compile else (False, True):
                cell = in_child("bench.steps", {"kind": kind, "batch": batch, "compiled": compiled,
                                                "threads": args.threads,
                                                "steps": max(5, args.images // batch)})
                per_image = cell["ms"] / batch
                base = base or per_image  # the first cell: eager at the smallest batch
                rows.append([kind, batch, "compiled" if compiled else "eager",
                             f"{cell['ms']:.1f}", f"{per_image:.3f}", f"{base / per_image:.2f}x",
                             f"{cell['first']:.1f}"])
    print(f"CPU, {args.threads} thread(s), torch {torch.__version__}; {SPEC.width}-wide depth "
          f"{SPEC.depth} ConvNet on 1x28x28, DSA on every batch")
    print(table(["loop", "batch", "mode", "ms/step", "ms/image", "per-image speed vs first row",
                 "first step s"], rows))


if __name__ == "__main__":
    main()
