"""Expert training throughput (images/s): one expert at a time vs G experts as one batched model.

Uses datm.experts.train_group on real prepared data when data/train.safetensors exists (else
random data of the same shape), one epoch over `--images` images, DSA on, same sizes as params.
Run: `python -m bench.experts [--images 12800] [--group 4]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import device, expert_seconds, machine, peak_mib, table
from datm import data
from datm.augment import AugConfig
from datm.config import load_params
from datm.experts import ExpertConfig
from datm.networks import FlatModel, NetSpec


def _data(n: int, dev: torch.device):
    path = Path("data/train.safetensors")
    if path.is_file():
        split = data.Split.load(path)
        x = data.normalize(split.images[:n], split.mean, split.std)
        return x.to(dev), split.labels[:n].to(dev), split.num_classes, "prepared data"
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, 1, 28, 28, generator=gen).to(dev),
            torch.randint(0, 10, (n,), generator=gen).to(dev), 10, "random 1x28x28")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    dev = device()
    p = load_params(args.params)
    x, y, classes, source = _data(args.images, dev)
    spec = NetSpec(x.shape[1], classes, x.shape[-1], width=p.net.width, depth=p.net.depth,
                   norm=p.net.norm)
    fm = FlatModel(spec, dev)
    cfg = ExpertConfig(epochs=1, lr=p.buffers.lr, batch=p.buffers.batch)
    aug = AugConfig()
    results = {}
    for label, groups in (("one at a time", [[k] for k in range(args.group)]),
                          (f"batched x{args.group}", [list(range(args.group))])):
        seconds = expert_seconds(fm, groups, x, y, cfg, aug)
        results[label] = (seconds, args.group * x.shape[0] / seconds, peak_mib(dev))
    plain = results["one at a time"][1]
    rows = [[k, f"{s:.1f}", f"{ips:.0f}", f"{mem:.0f}", f"{ips / plain:.2f}x"]
            for k, (s, ips, mem) in results.items()]
    print(f"\n{machine()}; {source}, {args.group} experts x {x.shape[0]} images, ConvNet width "
          f"{p.net.width} depth {p.net.depth} {p.net.norm} norm, batch {cfg.batch}, DSA on")
    print(table(["mode", "seconds", "images/s", "peak MiB", "vs one at a time"], rows))


if __name__ == "__main__":
    main()
