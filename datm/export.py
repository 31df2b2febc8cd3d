"""Export a distilled set in pixel space, and read an exported set back.

Layout of an export directory:
  images.{safetensors,pt,npz}  float pixels [N, C, H, W] in [0, 1], label logits/probs, lr
  or, for png: <000_class>/<index>.png (torchvision ImageFolder layout), labels.safetensors,
               and metadata.jsonl (one row per image: file_name and its soft label), which makes
               the folder a Hugging Face `imagefolder` dataset with the soft labels as columns
  zca.safetensors     the pipeline's ZCA (mean, matrix, inverse), when it whitened
  dataset_card.json   where it came from, its settings, measured accuracies, and what a network
                      trained on it needs: `preprocessing` (pixels -> network input) and `recipe`
  README.md           the card for people
  reproduce.py        a plain-PyTorch script (no datm) that trains on the set by the recipe:
                      datm/export_snippet.py, copied
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
from .zca import ZCA

FORMATS = ("safetensors", "pt", "npz", "png")
LABELS = "labels.safetensors"
CARD = "dataset_card.json"
METADATA = "metadata.jsonl"  # Hugging Face imagefolder's per-image columns (png)
ZCA_FILE = "zca.safetensors"
# Not "train.py": Hugging Face's imagefolder takes a file named train* (or test*, val*, ...) for
# a split of its own, and the png export would then load as a "train" split without images.
SCRIPT = "reproduce.py"
# One copy of the training snippet: exported as SCRIPT and quoted in the export's README.
SNIPPET = Path(__file__).with_name("export_snippet.py")


class ExportError(UserError):
    """A refused or impossible export; the message is for a user."""


def _class_dir(index: int, name: str) -> str:
    # Zero-padded index first so that ImageFolder's sorted order is the class order.
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-') or 'class'}"


def export(pixels: torch.Tensor, logits: torch.Tensor, lr: float, classes: list[str],
           out: str | Path, fmt: str, card: dict, force: bool = False,
           zca: ZCA | None = None) -> Path:
    """Write the set to `out` (refusing to overwrite unless `force`), all or nothing.

    `zca`, when enabled, is written beside the images (what `card["preprocessing"]` points at);
    a card with a `recipe` also gets SCRIPT, the plain-PyTorch way to train on the set.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    out = Path(out)
    try:
        return _export(pixels, logits, lr, classes, out, fmt, card, force, zca or ZCA())
    except OSError as exc:  # an unwritable or full destination: a user's to fix, not a bug
        raise ExportError(f"cannot write the export to {out}: {exc.strerror or exc}") from None


def _export(pixels: torch.Tensor, logits: torch.Tensor, lr: float, classes: list[str],
            out: Path, fmt: str, card: dict, force: bool, zca: ZCA) -> Path:
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
            if zca.enabled:
                zca.save(tmp / ZCA_FILE)
            full_card = {**card, "format": fmt, "classes": classes, "num_images": pixels.shape[0],
                         "shape": list(pixels.shape[1:]), "lr": lr}
            (tmp / CARD).write_text(json.dumps(full_card, indent=2, sort_keys=True) + "\n")
            snippet = SNIPPET.read_text() if "recipe" in card else None
            if snippet:
                (tmp / SCRIPT).write_text(snippet)
            (tmp / "README.md").write_text(card_markdown(full_card, snippet))
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

        files, rows = [], []
        for i, (img, c) in enumerate(zip(pixels, class_ids.tolist())):
            sub = folder / _class_dir(c, classes[c])
            sub.mkdir(exist_ok=True)
            arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(sub / f"{i:06d}.png")
            files.append(f"{sub.name}/{i:06d}.png")
            # No "label" column: Hugging Face would take it for the class; the folder says that.
            rows.append({"file_name": files[-1], "class_id": c, "class_name": classes[c],
                         "label_probs": probs[i].tolist(), "label_logits": logits[i].tolist()})
        del payload["images"]
        artifacts.save(folder / LABELS, payload, "export-labels", {"files": files})
        (folder / METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows))


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


