"""Train fresh networks on this distilled set the way datm measured it, in plain PyTorch.

    python reproduce.py --test test.npz                       # your copy of the real test split
    python reproduce.py --torchvision FashionMNIST --root data --download

`--test` takes an .npz or .safetensors file holding uint8 `images` ([N, C, H, W] or [N, H, W])
and integer `labels`; `--torchvision` names a torchvision dataset class whose test split to use
(FashionMNIST, CIFAR10, CIFAR100). Everything else comes from dataset_card.json beside this
file: the set (a lossless export holds the network's inputs exactly; png images are decoded by
their pixel ranges), how pixels become the network's input (`preprocessing`, with
zca.safetensors when the pipeline whitened), the network and the training recipe (`recipe`).
`--epochs` and `--models` override the recipe for a quick check; `--threads` as the recipe's
`threads` gives the pipeline's float rounding on a CPU. A recipe with `compile: true` trains
through torch.compile as the pipeline did (a C++ compiler needed); `--eager` trains without it:
the same training with other float rounding, so numbers near the card's, not equal. Needs
torch and numpy; safetensors for .safetensors files, Pillow for png exports, torchvision for
ResNet-18 or --torchvision. It imports nothing from datm: the export is meant to travel
without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    return torch.load(path, weights_only=True)


def load_set(folder: Path, card: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The set as the network's input [N, C, H, W], and its soft-label logits.

    A lossless export (safetensors, pt, npz) holds the inputs themselves (`inputs`). A png
    export holds each image stretched over its own 8-bit range: decoded to pixels by its
    `pixel_range`, then preprocessed. An export of layout 1 held pixels clipped to [0, 1].
    """
    if card["format"] == "png":  # class folders of images; labels and ranges in metadata.jsonl
        from PIL import Image

        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        codes = nchw(torch.from_numpy(np.stack([np.asarray(Image.open(folder / r["file_name"]),
                                                           dtype=np.uint8) for r in rows])))
        if card.get("layout", 1) >= 2:
            lo = torch.tensor([r["pixel_range"][0] for r in rows]).view(-1, 1, 1, 1)
            hi = torch.tensor([r["pixel_range"][1] for r in rows]).view(-1, 1, 1, 1)
            pixels = codes.float() / 255 * (hi - lo) + lo
        else:
            pixels = codes.float() / 255
        logits = torch.tensor([r["label_logits"] for r in rows])
        return preprocess(pixels, card, folder), logits
    t = read_tensors(folder / f"images.{card['format']}")
    if "inputs" in t:
        return t["inputs"].float(), t["label_logits"].float()
    return preprocess(t["images"].float(), card, folder), t["label_logits"].float()


def nchw(images: torch.Tensor) -> torch.Tensor:
    """Images [N, H, W], [N, H, W, C] or [N, C, H, W] -> [N, C, H, W]."""
    if images.dim() == 3:
        return images[:, None]
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        return images.permute(0, 3, 1, 2)
    return images


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, H, W], [N, H, W, C] or [N, C, H, W] -> floats in [0, 1], [N, C, H, W]."""
    return nchw(images).float() / 255


def load_test(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.torchvision:
        import torchvision

        ds = getattr(torchvision.datasets, args.torchvision)(args.root, train=False,
                                                             download=args.download)
        images, labels = torch.as_tensor(np.asarray(ds.data)), torch.as_tensor(ds.targets)
    else:
        t = read_tensors(Path(args.test))
        images, labels = t["images"], t["labels"]
    return as_pixels(images), labels.long()


def preprocess(pixels: torch.Tensor, card: dict, folder: Path) -> torch.Tensor:
    """Pixels on the [0, 1] scale -> the network's input, as card["preprocessing"] describes."""
    pre = card["preprocessing"]
    if pre["zca"]:  # whitening of raw pixels; no per-channel normalization on top
        zca = read_tensors(folder / pre["file"])
        return ((pixels.flatten(1) - zca["mean"]) @ zca["matrix"]).view_as(pixels)
    mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
    return (pixels - mean) / std


