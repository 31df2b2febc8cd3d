"""Export a distilled set in pixel space, and read an exported set back.

Layout of an export directory:
  images.{safetensors,pt,npz}  float pixels [N, C, H, W] in [0, 1], label logits/probs, lr
  or, for png: <000_class>/<index>.png (torchvision ImageFolder layout) + labels.safetensors
  dataset_card.json, README.md  where it came from, its settings and measured accuracies
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import artifacts, locks
from .errors import UserError

FORMATS = ("safetensors", "pt", "npz", "png")
LABELS = "labels.safetensors"
CARD = "dataset_card.json"


class ExportError(UserError):
    """A refused or impossible export; the message is for a user."""


def _class_dir(index: int, name: str) -> str:
    # Zero-padded index first so that ImageFolder's sorted order is the class order.
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-') or 'class'}"


def export(pixels: torch.Tensor, logits: torch.Tensor, lr: float, classes: list[str],
           out: str | Path, fmt: str, card: dict, force: bool = False) -> Path:
    """Write the set to `out` (refusing to overwrite unless `force`), all or nothing."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    out = Path(out)
    try:
        return _export(pixels, logits, lr, classes, out, fmt, card, force)
    except OSError as exc:  # an unwritable or full destination: a user's to fix, not a bug
        raise ExportError(f"cannot write the export to {out}: {exc.strerror or exc}") from None


