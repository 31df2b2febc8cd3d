"""unroll vs recompute: time per distillation iteration and peak memory, N in {10, 20, 40, 80}.

Sizes default to the default profile's IPC 10 (100 images 1x28x28, batch_syn 100, ConvNet
width 32 depth 3). Each measurement runs in a fresh process (peak memory is its own); the
baseline row is the same process doing everything except the iteration, so `extra MiB` is the
memory an iteration adds. Run: `python -m bench.matching [--steps 10 20 40 80] [--repeats 2]`.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.common import best_seconds, device, in_child, machine, peak_mib, table
from datm.augment import AugConfig
from datm.matching import make_plan, match
from datm.networks import FlatModel, NetSpec


def _setup(cfg: dict):
    dev = device()
    spec = NetSpec(cfg["channels"], cfg["classes"], cfg["size"], width=cfg["width"],
                   depth=cfg["depth"])
    fm = FlatModel(spec, dev).train(True)
    gen = torch.Generator().manual_seed(0)
    n = cfg["ipc"] * cfg["classes"]
    images = torch.randn(n, cfg["channels"], cfg["size"], cfg["size"], generator=gen).to(dev)
    labels = torch.randn(n, cfg["classes"], generator=gen).to(dev)
    start = fm.init(0)
    target = start + 0.01 * torch.randn(start.shape, generator=gen).to(dev)
    return dev, fm, images, labels, torch.tensor(0.01, device=dev), start, target, gen


def child(cfg: dict) -> dict:
    dev, fm, images, labels, lr, start, target, gen = _setup(cfg)
    aug = AugConfig()
    if cfg["mode"] == "baseline":
        return {"seconds": 0.0, "peak_mib": peak_mib(dev)}
    plan = lambda: make_plan(images.shape[0], cfg["batch"], cfg["steps"], cfg["size"], aug, gen)  # noqa: E731
    run = lambda p: match(cfg["mode"], fm, images, labels, lr, start, target, p, aug)  # noqa: E731
    return {"seconds": best_seconds(run, plan, cfg["repeats"], dev), "peak_mib": peak_mib(dev)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    base = {k: getattr(args, k) for k in ("repeats", "ipc", "batch", "width", "depth",
                                          "channels", "size", "classes")}
    floor = in_child("bench.matching", {**base, "mode": "baseline", "steps": 1})["peak_mib"]
    rows = []
    for steps in args.steps:
        res = {m: in_child("bench.matching", {**base, "mode": m, "steps": steps})
               for m in ("unroll", "recompute")}
        u, r = res["unroll"], res["recompute"]
        extra = lambda x: x["peak_mib"] - (floor if device().type == "cpu" else 0)  # noqa: E731
        rows.append([steps, f"{u['seconds']:.3f}", f"{r['seconds']:.3f}",
                     f"{r['seconds'] / u['seconds']:.2f}x", f"{extra(u):.0f}", f"{extra(r):.0f}",
                     f"{extra(u) / max(extra(r), 1e-9):.1f}x"])
        print(f"N={steps} done", flush=True)
    print(f"\n{machine()}; images {args.ipc * args.classes}x{args.channels}x{args.size}x"
          f"{args.size}, batch_syn {args.batch}, ConvNet width {args.width} depth {args.depth}; "
          f"best of {args.repeats} iterations")
    print(table(["N", "unroll s/it", "recompute s/it", "time ratio", "unroll extra MiB",
                 "recompute extra MiB", "memory saved"], rows))


if __name__ == "__main__":
    main()
