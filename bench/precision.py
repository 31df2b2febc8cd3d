"""How accurate is the matching gradient at each precision, and how fast is it?

One distillation iteration (datm.matching, `recompute` by default) is computed in float64 as the
reference and then at each of datm's precisions (`distill.*.precision`): strict float32, TF32
(CUDA only; on a CPU it is float32) and bf16 autocast, all on the same plan (same mini-batches
and augmentation draws). For the gradients of images, soft labels and lr the table gives the
relative L2 error ||g - g64|| / ||g64|| and the cosine with the float64 gradient, plus the matching
loss error and the time per iteration (best of --repeats after a warm-up).

The problem: random images of the chosen shape with random soft labels, the student starting
at a fresh init and the target 5 % of the way to another init (about one expert epoch's move).

Run (defaults: the published CIFAR-10 IPC 10 setting, meant for a GPU):
    python -m bench.precision
CPU, scaled down (about a minute on 2 cores):
    python -m bench.precision --width 32 --steps 10 --ipc 10 --batch 50 --channels 1 --size 28
"""

from __future__ import annotations

import argparse

import torch

from bench.common import best_seconds, device, machine, table
from datm.augment import AugConfig
from datm.config import MODES, PRECISIONS
from datm.matching import MatchResult, make_plan, match
from datm.networks import FlatModel, NetSpec
from datm.precision import numerics


def _problem(args: argparse.Namespace, dev: torch.device) -> tuple:
    spec = NetSpec(args.channels, args.classes, args.size, width=args.width, depth=args.depth)
    gen = torch.Generator().manual_seed(0)
    n = args.ipc * args.classes
    images = torch.randn(n, args.channels, args.size, args.size, generator=gen)
    labels = torch.randn(n, args.classes, generator=gen) * 3
    fm = FlatModel(spec, dev).train(True)
    start = fm.init(0).cpu()
    # A target in the direction of a different init: the size of a real expert-epoch step.
    target = start + 0.05 * (fm.init(1).cpu() - start)
    plan = make_plan(n, args.batch, args.steps, args.size, AugConfig(), gen)
    return spec, images, labels, start, target, plan


def _run(spec: NetSpec, tensors: tuple, plan, dev: torch.device, dtype: torch.dtype,
         precision: str, mode: str, repeats: int) -> tuple[MatchResult, float]:
    fm = FlatModel(spec, dev).train(True)
    fm.module.to(dtype)
    images, labels, start, target = (t.to(dev, dtype) for t in tensors)
    lr = torch.tensor(0.01, device=dev, dtype=dtype)
    plan = plan.to(dev)
    results = []

    def run(_: object) -> None:
        with numerics(precision, dev):
            results.append(match(mode, fm, images, labels, lr, start, target, plan, AugConfig()))

    seconds = best_seconds(run, lambda: None, repeats, dev)
    return results[-1], seconds


def _compare(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    g, ref = g.double().flatten().cpu(), ref.double().flatten().cpu()
    rel = float((g - ref).norm() / ref.norm().clamp_min(1e-300))
    cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
    return rel, cos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="recompute")
    parser.add_argument("--steps", type=int, default=80, help="N unrolled steps")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100, help="batch_syn")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    dev = device()
    spec, images, labels, start, target, plan = _problem(args, dev)
    tensors = (images, labels, start, target)
    ref, ref_s = _run(spec, tensors, plan, dev, torch.float64, "float32", args.mode, 1)
    rows = [["float64 (reference)", f"{ref_s:.3f}", "-", "-", "-", "-", "-", "-"]]
    for precision in PRECISIONS:
        res, seconds = _run(spec, tensors, plan, dev, torch.float32, precision, args.mode,
                            args.repeats)
        cells = [precision + ("" if dev.type == "cuda" or precision != "tf32" else " (= float32 on CPU)"),
                 f"{seconds:.3f}", f"{abs(res.loss - ref.loss) / abs(ref.loss):.1e}"]
        for g, g_ref in ((res.grad_images, ref.grad_images), (res.grad_labels, ref.grad_labels),
                         (res.grad_lr, ref.grad_lr)):
            rel, cos = _compare(g, g_ref)
            cells += [f"{rel:.1e}", f"{cos:.6f}"] if g is not res.grad_lr else [f"{rel:.1e}"]
        rows.append(cells)
    print(f"\n{machine()}; {args.mode}, N {args.steps}, batch_syn {args.batch}, "
          f"{args.ipc * args.classes} images {args.channels}x{args.size}x{args.size}, ConvNet "
          f"width {args.width} depth {args.depth}; errors relative to float64 on the same plan")
    print(table(["precision", "s/it", "loss rel err", "d images rel err", "d images cos",
                 "d labels rel err", "d labels cos", "d lr rel err"],
                rows))


if __name__ == "__main__":
    main()
