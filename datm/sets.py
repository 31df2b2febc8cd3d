"""Sets handed over for evaluation (`datm evaluate --from`), whatever made them.

Three kinds are recognized by what a folder holds:

- a datm export (`dataset_card.json`): its own reader, datm/export.py;
- a set saved by the DATM / MTT authors' code: `images_best.pt` (images already in the
  network's input space: their ZCA-whitened or normalized pixels), `labels_best.pt` (soft-label
  logits [N, K] or class ids [N]) and `lr_best.pt` or `syn_lr_best.pt` (the learned lr, if any);
- an image folder: one subfolder of images per class (torchvision's ImageFolder layout), hard
  labels from the folder names; its images are read as the pipeline reads its own data
  (converted to the data's channels, resized to its side).

Each becomes a `HandedSet`: network inputs or pixels, targets (soft logits or class ids), the
learned lr if it has one, and the notes of what was assumed, which the evaluation prints.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from . import export
from .data import IMAGE_SUFFIXES, DataError, read_image
from .errors import UserError
from .handed import HandedSet, one_line

DATM_IMAGES = "images_best.pt"
DATM_LABELS = "labels_best.pt"
DATM_LRS = ("lr_best.pt", "syn_lr_best.pt")


class SetError(UserError):
    """A folder that holds no set datm can read, or one that does not fit the pipeline."""


def read_set(folder: str | Path, classes: list[str], shape: tuple[int, int, int]) -> HandedSet:
    """The set in `folder`, for a pipeline whose data has `classes` and images of `shape`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SetError(f"{folder} is not a folder: pass a datm export, a folder holding "
                       f"{DATM_IMAGES} and {DATM_LABELS}, or an image folder (one subfolder "
                       "per class)")
    if (folder / export.CARD).is_file():
        found = export.read(folder)
    elif (folder / DATM_IMAGES).is_file():
        found = read_datm_pt(folder)
    elif any(d.is_dir() for d in folder.iterdir()):
        found = read_image_folder(folder, classes, shape)
    else:
        raise SetError(f"{folder} holds no set datm can read: no {export.CARD} (a datm export), "
                       f"no {DATM_IMAGES} (DATM / MTT), no class subfolders (an image folder)")
    _check_fits(found, folder, classes, shape)
    return found


def _check_fits(found: HandedSet, folder: Path, classes: list[str],
                shape: tuple[int, int, int]) -> None:
    n, k = found.images.shape[0], len(classes)
    if list(found.images.shape[1:]) != list(shape):
        raise SetError(f"{folder} holds images of shape {list(found.images.shape[1:])}; the "
                       f"pipeline's data is {list(shape)} (same dataset and params.yaml?)")
    if found.soft and found.targets.shape != (n, k):
        raise SetError(f"{folder}: soft labels of shape {list(found.targets.shape)} for {n} "
                       f"images of {k} classes (expected [{n}, {k}])")
    if not found.soft and (found.targets.shape != (n,) or int(found.targets.min()) < 0
                           or int(found.targets.max()) >= k):
        raise SetError(f"{folder}: hard labels must be {n} class ids in 0..{k - 1}")
    bad = [name for name, t in (("images", found.images), ("labels", found.targets.float()))
           if not bool(torch.isfinite(t).all())]
    if found.lr is not None and not np.isfinite(found.lr):
        bad.append("lr")
    if bad:
        raise SetError(f"{folder}: {' and '.join(bad)} hold NaN or inf values: refusing to "
                       "evaluate it")


