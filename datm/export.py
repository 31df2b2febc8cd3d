"""Export a distilled set, and read an export back.

Layout of an export directory (card `layout` 2):
  images.{safetensors,pt,npz}  `inputs`: the network's input tensors [N, C, H, W], exactly the
                      set datm trained and measured (lossless); `images`: the same set as float
                      pixels on the [0, 1] scale, de-whitened and NOT clipped (learned images
                      leave [0, 1]; the values outside are part of the set); `label_logits`,
                      `label_probs`, `class_ids`, `lr`
  or, for png: <000_class>/<index>.png (torchvision ImageFolder layout), 8-bit, each image
               stretched over its own range: pixels = lo + (hi - lo) * png / 255 with [lo, hi]
               its `pixel_range`; labels.safetensors (label logits and probabilities, ranges)
               and metadata.jsonl (one row per image: file_name, label probabilities,
               pixel_range), which makes the folder a Hugging Face `imagefolder` dataset with
               the labels as columns (soft or one-hot: the card's `label_logits` says which)
  zca.safetensors     the pipeline's ZCA (mean, matrix, inverse), when it whitened
  dataset_card.json   where it came from, its settings, its accuracy (of exactly these tensors,
                      or "not measured"), what a network trained on it needs: `preprocessing`
                      (pixels -> network input) and `recipe`; `files`, the sha256 of every
                      other file, by which --force knows a folder datm wrote
  README.md           the card for people
  reproduce.py        a plain-PyTorch script (no datm) that trains on the set by the recipe:
                      datm/export_snippet.py, copied
Layout 1 (earlier exports: pixels clipped to [0, 1], no `inputs`) is still read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import artifacts, locks
from .data import DataError, open_image
from .errors import UserError
from .handed import HandedSet, one_line
from .zca import ZCA

FORMATS = ("safetensors", "pt", "npz", "png")
LOSSLESS = ("safetensors", "pt", "npz")
LAYOUT = 2
LABELS = "labels.safetensors"
CARD = "dataset_card.json"
METADATA = "metadata.jsonl"  # Hugging Face imagefolder's per-image columns (png)
ZCA_FILE = "zca.safetensors"
# Not "train.py": Hugging Face's imagefolder takes a file named train* (or test*, val*, ...) for
# a split of its own, and the png export would then load as a "train" split without images.
SCRIPT = "reproduce.py"
# One copy of the training snippet: exported as SCRIPT and quoted in the export's README.
SNIPPET = Path(__file__).with_name("export_snippet.py")
NOT_MEASURED = "not measured"


class ExportError(UserError):
    """A refused or impossible export; the message is for a user."""


def _class_dir(index: int, name: str) -> str:
    # Zero-padded index first so that ImageFolder's sorted order is the class order.
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-') or 'class'}"


def export(inputs: torch.Tensor, pixels: torch.Tensor, logits: torch.Tensor, lr: float,
           classes: list[str], out: str | Path, fmt: str, card: dict, force: bool = False,
           zca: ZCA | None = None) -> Path:
    """Write the set to `out` (refusing to overwrite unless `force`), all or nothing.

    `inputs` are the network-input tensors the pipeline trained and measured, `pixels` the
    same set de-whitened (unclipped). The written folder is read back before it takes `out`'s
    place: a lossless format must give `inputs` back bit for bit, png within its 8 bits.
    `zca`, when enabled, is written beside the images (what `card["preprocessing"]` points at);
    a card with a `recipe` also gets SCRIPT, the plain-PyTorch way to train on the set.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    bad = [name for name, t in (("images", inputs), ("pixels", pixels), ("labels", logits),
                                ("lr", torch.tensor(float(lr)))) if not bool(torch.isfinite(t).all())]
    if bad:
        raise ExportError(f"the set's {' and '.join(bad)} hold NaN or inf values (a diverged "
                          "distillation?): refusing to export it; distill again with a lower "
                          "lr_img / lr_lr")
    out = Path(out)
    if out.is_symlink():
        # --force would swap the link itself aside and write the new export in its place, and
        # the folder it names would stay as it was: refuse before anything is written
        raise ExportError(f"{out} is a symbolic link (to {os.readlink(out)}): pass the folder "
                          "itself as --out")
    try:
        return _export(inputs.float().cpu(), pixels.float().cpu(), logits.float().cpu(), lr,
                       classes, out, fmt, card, force, zca or ZCA())
    except OSError as exc:  # an unwritable or full destination: a user's to fix, not a bug
        raise ExportError(f"cannot write the export to {out}: {exc.strerror or exc}") from None


