"""`datm export` and `datm evaluate --from`: a distilled set out to common formats, and an
exported set (ours or someone's) back through the pipeline's evaluation protocol."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import data, evaluate
from ..config import Params, Paths
from ..events import Callback
from ..export import ExportError, export, read
from .evaluate import check_finite
from .project import distilled_ipcs, distilled_pixels, load_distilled, model_data, quiet


def export_ipc(paths: Paths, ipc: int, fmt: str, out: Path, force: bool = False,
               git_commit: str = "unknown") -> Path:
    if not paths.distilled(ipc).is_file():
        done = ", ".join(map(str, distilled_ipcs(paths))) or "none yet"
        raise ExportError(f"IPC {ipc} was not distilled (distilled IPCs: {done})")
    tensors, meta = load_distilled(paths.distilled(ipc))
    pixels = distilled_pixels(paths, tensors, meta)
    card = {"dataset": meta.get("dataset"), "ipc": ipc, "settings": meta.get("settings"),
            "spec": meta.get("spec"), "git_commit": git_commit, "zca": meta.get("zca"),
            "mean": meta["mean"], "std": meta["std"], "iterations": meta.get("iteration"),
            "accuracy": _accuracy_for_card(paths, ipc)}
    return export(pixels, tensors["labels"], float(tensors["lr"][0]), meta["classes"], out, fmt,
                  card, force)


def _accuracy_for_card(paths: Paths, ipc: int) -> dict:
    if not paths.evaluation(ipc).is_file():
        return {}
    ev = json.loads(paths.evaluation(ipc).read_text())
    models = sum(r["set"] == "distilled" for r in ev["runs"])
    fmt = lambda m, s: f"{100 * m:.2f} ± {100 * s:.2f} % ({models} models)"  # noqa: E731
    acc = {"distilled": fmt(ev["distilled"], ev["distilled_std"]),
           "random_real": fmt(ev["random_real"], ev["random_real_std"])}
    if ev.get("full_dataset") is not None:
        acc["full_dataset"] = f"{100 * ev['full_dataset']:.2f} %"
    return acc


def evaluate_export(params: Params, paths: Paths, folder: Path,
                    callback: Callback = quiet) -> dict:
    """Evaluate an exported set (ours or someone's) with the pipeline's protocol."""
    pixels, logits, lr, card = read(folder)
    check_finite(folder, images=pixels, labels=logits, lr=torch.tensor(lr))
    md = model_data(paths, params.torch_device())
    if list(pixels.shape[1:]) != list(md.x.shape[1:]) or logits.shape[1] != len(md.classes):
        raise ExportError(f"{folder} holds {list(pixels.shape[1:])} images of "
                          f"{logits.shape[1]} classes; the pipeline's data is "
                          f"{list(md.x.shape[1:])} with {len(md.classes)} classes")
    # Back to model space by the very function that made the pipeline's data.
    x = data.to_model_space(pixels * 255, md.mean, md.std, md.zca).to(md.x.device)
    cfg = params.evaluate
    lr = evaluate.distilled_lr(cfg, lr)
    spec = evaluate.arch_spec(md.spec(params), cfg.arch)
    result = evaluate.evaluate_set(spec, x, logits.to(x.device), lr, cfg.epochs, cfg.models, cfg,
                                   params.augment, md.x_test, md.y_test, cfg.seed, callback)
    return {"folder": str(folder), "ipc": card.get("ipc"), "models": cfg.models,
            "epochs": cfg.epochs, "lr": lr, "acc_mean": result["mean"],
            "acc_std": result["std"], "accs": result["accs"]}
