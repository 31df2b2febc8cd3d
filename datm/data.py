"""Datasets as tensors: uint8 images [N, C, H, W], int64 labels, plus what a reader needs to know.

Sources: Fashion-MNIST (Debian's package or torchvision's raw layout), CIFAR-10/100 (python
pickles, fetched with torchvision where there is internet), Tiny ImageNet (its folder layout) and
any folder of class subfolders. All of them end as the same `Split` artifact.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import artifacts
from .config import DataConfig
from .errors import UserError
from .zca import ZCA

KIND = "dataset"
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(UserError):
    """Data that cannot be found or read; the message says what to install or where to put it."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    source: str
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def save(self, path: str | Path, split: str) -> Path:
        meta = {"classes": self.classes, "source": self.source, "mean": self.mean,
                "std": self.std, "split": split}
        return artifacts.save(path, {"images": self.images, "labels": self.labels}, KIND, meta)

    @classmethod
    def load(cls, path: str | Path) -> Split:
        tensors, meta = artifacts.load(path, KIND)
        return cls(tensors["images"], tensors["labels"], meta["classes"], meta["source"],
                   meta["mean"], meta["std"])


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    x = images.transpose(0, 1).flatten(1).double() / 255.0
    return x.mean(1).tolist(), x.std(1).tolist()


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Pixels in [0, 255] (uint8 or float) -> float, standardized per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def to_model_space(images: torch.Tensor, mean: list[float], std: list[float],
                   zca: ZCA) -> torch.Tensor:
    """Pixels in [0, 255] (uint8 or float) -> the space that networks and distillation use.

    With ZCA: whitened raw [0, 1] pixels, no per-channel normalization (the DATM reference,
    docs/METHOD.md, "ZCA whitening"; the whitening centres the data itself). Without: normalized.
    """
    return pixels_to_model_space(images.float() / 255.0, mean, std, zca)


def pixels_to_model_space(pixels: torch.Tensor, mean: list[float], std: list[float],
                          zca: ZCA) -> torch.Tensor:
    """Float pixels on the [0, 1] scale (any values: a distilled set's leave that range) ->
    model space: `to_model_space` without the uint8 scaling."""
    if zca.enabled:
        return zca.whiten(pixels)
    m = torch.tensor(mean, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - m) / s


def to_pixels(x: torch.Tensor, mean: list[float], std: list[float], zca: ZCA,
              clip: bool = True) -> torch.Tensor:
    """Model space -> float pixels on the [0, 1] scale (de-whitened or de-normalized).

    `clip` for viewing (image grids). A distilled set's pixels leave [0, 1] (its images are
    learned in model space, where nothing bounds them), so an export keeps them unclipped.
    """
    if zca.enabled:
        pixels = zca.dewhiten(x.float())
    else:
        m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
        pixels = x.float() * s + m
    return pixels.clamp(0, 1) if clip else pixels


def load(cfg: DataConfig) -> tuple[Split, Split]:
    """Read the configured dataset as (train, test); the train split carries mean and std."""
    root = Path(cfg.root)
    reader = {"fashion_mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar,
              "tiny_imagenet": _tiny_imagenet, "imagefolder": _imagefolder}[cfg.name]
    train, test = reader(root, cfg)
    if train.images.shape[0] == 0 or test.images.shape[0] == 0:
        raise DataError(f"{cfg.name} under {root} has an empty train or test split")
    mean, std = channel_stats(train.images)
    for split in (train, test):
        split.mean, split.std = mean, std
    return train, test


# --- Fashion-MNIST ---------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated")
    return array.reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _fashion_mnist(root: Path, cfg: DataConfig) -> tuple[Split, Split]:
    dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    # Debian's copy stands in only for the default root: a root the user typed must hold the
    # files, or a typo would silently train on whatever the system happens to have.
    default_root = cfg.root == DataConfig.root
    if default_root:
        dirs.append(DEBIAN_FMNIST)
    splits = []
    for prefix in ("train", "t10k"):
        img = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
        lab = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
        if img is None or lab is None:
            where = (f"{root}/FashionMNIST/raw or {DEBIAN_FMNIST}: run `apt-get install -y "
                     "dataset-fashion-mnist` or put the four idx files there" if default_root else
                     f"data.root '{cfg.root}' (nor in its FashionMNIST/raw): check the path "
                     f"(Debian's copy is used only with the default root '{DataConfig.root}')")
            raise DataError(f"Fashion-MNIST {prefix} files not found in {where}")
        images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
        labels = torch.from_numpy(_read_idx(lab).astype(np.int64))
        splits.append(Split(images, labels, list(FMNIST_CLASSES), str(img.parent)))
    return splits[0], splits[1]