def _export(inputs: torch.Tensor, pixels: torch.Tensor, logits: torch.Tensor, lr: float,
            classes: list[str], out: Path, fmt: str, card: dict, force: bool, zca: ZCA) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _recover(out)
        artifacts.remove_stale_temps(out)  # a killed export's half-written folders
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not force:
                raise ExportError(f"{out} exists and is not empty: pass --force to overwrite it")
            _check_replaceable(out)
        # Named like atomic_path's temp files, so that remove_stale_temps finds it after a kill.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            stored = _write(tmp, inputs, pixels, logits, lr, classes, fmt)
            # what `read` gives back, as a digest: files edited after the export are refused
            stored["files_digest"] = files_digest(_read_tensors(tmp, fmt, LAYOUT))
            if zca.enabled:
                zca.save(tmp / ZCA_FILE)
            outside = float(((pixels < 0) | (pixels > 1)).float().mean())
            full_card = {**card, "format": fmt, "layout": LAYOUT, "classes": classes,
                         "num_images": pixels.shape[0], "shape": list(pixels.shape[1:]), "lr": lr,
                         "lossless": fmt in LOSSLESS,
                         "contents": _contents(fmt, label_kind(card.get("settings"))),
                         "pixels": {"min": float(pixels.min()), "max": float(pixels.max()),
                                    "outside_0_1": outside}, **stored}
            _write_card(tmp, full_card, fresh=True)
            _check_reads_back(tmp, inputs, pixels, fmt, full_card)
            os.chmod(tmp, 0o755)
            _swap(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return out


def _locked(out: Path):
    """The lock of export folder `out`: one export (or one --record) at a time."""
    return locks.hold(out.parent / f".{out.name}.lock", f"{out} is being exported")


def files_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The identity of an export's files as read back (png: the decoded images), 16 hex
    digits; its card holds it, so that an edited file is never measured under the card."""
    return artifacts.tensor_digest(tensors)[:16]


def label_kind(settings: dict | None) -> str:
    """What an export's label logits are, from the distillation's settings (old cards, which
    have none, held learned soft labels: the only kind then). Labels start one-hot with
    `labels: hard` or `init: noise`, else as the experts' logits; `learn_labels` learns either."""
    settings = settings or {}
    one_hot = settings.get("labels") == "hard" or settings.get("init") == "noise"
    if not settings.get("learn_labels", True):
        return ("hard labels (one-hot logits: their softmax puts 1 - 1e-4 on the class)"
                if one_hot else "the experts' soft labels (logits), not learned")
    return ("learned soft labels (logits), started one-hot" if one_hot
            else "learned soft labels (logits)")


def _contents(fmt: str, labels: str) -> dict:
    if fmt in LOSSLESS:
        return {"inputs": "the network's input tensors [N, C, H, W], exactly the set datm "
                          "trained and measured: train on these",
                "images": "the same set as float pixels on the [0, 1] scale, de-whitened and "
                          "not clipped: values outside [0, 1] are part of the set (an image "
                          "viewer clips them); `preprocessing` turns them into `inputs` up to "
                          "float rounding",
                "label_logits": f"{labels}; label_probs = their softmax",
                "class_ids": "the class each image stands for", "lr": "the learned lr"}
    return {"png": "8-bit images, each stretched over its own pixel range: pixels = lo + "
                   "(hi - lo) * png / 255 with [lo, hi] the image's `pixel_range` "
                   f"({METADATA}, {LABELS}); then `preprocessing`. Read as plain images "
                   "(no undo) they are a contrast-stretched view, not the set",
            "label_logits": f"{labels} per image, in {METADATA} and {LABELS}"}


def _write_card(folder: Path, card: dict, fresh: bool = False) -> None:
    """dataset_card.json, README.md and (with a recipe) reproduce.py, each written atomically,
    the card last: its `files` are the digests of the folder's other files (all of them for a
    `fresh` export; else the rewritten README's entry, where the card lists files at all)."""
    snippet = SNIPPET.read_text() if "recipe" in card else None
    if snippet and not (folder / SCRIPT).is_file():
        (folder / SCRIPT).write_text(snippet)
    with artifacts.atomic_path(folder / "README.md") as tmp:
        tmp.write_text(card_markdown(card, snippet))
    if fresh:
        card = {**card, "files": files_listing(folder)}
    elif _listing(card) is not None:
        card = {**card, "files": {**card["files"], **files_listing(folder, ["README.md"])}}
    with artifacts.atomic_path(folder / CARD) as tmp:
        tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def files_listing(folder: Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of the export's files (`names`, or every file but the card), by relative path."""
    if names is None:
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                       if p.is_file() and p != folder / CARD)
    return {name: _sha256(folder / name) for name in names}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(card: object) -> dict[str, str] | None:
    """A card's `files` when it is a listing datm writes (name -> sha256), else None."""
    files = card.get("files") if isinstance(card, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return None
    return files


def _check_replaceable(out: Path) -> None:
    """--force replaces a folder only when datm wrote it: its card lists the digest of every
    file, each still matches, and nothing else is there (think --out . or a folder a user put
    their own files in); else an ExportError that says what differs, with nothing touched."""
    for name in (CARD, "README.md"):  # a killed `--record`'s temps (we hold the folder's lock)
        artifacts.remove_stale_temps(out / name)
    if not (out / CARD).is_file():
        raise ExportError(f"{out} is not a datm export (no {CARD}): refusing to replace it")
    try:
        listed = _listing(json.loads((out / CARD).read_text()))
    except (OSError, UnicodeDecodeError, ValueError):
        listed = None
    if listed is None:
        raise ExportError(f"{out}'s {CARD} lists no digests of its files (an earlier datm's "
                          "export, or not datm's): --force replaces only a folder datm wrote; "
                          "remove or move it by hand")
    differ = _differences(out, listed)
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise ExportError(f"{out} is not the export its {CARD} lists: {differ[0]}{more}; "
                          "--force replaces only what datm wrote: move your files out of it, "
                          "or remove the folder by hand")


def _differences(out: Path, listed: dict[str, str]) -> list[str]:
    """What in `out` is not the export `listed` describes: files changed, missing, or not
    datm's (links, other files, other folders)."""
    folders = {parent.as_posix() for name in listed for parent in Path(name).parents}
    found, differ = set(), []
    for base, dirs, files in os.walk(out):
        for name in sorted(dirs) + sorted(files):
            path = Path(base, name)
            rel = path.relative_to(out).as_posix()
            if path.is_symlink():
                differ.append(f"{rel} is a symbolic link")
            elif name in dirs:
                if rel not in folders:
                    differ.append(f"{rel}/ is not one of its folders")
            elif rel == CARD:
                continue
            elif rel not in listed:
                differ.append(f"{rel} is not one of its files")
            else:
                found.add(rel)
                if not path.is_file() or _sha256(path) != listed[rel]:
                    differ.append(f"{rel} changed since the export")
    differ += [f"{name} is missing" for name in sorted(set(listed) - found)]
    return differ


def _check_reads_back(folder: Path, inputs: torch.Tensor, pixels: torch.Tensor, fmt: str,
                      card: dict) -> None:
    """The folder, read as `datm evaluate --from` and reproduce.py read it, holds the set."""
    back = read(folder)
    if fmt in LOSSLESS:
        if back.inputs is None or not torch.equal(back.inputs, inputs):
            raise ExportError(f"the {fmt} file does not read back as the set it was written "
                              "from: export refused")
        return
    error = float((back.pixels - pixels).abs().max())
    if error > card["png"]["max_error"] + 1e-5:
        raise ExportError(f"the png files read back {error:.3g} from the set, more than 8 bits "
                          "of each image's range allow: export refused")


def record_accuracy(folder: str | Path, accuracy: str, how: str, digest: str | None,
                    recipe: dict | None) -> None:
    """Write the accuracy measured on files of digest `digest` under `recipe` (the card's
    shape of it) into the folder's card and README (`datm evaluate --from DIR --record`, which
    `datm export` runs for png), under the folder's lock: only when the card still describes
    those files (another export may have replaced them meanwhile) and states that recipe."""
    folder = Path(folder)
    with _locked(folder):
        card = read(folder).card  # the files as they are now, checked against their card
        if "files_digest" not in card:
            raise ExportError(f"{folder}'s card has no files digest (an earlier datm's "
                              "export): export the set again to record its number")
        if digest != card["files_digest"]:
            raise ExportError(f"{folder} changed while it was measured (another export "
                              f"replaced it?): {accuracy} is not its number and was not recorded")
        if recipe is None or card.get("recipe") is None:
            raise ExportError(f"{folder}: the measurement has no recipe to match the card's "
                              "(--lr, --zca, or an export without one): not recorded")
        differ = recipe_differences(recipe, stated_recipe(card))
        if differ:
            raise ExportError(f"{folder}: measured under another recipe than its card's "
                              f"({differ}): {accuracy} was not recorded")
        card.setdefault("accuracy", {})
        card["accuracy"].update(distilled=accuracy, measured=how)
        card["accuracy"].pop("note", None)
        _write_card(folder, card)


def stated_recipe(card: dict) -> dict:
    """The recipe a card states; a card from before `compile` existed states an eager one."""
    return {"compile": False, **card["recipe"]}


def recipe_differences(measured: dict, stated: dict) -> str:
    """How the recipe a number was measured under differs from the one a card states, setting
    by setting ("seed: measured 0, the card 7; ..."); "" if it does not."""
    a, b = _flat(json.loads(json.dumps(measured))), _flat(json.loads(json.dumps(stated)))
    return "; ".join(f"{key}: measured {a.get(key, 'unset')}, the card {b.get(key, 'unset')}"
                     for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key))


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
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


def _write(folder: Path, inputs: torch.Tensor, pixels: torch.Tensor, logits: torch.Tensor,
           lr: float, classes: list[str], fmt: str) -> dict:
    """The set's files in `folder`; what the card must add about how they store it."""
    probs = torch.softmax(logits, dim=1)
    ipc = pixels.shape[0] // len(classes)
    class_ids = torch.arange(len(classes)).repeat_interleave(ipc)
    payload = {"inputs": inputs, "images": pixels, "label_logits": logits, "label_probs": probs,
               "class_ids": class_ids, "lr": torch.tensor([lr])}
    if fmt == "safetensors":
        artifacts.save(folder / "images.safetensors", payload, "export")
    elif fmt == "pt":
        torch.save(payload, folder / "images.pt")
    elif fmt == "npz":
        np.savez(folder / "images.npz", **{k: v.numpy() for k, v in payload.items()})
    else:
        return _write_png(folder, pixels, payload, classes)
    return {}


def _write_png(folder: Path, pixels: torch.Tensor, payload: dict, classes: list[str]) -> dict:
    """8-bit PNGs, each image over its own range (no clipping: a distilled image spans e.g.
    -4 .. 5.5), and the ranges beside them."""
    from PIL import Image

    lo, hi = png_ranges(pixels)
    codes = encode_png(pixels, lo, hi)
    files, rows = [], []
    ids = payload["class_ids"].tolist()
    for i, (code, c) in enumerate(zip(codes, ids)):
        sub = folder / _class_dir(c, classes[c])
        sub.mkdir(exist_ok=True)
        arr = code.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(sub / f"{i:06d}.png")
        files.append(f"{sub.name}/{i:06d}.png")
        # No "label" column: Hugging Face would take it for the class; the folder says that.
        rows.append({"file_name": files[-1], "class_id": c, "class_name": classes[c],
                     "label_probs": payload["label_probs"][i].tolist(),
                     "label_logits": payload["label_logits"][i].tolist(),
                     "pixel_range": [float(lo[i]), float(hi[i])]})
    labels = {k: v for k, v in payload.items() if k not in ("inputs", "images")}
    labels["pixel_range"] = torch.stack([lo, hi], dim=1)
    artifacts.save(folder / LABELS, labels, "export-labels", {"files": files})
    (folder / METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"png": {"encoding": "per-image range, 8 bits",
                    "max_error": float(((hi - lo) / 510).max())}}


def png_ranges(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] of each image (float32); a flat image gets hi = lo + 1 (any scale decodes it)."""
    lo = pixels.flatten(1).amin(1).float()
    hi = pixels.flatten(1).amax(1).float()
    return lo, torch.where(hi > lo, hi, lo + 1)


def encode_png(pixels: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Pixels -> uint8 codes over each image's [lo, hi]; `decode_png` undoes it to 1/510 of
    the range."""
    view = (-1, 1, 1, 1)
    scaled = (pixels.float() - lo.view(view)) / (hi - lo).view(view)
    return (scaled * 255).round().clamp(0, 255).to(torch.uint8)


def decode_png(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, C, H, W] -> pixels; reproduce.py computes the same, op for op."""
    view = (-1, 1, 1, 1)
    return codes.float() / 255 * (hi - lo).view(view) + lo.view(view)


def read(folder: str | Path) -> HandedSet:
    """The set an export directory holds (network inputs for a lossless layout-2 export,
    pixels otherwise), with its card. A missing, truncated or unreadable file is an
    ExportError that names it."""
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
    layout = card.get("layout", 1)
    t = _read_tensors(folder, fmt, layout)
    missing = [k for k in ("images", "label_logits", "lr") if k not in t]
    if missing:
        raise ExportError(f"{folder} lacks {', '.join(missing)} in its {fmt} file")
    logits = t["label_logits"].float()
    class_ids = t["class_ids"].long() if "class_ids" in t else logits.argmax(1)
    inputs = t["inputs"].float() if "inputs" in t else None
    _check_against_card(folder, card, t["images"], inputs, logits, class_ids, t["lr"])
    if "files_digest" in card and files_digest(t) != card["files_digest"]:
        raise ExportError(f"{folder} does not match its {CARD}: its files were changed after "
                          f"the export (digest {files_digest(t)}, the card says "
                          f"{card['files_digest']}); export the set again")
    if inputs is not None:
        note = f"datm export ({fmt}): `inputs`, exactly the network inputs datm measured"
    elif fmt == "png" and layout >= 2:
        note = "datm export (png): 8-bit images, each image's range undone (pixel_range)"
    else:
        note = (f"datm export ({fmt}, layout 1): pixels clipped to [0, 1] when exported, so "
                "not quite the distilled set (export it again for the lossless layout)")
    return HandedSet("datm export", logits, class_ids, inputs=inputs,
                     pixels=t["images"].float(), lr=float(t["lr"].reshape(-1)[0]), card=card,
                     notes=[note])


def _check_against_card(folder: Path, card: dict, images: torch.Tensor,
                        inputs: torch.Tensor | None, logits: torch.Tensor,
                        class_ids: torch.Tensor, lr: torch.Tensor) -> None:
    """The tensors are the set the card describes: a file swapped or edited after the export
    would otherwise be measured under the card's name (and its recorded number)."""
    n, classes = images.shape[0], card.get("classes")
    problems = [
        (card.get("num_images") not in (None, n),
         f"{n} images, the card says {card.get('num_images')}"),
        (card.get("shape") not in (None, list(images.shape[1:])),
         f"images of shape {list(images.shape[1:])}, the card says {card.get('shape')}"),
        (logits.dim() != 2 or logits.shape[0] != n,
         f"label_logits of shape {list(logits.shape)} for {n} images"),
        (isinstance(classes, list) and logits.dim() == 2 and len(classes) != logits.shape[1],
         f"labels over {logits.shape[-1]} classes, the card names {len(classes or [])}"),
        (class_ids.numel() != n or bool(((class_ids < 0) | (class_ids >= logits.shape[-1])).any()),
         "class_ids outside the classes"),
        (inputs is not None and inputs.shape != images.shape,
         f"inputs of shape {list(inputs.shape) if inputs is not None else []} beside images "
         f"{list(images.shape)}"),
        (lr.numel() != 1, "an lr that is not one number"),
        (lr.numel() == 1 and isinstance(card.get("lr"), (int, float))
         and not math.isclose(float(lr.reshape(-1)[0]), card["lr"], rel_tol=1e-6),
         f"lr {float(lr.reshape(-1)[0]) if lr.numel() == 1 else lr.tolist()}, the card says "
         f"{card.get('lr')}"),
    ]
    for bad, what in problems:
        if bad:
            raise ExportError(f"{folder} does not match its {CARD}: {what}")
    named = (("images", images), ("inputs", inputs), ("label_logits", logits), ("lr", lr))
    for name, tensor in named:
        if tensor is not None and not bool(torch.isfinite(tensor.float()).all()):
            raise ExportError(f"{folder}: its {name} hold NaN or infinite values")


def _read_tensors(folder: Path, fmt: str, layout: int) -> dict[str, torch.Tensor]:
    path = folder / (LABELS if fmt == "png" else f"images.{fmt}")
    if not path.is_file():
        raise ExportError(f"{path} is missing: the export is incomplete")
    try:
        if fmt == "safetensors":
            return artifacts.load(path, "export")[0]
        if fmt == "pt":  # weights_only: torch's restricted unpickler, tensors and containers
            return _tensors(path, torch.load(path, weights_only=True))
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:  # arrays only, never a pickled object
                return _tensors(path, {k: torch.from_numpy(z[k]) for k in z.files})
        t, meta = artifacts.load(path, "export-labels")
        codes = torch.stack([_read_png(folder / name) for name in meta["files"]])
        if layout >= 2:
            lo, hi = t["pixel_range"].float().unbind(1)
            t["images"] = decode_png(codes, lo, hi)
        else:
            t["images"] = codes.float() / 255
        return t
    except ExportError:
        raise
    except artifacts.ArtifactError as exc:
        raise ExportError(str(exc)) from None
    except Exception as exc:  # numpy, zipfile and pickle raise many types for a damaged file
        raise ExportError(f"cannot read {path}: {one_line(exc)}") from None


def _tensors(path: Path, value: object) -> dict[str, torch.Tensor]:
    """A file's content as the named tensors an export holds, or an ExportError."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in value.items()):
        raise ExportError(f"{path} must hold named tensors, got {type(value).__name__}")
    return value


def _read_png(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise ExportError(f"{path} is missing: the export is incomplete")
    try:
        with open_image(path) as im:  # refuses an image too large to decode, and bad bytes
            arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    except DataError as exc:
        raise ExportError(str(exc)) from None
    return arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)


def card_markdown(card: dict, snippet: str | None = None) -> str:
    """The export's README.md: what the set is, its numbers, and how to train on it."""
    acc = card.get("accuracy") or {}
    fmt, px = card["format"], card.get("pixels") or {}
    lines = [
        f"# Distilled {card.get('dataset', '?')}: {card.get('ipc', '?')} images per class",
        "",
        f"Made by datm (difficulty-aligned trajectory matching) from `{card.get('dataset')}`, "
        f"git commit `{card.get('git_commit', 'unknown')}`.",
        "",
        f"- images: {card['num_images']} ({card.get('ipc')} per class, {len(card['classes'])} "
        f"classes), shape {card['shape']}, format `{fmt}`",
        f"- labels: {label_kind(card.get('settings'))}, as logits (`label_logits`) and "
        "probabilities (`label_probs`); train with soft cross-entropy against the probabilities",
        f"- learned learning rate: {card['lr']:.6g}",
    ]
    if px:
        lines.append(f"- pixels span {px['min']:.3g} .. {px['max']:.3g} on the [0, 1] scale; "
                     f"{100 * px['outside_0_1']:.1f} % of them lie outside [0, 1]. They are "
                     "learned in the network's input space, where nothing bounds them, and "
                     "are part of the set: clipping them changes it")
    lines += ["", "## What the files hold", ""]
    lines += [f"- `{k}`: {v}" for k, v in (card.get("contents") or {}).items()]
    if fmt == "png" and card.get("png"):
        lines.append(f"- 8 bits over each image's own range: at most "
                     f"{card['png']['max_error']:.3g} from the distilled pixels")
    lines += ["", "## Measured accuracy (ConvNet, test split of the real dataset)"]
    if acc:
        lines += ["", "| set | accuracy |", "|---|---|"]
        labels = {"distilled": "this set (exactly these files)", "random_real":
                  "random real images, same number, same recipe",
                  "full_dataset": "the full training set (the experts)"}
        for key in ("distilled", "random_real", "full_dataset"):
            if acc.get(key):
                lines.append(f"| {labels[key]} | {acc[key]} |")
        for key in ("measured", "note"):
            if acc.get(key):
                lines += ["", acc[key]]
    else:
        lines += ["", "Not evaluated yet: run `datm evaluate --from <this folder>`."]
    lines += _preprocessing_lines(card.get("preprocessing")) + _recipe_lines(card.get("recipe"))
    lines += ["", "## Loading", "",
              "- `dataset_card.json` holds everything above as data (`contents`, "
              "`preprocessing`, `recipe`)."]
    if fmt == "png":
        lines.append("- `torchvision.datasets.ImageFolder(folder)` (one subfolder per class) or "
                     "`datasets.load_dataset(\"imagefolder\", data_dir=folder)`, whose columns "
                     "`label_probs` / `label_logits` are the labels (above) and `pixel_range` each "
                     f"image's [lo, hi] (from `{METADATA}`); decode an image `png` (uint8) as "
                     "`lo + (hi - lo) * png / 255` before `preprocessing`.")
    else:
        lines.append(f"- `images.{fmt}`: train on `inputs`; `images` are the pixels.")
    lines += ["", "## Distillation settings", "", "```json",
              json.dumps(card.get("settings", {}), indent=2), "```", ""]
    if card.get("trajectories"):
        lines += ["## Trajectories matched", "",
                  "The experts, how often their parameters were recorded, the window (in "
                  "snapshots) and the expert SGD steps one student step covers:", "", "```json",
                  json.dumps(card["trajectories"], indent=2), "```", ""]
    lines += ["## Train on it", ""]
    if snippet:
        lines += ["Without datm: `reproduce.py` (below) needs only torch, numpy and safetensors "
                  "(Pillow for png, torchvision for `--torchvision`) and follows the recipe "
                  "above, seeds included (`--threads` as the recipe's `threads` for the "
                  "pipeline's rounding):", "", "```bash",
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
                  "x_white = ((x.flatten(1) - mean) @ matrix).view_as(x)   # x: [N, C, H, W] pixels",
                  "```"]
    else:
        lines += [f"Per-channel normalization: `(x - mean) / std` with mean {pre['mean']} and "
                  f"std {pre['std']} (x: pixels on the [0, 1] scale)."]
    return lines + ["", "Apply the same to the real test images (uint8 / 255). A lossless "
                    "export's `inputs` are its pixels after this step, exactly as datm "
                    "computed them."]


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
            "of their test accuracies"] + (
        ["- the network's training steps through torch.compile (the test pass eager): the "
         "same training with fused kernels, whose float rounding the number has (reproduce.py "
         "compiles too; --eager trains without it, to a number near this one)"]
        if recipe.get("compile") else []) + (
        [f"- threads per network: {recipe['threads']} (on a CPU the thread count changes "
         "float rounding, which training amplifies)"] if recipe.get("threads") else [])