def _export(pixels: torch.Tensor, logits: torch.Tensor, lr: float, classes: list[str],
            out: Path, fmt: str, card: dict, force: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with locks.hold(out.parent / f".{out.name}.lock", f"{out} is being exported"):
        _recover(out)
        artifacts.remove_stale_temps(out)  # a killed export's half-written folders
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not force:
                raise ExportError(f"{out} exists and is not empty: pass --force to overwrite it")
            if not (out / CARD).is_file():
                # --force replaces an earlier export, never an arbitrary folder (think --out .)
                raise ExportError(f"{out} is not a datm export (no {CARD}): refusing to replace it")
        # Named like atomic_path's temp files, so that remove_stale_temps finds it after a kill.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            _write(tmp, pixels.float().clamp(0, 1).cpu(), logits.float().cpu(), lr, classes, fmt)
            full_card = {**card, "format": fmt, "classes": classes, "num_images": pixels.shape[0],
                         "shape": list(pixels.shape[1:]), "lr": lr}
            (tmp / CARD).write_text(json.dumps(full_card, indent=2, sort_keys=True) + "\n")
            (tmp / "README.md").write_text(card_markdown(full_card))
            os.chmod(tmp, 0o755)
            _swap(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return out


def _aside(out: Path) -> Path:
    """Where --force keeps the export it replaces until the new one is in place."""
    return out.parent / f".{out.name}.previous"


def _swap(new: Path, out: Path) -> None:
    """Rename `new` to `out`. An export already there is renamed aside first and deleted last,
    so whenever this stops, a complete export is at `out` or aside (`_recover` sorts it out)."""
    aside = _aside(out)
    if out.exists():
        os.replace(out, aside)
    try:
        os.replace(new, out)
    except BaseException:
        if aside.exists() and not out.exists():
            try:
                os.replace(aside, out)  # the old export back in place
            except OSError:
                pass  # then the next export's _recover does it
        raise
    if aside.exists():
        shutil.rmtree(aside)


def _recover(out: Path) -> None:
    """Finish a swap that a kill interrupted: the old export waits aside."""
    aside = _aside(out)
    if not aside.is_dir():
        return
    if (out / CARD).is_file():
        shutil.rmtree(aside)  # the new export made it in: the old one can go
    elif not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(aside, out)  # killed before the new one was in place: the old one returns
    else:
        raise ExportError(f"{aside} holds an earlier export and {out} is not one: "
                          "move one of them away")


def _write(folder: Path, pixels: torch.Tensor, logits: torch.Tensor, lr: float,
           classes: list[str], fmt: str) -> None:
    probs = torch.softmax(logits, dim=1)
    ipc = pixels.shape[0] // len(classes)
    class_ids = torch.arange(len(classes)).repeat_interleave(ipc)
    payload = {"images": pixels, "label_logits": logits, "label_probs": probs,
               "class_ids": class_ids, "lr": torch.tensor([lr])}
    if fmt == "safetensors":
        artifacts.save(folder / "images.safetensors", payload, "export")
    elif fmt == "pt":
        torch.save(payload, folder / "images.pt")
    elif fmt == "npz":
        np.savez(folder / "images.npz", **{k: v.numpy() for k, v in payload.items()})
    else:
        from PIL import Image

        files = []
        for i, (img, c) in enumerate(zip(pixels, class_ids.tolist())):
            sub = folder / _class_dir(c, classes[c])
            sub.mkdir(exist_ok=True)
            arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(sub / f"{i:06d}.png")
            files.append(f"{sub.name}/{i:06d}.png")
        del payload["images"]
        artifacts.save(folder / LABELS, payload, "export-labels", {"files": files})


def read(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """(pixels [N, C, H, W] in [0, 1], label logits, lr, card) of an export directory.

    A missing, truncated or unreadable file is an ExportError that names it.
    """
    folder = Path(folder)
    if not (folder / CARD).is_file():
        raise ExportError(f"{folder} is not a datm export (no {CARD})")
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{folder / CARD} is not readable JSON: {exc}") from None
    if not isinstance(card, dict):
        raise ExportError(f"{folder / CARD} must hold a JSON object")
    fmt = card.get("format")
    if fmt not in FORMATS:
        raise ExportError(f"{folder / CARD} names an unknown format '{fmt}'")
    t = _read_tensors(folder, fmt)
    missing = [k for k in ("images", "label_logits", "lr") if k not in t]
    if missing:
        raise ExportError(f"{folder} lacks {', '.join(missing)} in its {fmt} file")
    return t["images"].float(), t["label_logits"].float(), float(t["lr"].reshape(-1)[0]), card


def _read_tensors(folder: Path, fmt: str) -> dict[str, torch.Tensor]:
    path = folder / (LABELS if fmt == "png" else f"images.{fmt}")
    if not path.is_file():
        raise ExportError(f"{path} is missing: the export is incomplete")
    try:
        if fmt == "safetensors":
            return artifacts.load(path, "export")[0]
        if fmt == "pt":
            return torch.load(path, weights_only=True)
        if fmt == "npz":
            with np.load(path) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        t, meta = artifacts.load(path, "export-labels")
        t["images"] = torch.stack([_read_png(folder / name) for name in meta["files"]]) / 255
        return t
    except ExportError:
        raise
    except artifacts.ArtifactError as exc:
        raise ExportError(str(exc)) from None
    except Exception as exc:  # numpy, zipfile and pickle raise many types for a damaged file
        raise ExportError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def _read_png(path: Path) -> torch.Tensor:
    from PIL import Image

    if not path.is_file():
        raise ExportError(f"{path} is missing: the export is incomplete")
    try:
        with Image.open(path) as im:
            arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    except OSError as exc:
        raise ExportError(f"cannot read image {path}: {exc}") from None
    return (arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)).float()


def card_markdown(card: dict) -> str:
    acc = card.get("accuracy") or {}
    lines = [
        f"# Distilled {card.get('dataset', '?')}: {card.get('ipc', '?')} images per class",
        "",
        f"Made by datm (difficulty-aligned trajectory matching) from `{card.get('dataset')}`, "
        f"git commit `{card.get('git_commit', 'unknown')}`.",
        "",
        f"- images: {card['num_images']} ({card.get('ipc')} per class, {len(card['classes'])} "
        f"classes), shape {card['shape']}, pixel values in [0, 1], format `{card['format']}`",
        "- labels: learned soft labels, as logits (`label_logits`) and probabilities "
        "(`label_probs`); train with soft cross-entropy against the probabilities",
        f"- learned learning rate: {card['lr']:.6g}",
        f"- ZCA whitening in the pipeline: {card.get('zca')}; the images here are de-whitened. "
        f"Normalize with mean {card.get('mean')} / std {card.get('std')}"
        + (" and re-apply the dataset's ZCA before training" if card.get("zca") else ""),
        "",
        "## Measured accuracy (ConvNet, test split of the real dataset)",
    ]
    if acc:
        lines += ["", "| set | accuracy |", "|---|---|"]
        for key in ("distilled", "random_real", "full_dataset"):
            if acc.get(key):
                lines.append(f"| {key} | {acc[key]} |")
    else:
        lines += ["", "Not evaluated yet: run `datm evaluate --from <this folder>`."]
    lines += ["", "## Settings", "", "```json", json.dumps(card.get("settings", {}), indent=2),
              "```", "", "## Train on it", "", "```bash",
              "datm evaluate --from <this folder>   # the pipeline's own protocol", "```", ""]
    return "\n".join(lines)