def card_markdown(card: dict, snippet: str | None = None) -> str:
    """The export's README.md: what the set is, its numbers, and how to train on it."""
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
        "",
        "## Measured accuracy (ConvNet, test split of the real dataset)",
    ]
    if acc:
        lines += ["", "| set | accuracy |", "|---|---|"]
        for key in ("distilled", "random_real", "full_dataset"):
            if acc.get(key):
                lines.append(f"| {key} | {acc[key]} |")
        if acc.get("note"):
            lines += ["", acc["note"]]
        lines += ["", "The pipeline measured the set in its own (model) space; the pixels here are "
                  "clipped to [0, 1] (and rounded to 8 bits in png), which can cost a few tenths of "
                  "a point, about the spread between models."]
    else:
        lines += ["", "Not evaluated yet: run `datm evaluate --from <this folder>`."]
    lines += _preprocessing_lines(card.get("preprocessing")) + _recipe_lines(card.get("recipe"))
    lines += ["", "## Loading", "",
              "- `dataset_card.json` holds everything above as data (`preprocessing`, `recipe`).",
              "- png: `torchvision.datasets.ImageFolder(folder)` (one subfolder per class) or "
              "`datasets.load_dataset(\"imagefolder\", data_dir=folder)`, whose columns "
              "`label_probs` / `label_logits` are the soft labels (from `metadata.jsonl`)."]
    lines += ["", "## Distillation settings", "", "```json",
              json.dumps(card.get("settings", {}), indent=2), "```", "", "## Train on it", ""]
    if snippet:
        lines += ["Without datm: `reproduce.py` (below) needs only torch, numpy and safetensors "
                  "(Pillow for png, torchvision for `--torchvision`) and follows the recipe "
                  "above, seeds included:", "", "```bash",
                  "python reproduce.py --test test.npz   # uint8 `images` [N, C, H, W] and `labels`",
                  "python reproduce.py --torchvision FashionMNIST --root data --download", "```", "",
                  "```python", snippet.rstrip("\n"), "```", "", "With datm:", ""]
    lines += ["```bash", "datm evaluate --from <this folder>   # the pipeline's own protocol", "```",
              ""]
    return "\n".join(lines)


def _preprocessing_lines(pre: dict | None) -> list[str]:
    if not pre:
        return []
    lines = ["", "## From these pixels to the network's input", ""]
    if pre["zca"]:
        lines += [f"ZCA whitening of the raw pixels, with `mean` and `matrix` from `{pre['file']}` "
                  f"(kornia's ZCAWhitening, eps {pre.get('eps')}), and NO per-channel "
                  "normalization:", "", "```python",
                  "x_white = ((x.flatten(1) - mean) @ matrix).view_as(x)   # x: [N, C, H, W] in [0, 1]",
                  "```"]
    else:
        lines += [f"Per-channel normalization: `(x - mean) / std` with mean {pre['mean']} and "
                  f"std {pre['std']} (x in [0, 1])."]
    return lines + ["", "Apply the same to the real test images."]


def _recipe_lines(recipe: dict | None) -> list[str]:
    if not recipe:
        return []
    net, aug = recipe["network"], recipe["augmentation"]
    params = ", ".join(f"{k} {aug[k]}" for k in aug["parameters"])
    return ["", "## Training recipe (the pipeline's evaluation)", "",
            f"- network: {recipe['arch']}: {net['description']}",
            f"- optimizer: SGD, lr {recipe['lr']:.6g} ({recipe['lr_rule']}), momentum "
            f"{recipe['momentum']}, weight decay {recipe['weight_decay']}",
            f"- {recipe['epochs']} epochs, {recipe['schedule']['rule']}; batch {recipe['batch']} "
            "(the whole set if smaller), reshuffled every epoch",
            f"- augmentation: {aug['name']}, " + (
                f"families {'/'.join(aug['families'])}, one family per batch with per-image "
                f"magnitudes; {params}" if aug["enabled"] and aug["families"] else "off"),
            f"- loss: {recipe['loss']}",
            f"- {recipe['models']} networks, seeds {recipe['model_seeds']}: report mean ± std "
            "of their test accuracies"]