# --- CIFAR -----------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names",
                 b"fine_labels"),
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar(root: Path, cfg: DataConfig) -> tuple[Split, Split]:
    folder, train_files, test_files, meta_file, names_key, labels_key = _CIFAR[cfg.name]
    base = root / folder
    if not (base / meta_file).is_file():
        _torchvision_download(cfg.name, root)
    meta = _unpickle(base / meta_file)
    classes = [c.decode() if isinstance(c, bytes) else c for c in meta[names_key.encode()]]

    def read(files: list[str]) -> Split:
        batches = [_unpickle(base / f) for f in files]
        images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(b[labels_key]) for b in batches])
        return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)),
                     classes, str(base))

    return read(train_files), read(test_files)


def _torchvision_download(name: str, root: Path) -> None:
    """Fetch CIFAR with torchvision; without internet say where the files must go."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        cls(str(root), train=True, download=True)
    except Exception as exc:
        raise DataError(f"{name} not found in {root}/{_CIFAR[name][0]} and the download failed "
                        f"({type(exc).__name__}); put the extracted python version there") from None


# --- folders of images -------------------------------------------------------------------------

def read_image(path: Path, channels: int, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file as uint8 [channels, size, size] (converted, resized if need be), and its
    original (width, height)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            original = im.size
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise DataError(f"cannot read image {path}: {exc}") from None
    return (arr[None] if channels == 1 else arr.transpose(2, 0, 1)), original


def _stack(items: list[tuple[Path, int]], classes: list[str], channels: int, size: int,
           source: str) -> Split:
    images = np.stack([read_image(p, channels, size)[0] for p, _ in items]) if items else \
        np.zeros((0, channels, size, size), np.uint8)
    labels = np.asarray([c for _, c in items], dtype=np.int64)
    return Split(torch.from_numpy(images), torch.from_numpy(labels), classes, source)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _imagefolder(root: Path, cfg: DataConfig) -> tuple[Split, Split]:
    size = cfg.im_size or 32
    train_dir = root / "train" if (root / "train").is_dir() else root
    if not train_dir.is_dir() or not _class_dirs(train_dir):
        raise DataError(f"no class subfolders in {train_dir}: put one folder of images per class "
                        "there (optionally under train/ and test/)")
    classes = [d.name for d in _class_dirs(train_dir)]
    if len(classes) < 2:
        raise DataError(f"{train_dir} has {len(classes)} class folder(s): classification needs "
                        "at least 2 (one subfolder of images per class)")
    empty = [d for d in _class_dirs(train_dir) if not _images_in(d)]
    if empty:
        raise DataError(f"class folder {empty[0]} holds no images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}): remove it or add images")
    train_items = [(p, c) for c, d in enumerate(_class_dirs(train_dir)) for p in _images_in(d)]
    if (root / "test").is_dir():
        index = {name: c for c, name in enumerate(classes)}
        test_items = [(p, index[d.name]) for d in _class_dirs(root / "test") if d.name in index
                      for p in _images_in(d)]
    else:
        rng = np.random.default_rng(cfg.seed)
        keep, test_items = [], []
        for c in range(len(classes)):
            mine = [it for it in train_items if it[1] == c]
            order = rng.permutation(len(mine))
            n_test = int(round(len(mine) * cfg.test_fraction))
            test_items += [mine[i] for i in order[:n_test]]
            keep += [mine[i] for i in order[n_test:]]
        train_items = keep
    for c, name in enumerate(classes):
        if not any(label == c for _, label in train_items):
            raise DataError(f"class '{name}' has no training images left after holding out "
                            f"data.test_fraction {cfg.test_fraction}: add images or lower it")
    return (_stack(train_items, classes, cfg.channels, size, str(root)),
            _stack(test_items, classes, cfg.channels, size, str(root)))


def _tiny_imagenet(root: Path, cfg: DataConfig) -> tuple[Split, Split]:
    base = root / "tiny-imagenet-200"
    if not (base / "train").is_dir():
        raise DataError(f"Tiny ImageNet not found: extract tiny-imagenet-200.zip into {root} "
                        f"(expected {base}/train and {base}/val)")
    wnids = [d.name for d in _class_dirs(base / "train")]
    index = {w: c for c, w in enumerate(wnids)}
    train = [(p, index[w]) for w in wnids for p in _images_in(base / "train" / w)]
    test = []
    annotations = base / "val" / "val_annotations.txt"
    if annotations.is_file():
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in index:
                test.append((base / "val" / "images" / parts[0], index[parts[1]]))
    names = _tiny_names(base, wnids)
    return (_stack(train, names, 3, 64, str(base)), _stack(test, names, 3, 64, str(base)))


def _tiny_names(base: Path, wnids: list[str]) -> list[str]:
    words = base / "words.txt"
    if not words.is_file():
        return wnids
    table = dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
    return [table.get(w, w).split(",")[0].strip() for w in wnids]