def build(net: dict) -> nn.Module:
    """depth x [conv3x3 -> norm -> ReLU -> avg-pool 2x2] -> linear; or a small-image ResNet-18."""
    def norm(c: int) -> nn.Module:
        if net["norm"] == "instance":
            return nn.GroupNorm(c, c)  # instance norm with affine weights, no running statistics
        return nn.BatchNorm2d(c) if net["norm"] == "batch" else nn.Identity()

    if net["model"] == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(num_classes=net["num_classes"], norm_layer=norm)
        model.conv1 = nn.Conv2d(net["channels"], 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    layers, c, side = [], net["channels"], net["im_size"]
    for block in range(net["depth"]):
        pad = net["first_conv_padding"] if block == 0 else 1
        layers += [nn.Conv2d(c, net["width"], 3, padding=pad), norm(net["width"]), nn.ReLU(),
                   nn.AvgPool2d(2)]
        c, side = net["width"], (side + 2 * pad - 2) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, net["num_classes"]))


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def dsa(x: torch.Tensor, aug: dict, gen: torch.Generator) -> torch.Tensor:
    """Differentiable Siamese augmentation: per batch ONE family, drawn uniformly from
    aug["families"], with a random magnitude per image (the draws come from `gen`, in order)."""
    families = aug["families"] if aug["enabled"] else []
    if not families:
        return x
    family = families[int(torch.randint(len(families), (1,), generator=gen))]
    n, size = x.shape[0], x.shape[-1]
    rand = lambda *shape: torch.rand(*shape, generator=gen).to(x)  # noqa: E731
    if family == "color":  # brightness shift, saturation and contrast factors
        v = rand(n, 3)[:, :, None, None, None]
        x = x + (v[:, 0] - 0.5) * aug["brightness"]
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (v[:, 1] * aug["saturation"]) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (v[:, 2] + aug["contrast"]) + mean
    if family == "cutout":  # zero a square of side cutout * size around a random pixel
        centre = torch.randint(0, size, (n, 2), generator=gen).to(x)
        side = int(size * aug["cutout"] + 0.5)
        low, grid = centre - side // 2, torch.arange(size).to(x)
        rows = (grid >= low[:, :1]) & (grid < low[:, :1] + side)
        cols = (grid >= low[:, 1:]) & (grid < low[:, 1:] + side)
        return x * (~(rows[:, :, None] & cols[:, None, :]))[:, None].to(x)
    theta = torch.zeros(n, 2, 3).to(x)
    if family == "crop":  # translate by whole pixels, up to crop * size, zero fill
        shift = int(size * aug["crop"] + 0.5)
        v = torch.randint(-shift, shift + 1, (n, 2), generator=gen).to(x)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2], theta[:, 1, 2] = 2 * v[:, 1] / size, 2 * v[:, 0] / size
    elif family == "flip":  # horizontal, half of the images
        return torch.where(rand(n)[:, None, None, None] < 0.5, x.flip(3), x)
    elif family == "scale":  # per axis, in [1 / scale, scale]
        v = rand(n, 2) * (aug["scale"] - 1 / aug["scale"]) + 1 / aug["scale"]
        theta[:, 0, 0], theta[:, 1, 1] = v[:, 0], v[:, 1]
    else:  # rotate by up to +-rotate degrees
        rad = (rand(n) - 0.5) * 2 * aug["rotate"] * (math.pi / 180)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(rad), torch.sin(-rad)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(rad), torch.cos(rad)
    return warp(x, theta)


def compile_blocker() -> str | None:
    """Why torch.compile cannot build its kernels here (a C++ compiler and Python.h), or None."""
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        return "there is no C++ compiler"
    if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "Python's headers (Python.h) are missing"
    return None


def train_and_test(card: dict, x: torch.Tensor, logits: torch.Tensor, x_test: torch.Tensor,
                   y_test: torch.Tensor, epochs: int, seed: int, compile: bool = True) -> float:
    """One fresh network: SGD with momentum and weight decay, lr x0.1 after half the epochs,
    DSA on every batch, soft cross-entropy against softmax(logits); then test accuracy."""
    recipe = card["recipe"]
    torch.manual_seed(2 * seed)  # the network's initial weights
    model = build(recipe["network"]).to(x.device)
    # the training steps compiled as the pipeline's were (one graph per batch shape); the test
    # pass below is eager in both
    forward = torch.compile(model, dynamic=False) if compile and recipe.get("compile") else model
    gen = torch.Generator().manual_seed(2 * seed + 1)  # batch order and augmentation
    opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                          weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    n, batch = x.shape[0], min(recipe["batch"], x.shape[0])
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            if len(idx) < 2 and recipe["network"]["norm"] == "batch":
                continue  # batch norm cannot train on one image
            out = forward(dsa(x[idx], recipe["augmentation"], gen))
            loss = -(F.log_softmax(out, 1) * F.softmax(logits[idx], 1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x_test[s:s + 2048]).argmax(1) == y_test[s:s + 2048]).sum())
                   for s in range(0, len(x_test), 2048))
    return hits / len(x_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=Path(__file__).resolve().parent,
                        help="the export folder (default: the one holding this file)")
    parser.add_argument("--test", help=".npz / .safetensors with uint8 `images` and `labels`")
    parser.add_argument("--torchvision", help="torchvision dataset class, e.g. FashionMNIST")
    parser.add_argument("--root", default="data", help="--torchvision's root folder")
    parser.add_argument("--download", action="store_true", help="let torchvision download it")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--models", type=int, help="override the recipe's number of networks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (the recipe's `threads`: the "
                        "pipeline's rounding); default: torch's")
    parser.add_argument("--eager", action="store_true", help="no torch.compile even where the "
                        "recipe has it (other float rounding: near the card's number, not equal)")
    args = parser.parse_args()
    if (args.test is None) == (args.torchvision is None):
        parser.error("pass exactly one of --test FILE or --torchvision NAME")
    if args.threads:
        torch.set_num_threads(args.threads)
    card = json.loads((args.export / "dataset_card.json").read_text())
    recipe = card["recipe"]
    if recipe.get("compile") and not args.eager and (why := compile_blocker()):
        print(f"warning: the recipe trains through torch.compile, but {why}: training eager "
              "(other float rounding: a number near the card's, not equal)", file=sys.stderr)
        args.eager = True
    # inductor's C++ builder logs "No CUDA runtime is found" on a machine without CUDA: noise
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    x, logits = load_set(args.export, card)
    x = x.to(args.device)
    test_pixels, y_test = load_test(args)
    x_test = preprocess(test_pixels, card, args.export).to(args.device)
    epochs, models = args.epochs or recipe["epochs"], args.models or recipe["models"]
    accs = []
    for k in range(models):  # network k's seed: the recipe's first seed + k
        accs.append(train_and_test(card, x, logits.float().to(args.device), x_test,
                                   y_test.to(args.device), epochs, recipe["model_seeds"][0] + k,
                                   not args.eager))
        print(f"model {k + 1}/{models}: test accuracy {accs[-1]:.6f}", flush=True)
    std = float(torch.tensor(accs, dtype=torch.float64).std()) if models > 1 else 0.0
    print(f"test accuracy {100 * sum(accs) / models:.2f} ± {100 * std:.2f} % over {models} "
          f"models, {epochs} epochs (the card: {card.get('accuracy', {}).get('distilled')})")


if __name__ == "__main__":
    main()
