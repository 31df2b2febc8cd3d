"""Datasets as tensors: uint8 images [N, C, H, W], int64 labels, plus what a reader needs to know.

Sources: Fashion-MNIST (Debian's package or torchvision's raw layout), CIFAR-10/100 (python
pickles, fetched with torchvision where there is internet), Tiny ImageNet (its folder layout) and
any folder of class subfolders. All of them end as the same `Split` artifact.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
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
# The largest image (width x height) a reader decodes: a few bytes of PNG can claim 20000 x
# 20000 pixels, 1.2 GB once decoded. 50 million is ~12000x Tiny ImageNet's 64 x 64 and still
# takes a 7000 x 7000 photo; DATM_MAX_IMAGE_PIXELS overrides it (a whole number of pixels).
MAX_IMAGE_PIXELS = 50_000_000
MAX_PIXELS_ENV = "DATM_MAX_IMAGE_PIXELS"


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
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    except (OSError, EOFError, zlib.error, struct.error) as exc:  # gzip's damage, a short header
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes")
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


class _CifarUnpickler(pickle.Unpickler):
    """pickle.load for CIFAR's batches, which can run no code: a pickle names the callables
    that rebuild its objects, and any callable would do (os.system), so only those that
    rebuild CIFAR's numpy arrays, bytes and strings are found; dicts and lists need none."""

    def find_class(self, module: str, name: str) -> object:
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch does "
                                         "not hold")
        return found


def _cifar_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> object, every global a CIFAR pickle may name: numpy's array and dtype
    rebuilders as numpy 1 (numpy.core) and 2 (numpy._core) spell them, `_frombuffer` for
    protocol 5; `_codecs.encode` and `bytes` rebuild bytes in protocol-2 pickles Python 3 wrote
    (encode only maps a str to bytes: its codecs come from the standard `encodings` package)."""
    import _codecs

    core = getattr(np, "_core", None) or np.core
    table: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray,
                                            ("numpy", "dtype"): np.dtype,
                                            ("_codecs", "encode"): _codecs.encode}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        table[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    for builtins in ("builtins", "__builtin__"):  # Python 2's name, in CIFAR's own files
        table[(builtins, "bytes")], table[(builtins, "bytearray")] = bytes, bytearray
    return table


_CIFAR_GLOBALS = _cifar_globals()


def _unpickle(path: Path) -> dict:
    """A CIFAR batch or meta file: a dict whose keys are bytes (Python 2 wrote them)."""
    try:
        with open(path, "rb") as f:
            found = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # pickle raises many types (and MemoryError) for damaged bytes
        raise DataError(f"{path} is not a CIFAR python batch ({type(exc).__name__}: "
                        f"{str(exc)[:200]}): extract cifar-*-python.tar.gz there again") from None
    if not isinstance(found, dict):
        raise DataError(f"{path} is not a CIFAR python batch (it holds a "
                        f"{type(found).__name__}, not a dict)")
    return found


def _cifar(root: Path, cfg: DataConfig) -> tuple[Split, Split]:
    folder, train_files, test_files, meta_file, names_key, labels_key = _CIFAR[cfg.name]
    base = root / folder
    if not (base / meta_file).is_file():
        _torchvision_download(cfg.name, root)
    classes = _cifar_classes(base / meta_file, names_key.encode())

    def read(files: list[str]) -> Split:
        batches = [_cifar_batch(base / f, labels_key, len(classes)) for f in files]
        images = np.concatenate([images for images, _ in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([labels for _, labels in batches])
        return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)),
                     classes, str(base))

    return read(train_files), read(test_files)


def _cifar_classes(path: Path, key: bytes) -> list[str]:
    names = _unpickle(path).get(key)
    if not isinstance(names, list) or not names or \
            not all(isinstance(c, (bytes, str)) for c in names):
        raise DataError(f"{path} holds no list of class names under {key.decode()!r}: extract "
                        "cifar-*-python.tar.gz there again")
    try:
        return [c.decode() if isinstance(c, bytes) else c for c in names]
    except UnicodeDecodeError:
        raise DataError(f"{path}: class names that are not UTF-8") from None


def _cifar_batch(path: Path, labels_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images [n, 3072] (uint8) and labels [n], checked: a damaged file says so here
    rather than as a reshape or indexing error later."""
    batch = _unpickle(path)
    images = batch.get(b"data")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: its b'data' must be uint8 images [N, 3072]")
    n = images.shape[0]
    try:
        labels = np.asarray(batch.get(labels_key), dtype=np.int64)
        fits = labels.shape == (n,) and (n == 0 or 0 <= labels.min() <= labels.max() < num_classes)
    except (TypeError, ValueError, OverflowError):
        fits = False
    if not fits:
        raise DataError(f"{path}: its {labels_key!r} must be {n} class ids in 0..{num_classes - 1}")
    return images, labels


def _torchvision_download(name: str, root: Path) -> None:
    """Fetch CIFAR's archive with torchvision (which checks its md5); without internet say
    where the files must go. Only the download: reading is ours (`_unpickle`)."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as exc:
        raise DataError(f"{name} not found in {root}/{_CIFAR[name][0]} and the download failed "
                        f"({type(exc).__name__}); put the extracted python version there") from None


# --- folders of images -------------------------------------------------------------------------

def max_image_pixels() -> int:
    """The pixel limit of `open_image`: DATM_MAX_IMAGE_PIXELS, else MAX_IMAGE_PIXELS."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise DataError(f"{MAX_PIXELS_ENV} must be a whole number of pixels > 0, got {raw!r}")
    return limit


@contextmanager
def open_image(path: Path, what: str = "image") -> Iterator:
    """PIL's image of `path` for the block, refused (a DataError naming it) when it is larger
    than `max_image_pixels()` (checked on its header, before any pixel is decoded) or when
    anything in the block fails to decode it.

    PIL's own check (a warning, then an error that is no OSError, above its own limit) is off
    during the open: ours replaces it, so that DATM_MAX_IMAGE_PIXELS is the one limit."""
    import warnings

    from PIL import Image

    limit, pil_limit = max_image_pixels(), Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
        with im:
            width, height = im.size
            if width * height > limit:
                raise DataError(f"{what} {path} is {width} x {height} pixels, more than the "
                                f"{limit} datm decodes ({MAX_PIXELS_ENV} raises the limit)")
            yield im
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise DataError(f"cannot read {what} {path}: {type(exc).__name__}: "
                        f"{str(exc)[:200]}") from None


def read_image(path: Path, channels: int, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file as uint8 [channels, size, size] (converted, resized if need be), and its
    original (width, height)."""
    from PIL import Image

    with open_image(path) as im:
        original = im.size
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
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
        for line in _read_text(annotations).splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in index:
                test.append((base / "val" / "images" / parts[0], index[parts[1]]))
    names = _tiny_names(base, wnids)
    return (_stack(train, names, 3, 64, str(base)), _stack(test, names, 3, 64, str(base)))


def _tiny_names(base: Path, wnids: list[str]) -> list[str]:
    words = base / "words.txt"
    if not words.is_file():
        return wnids
    table = dict(line.split("\t", 1) for line in _read_text(words).splitlines() if "\t" in line)
    return [table.get(w, w).split(",")[0].strip() for w in wnids]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
