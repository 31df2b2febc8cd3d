"""torch.compile as a lever for the plain training loops (experts, evaluation, the full set).

One SGD step of the evaluation ConvNet (the default profile's: 1x28x28, width 32, depth 3,
instance norm, DSA on every batch, momentum 0.9), eager vs `torch.compile(model)` (inductor),
at the batch sizes the profile trains with: 25 (evaluation of IPC 1-50), 256 (experts, the
full set, IPC 1000's evaluation). Each cell runs in a fresh process, so its peak memory and its
compile time are its own. The loss after the timed steps is compared with eager's from the
same seeds: compiled kernels fuse and reorder float sums, so bytes are not expected to agree.
Run: `python -m bench.compile [--threads 1] [--steps 40]`.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.common import in_child, peak_mib, step_timing, table
from datm.augment import AugConfig, augment
from datm.networks import NetSpec, build, soft_cross_entropy

SPEC = NetSpec(channels=1, num_classes=10, im_size=28, width=32, depth=3)
AUG = AugConfig(strategy="color_crop_cutout_flip_scale_rotate")
BATCHES = (25, 256)


def _child(cfg: dict) -> dict:
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = build(SPEC)
    step_model = torch.compile(model) if cfg["compiled"] else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    b = cfg["batch"]
    x = torch.randn(b, 1, 28, 28, generator=gen)
    t = torch.randn(b, 10, generator=gen)

    def step() -> float:
        loss = soft_cross_entropy(step_model(augment(x, AUG, gen)), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    first, ms, loss = step_timing(step, cfg["steps"])
    return {"first": first, "ms": ms, "loss": loss, "peak": peak_mib(torch.device("cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    rows = []
    for batch in BATCHES:
        cells = {compiled: in_child("bench.compile", {"threads": args.threads, "batch": batch,
                                                       "steps": args.steps, "compiled": compiled})
                 for compiled in (False, True)}
        eager, comp = cells[False], cells[True]
        rows.append([batch, f"{eager['ms']:.1f}", f"{comp['ms']:.1f}",
                     f"{eager['ms'] / comp['ms']:.2f}x", f"{comp['first']:.1f}",
                     f"{eager['peak']:.0f} / {comp['peak']:.0f}",
                     f"{abs(comp['loss'] - eager['loss']) / abs(eager['loss']):.1e}"])
    print(f"{torch.get_num_threads()} CPUs seen, {args.threads} thread(s), torch {torch.__version__}")
    print(table(["batch", "eager ms/step", "compiled ms/step", "speed-up", "compile s",
                 "peak MiB eager / compiled", "loss rel. diff"], rows))


if __name__ == "__main__":
    main()