def read_datm_pt(folder: Path) -> HandedSet:
    """A set saved by the DATM / MTT code: images in the network's input space."""
    images = _load_pt(folder / DATM_IMAGES)
    if not (folder / DATM_LABELS).is_file():
        raise SetError(f"{folder} has {DATM_IMAGES} but no {DATM_LABELS}")
    labels = _load_pt(folder / DATM_LABELS)
    if images.dim() != 4 or not images.dtype.is_floating_point:
        raise SetError(f"{folder / DATM_IMAGES} must hold float images [N, C, H, W], got "
                       f"{images.dtype} {list(images.shape)}")
    notes = [f"{DATM_IMAGES}: taken as network inputs (the authors' code saves its images "
             "whitened or normalized, as it trained on them); the test split goes through "
             "this pipeline's transform"]
    if labels.dtype.is_floating_point and labels.dim() == 2:
        targets, class_ids = labels.float(), labels.argmax(1)
        notes.append(f"{DATM_LABELS}: soft-label logits (soft cross-entropy against their "
                     "softmax; an image's class is its largest logit)")
    elif not labels.dtype.is_floating_point and labels.dim() == 1:
        targets = class_ids = labels.long()
        notes.append(f"{DATM_LABELS}: class ids (hard labels)")
    else:
        raise SetError(f"{folder / DATM_LABELS} must hold logits [N, K] or class ids [N], got "
                       f"{labels.dtype} {list(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise SetError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    lr = None
    for name in DATM_LRS:
        if (folder / name).is_file():
            lr = float(_load_pt(folder / name).reshape(-1)[0])
            notes.append(f"{name}: the learned lr {lr:.6g}")
            break
    return HandedSet("DATM .pt", targets, class_ids, inputs=images.float(), lr=lr, notes=notes)


def _load_pt(path: Path) -> torch.Tensor:
    try:
        # weights_only: torch's restricted unpickler (tensors, numbers, containers; no code)
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zipfile and torch raise many types for a bad file
        raise SetError(f"cannot read {path}: {one_line(exc)}") from None
    if isinstance(value, (int, float)):
        value = torch.tensor(value)
    if not isinstance(value, torch.Tensor):
        raise SetError(f"{path} must hold a tensor, got {type(value).__name__}")
    return value.detach()


def _key(name: str) -> str:
    """A class name as a folder may spell it: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]+", "", name.lower())


def class_mapping(folders: list[str], classes: list[str]) -> tuple[list[int], str]:
    """The pipeline's class of each class folder, and how it was matched.

    By name (case, spaces and punctuation aside; a datm png export's `003_Dress` by its
    number), else, when the counts agree, by sorted order, as torchvision's ImageFolder does.
    """
    by_key = {_key(c): i for i, c in enumerate(classes)}
    named = [by_key.get(_key(re.sub(r"^\d+_", "", f))) for f in folders]
    if all(i is not None for i in named) and len(set(named)) == len(named):
        return named, "by name"  # type: ignore[return-value]
    numbered = [int(m.group(1)) if (m := re.match(r"^(\d+)_", f)) else None for f in folders]
    if all(i is not None and i < len(classes) for i in numbered) and \
            len(set(numbered)) == len(numbered):
        return numbered, "by the number before '_'"  # type: ignore[return-value]
    if len(folders) == len(classes):
        return list(range(len(folders))), "by sorted order (the names differ)"
    raise SetError(f"{len(folders)} class folders ({', '.join(folders[:5])}"
                   f"{', ...' if len(folders) > 5 else ''}) for {len(classes)} classes "
                   f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): name the "
                   "folders after the classes, or give one folder per class")


def read_image_folder(folder: Path, classes: list[str], shape: tuple[int, int, int]) -> HandedSet:
    """One subfolder of images per class; hard labels from the folder names."""
    subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    mapping, how = class_mapping([d.name for d in subs], classes)
    channels, size = shape[0], shape[1]
    images, ids, resized = [], [], 0
    # class by class in the pipeline's class order, then by file name: a set's order is part
    # of its recipe (it seeds the batches), and datm's sets come in class blocks
    for sub, c in sorted(zip(subs, mapping), key=lambda pair: pair[1]):
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            try:
                arr, original = read_image(path, channels, size)
            except DataError as exc:
                raise SetError(str(exc)) from None
            resized += original != (size, size)
            images.append(arr)
            ids.append(c)
    if not images:
        raise SetError(f"{folder}'s class folders hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    pixels = torch.from_numpy(np.stack(images)).float() / 255
    class_ids = torch.tensor(ids)
    notes = [f"image folder: {len(subs)} class folders matched to the classes {how}: "
             + ", ".join(f"{d.name} -> {classes[c]}" for d, c in zip(subs, mapping)),
             "hard labels from the folder names; pixels read as 8-bit images on the [0, 1] "
             f"scale, {'grayscale' if channels == 1 else 'RGB'}"
             + (f"; {resized} images resized to {size}x{size}" if resized else "")]
    return HandedSet("image folder", class_ids, class_ids, pixels=pixels, notes=notes)
