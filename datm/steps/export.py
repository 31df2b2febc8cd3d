"""`datm export` and `datm evaluate --from`: a distilled set out to common formats, and an
exported set (ours or someone's) back through the pipeline's evaluation protocol."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .. import artifacts, data, evaluate
from ..config import EvalConfig, Params, Paths
from ..events import Callback
from ..export import ZCA_FILE, ExportError, export, read
from ..networks import first_conv_padding
from ..zca import ZCA
from .evaluate import check_finite
from .project import (
    distilled_ipcs,
    distilled_pixels,
    load_distilled,
    model_data,
    net_spec,
    quiet,
)


def export_ipc(params: Params, paths: Paths, ipc: int, fmt: str, out: Path, force: bool = False,
               git_commit: str = "unknown") -> Path:
    """Write distilled IPC `ipc` to `out` with everything needed to train on it elsewhere: the
    ZCA it was whitened with, and a card whose `preprocessing` and `recipe` are the pipeline's
    evaluation as `params` sets it."""
    if not paths.distilled(ipc).is_file():
        done = ", ".join(map(str, distilled_ipcs(paths))) or "none yet"
        raise ExportError(f"IPC {ipc} was not distilled (distilled IPCs: {done})")
    tensors, meta = load_distilled(paths.distilled(ipc))
    pixels = distilled_pixels(paths, tensors, meta)
    zca = ZCA.load(paths.zca) if meta.get("zca") else ZCA()
    learned = float(tensors["lr"][0])
    recipe = _recipe(params, ipc, pixels.shape[1:], len(meta["classes"]), learned)
    card = {"dataset": meta.get("dataset") or params.data.name, "ipc": ipc,
            "settings": meta.get("settings"), "spec": meta.get("spec"), "git_commit": git_commit,
            "zca": meta.get("zca"), "mean": meta["mean"], "std": meta["std"],
            "iterations": meta.get("iteration"), "preprocessing": _preprocessing(paths, meta),
            "recipe": recipe, "accuracy": _accuracy_for_card(paths, ipc, recipe)}
    return export(pixels, tensors["labels"], learned, meta["classes"], out, fmt, card, force, zca)


def _preprocessing(paths: Paths, meta: dict) -> dict:
    """How the exported [0, 1] pixels become the network's input (data.to_model_space)."""
    if meta.get("zca"):
        return {"zca": True, "file": ZCA_FILE, "eps": artifacts.read_meta(paths.zca, "zca").get("eps"),
                "formula": "x_white = ((x.flatten(1) - mean) @ matrix).view_as(x), x in [0, 1]; "
                           "no per-channel normalization"}
    return {"zca": False, "mean": meta["mean"], "std": meta["std"],
            "formula": "(x - mean[c]) / std[c] per channel, x in [0, 1]"}


def _recipe(params: Params, ipc: int, shape: torch.Size, num_classes: int,
            learned: float) -> dict:
    """The evaluation protocol of evaluate@IPC (datm/evaluate.py's train_and_test) as data."""
    cfg, aug = _recipe_of(params, ipc), params.augment
    spec = evaluate.arch_spec(net_spec(params, tuple(shape), num_classes), cfg.arch)
    net = {**spec.to_dict(), "first_conv_padding": first_conv_padding(spec)}
    if spec.model == "convnet":
        norm = {"instance": "instance norm (GroupNorm with one group per channel, affine)",
                "batch": "batch norm", "none": "no norm"}[spec.norm]
        net["description"] = (f"{spec.depth} x [conv3x3 ({spec.width} channels, padding 1; the "
                              f"first padded {net['first_conv_padding']}) -> {norm} -> ReLU -> "
                              "avg-pool 2x2] -> linear")
    else:
        net["description"] = (f"torchvision ResNet-18 with a 3x3 stride-1 stem, no max-pool, "
                              f"{spec.norm} norm")
    enabled = aug.enabled and cfg.augment
    parameters = ("scale", "rotate", "crop", "cutout", "brightness", "saturation", "contrast")
    return {
        "arch": cfg.arch, "network": net, "optimizer": "SGD",
        "lr": evaluate.distilled_lr(cfg, learned), "learned_lr": learned,
        "lr_rule": f"evaluate.lr {cfg.lr}" if cfg.lr else f"learned lr x lr_scale {cfg.lr_scale}",
        "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "epochs": cfg.epochs,
        "schedule": {"milestones": [cfg.epochs // 2], "gamma": 0.1,
                     "rule": "lr x0.1 after epochs // 2 epochs"},
        "batch": cfg.batch,
        "augmentation": {"name": "DSA (differentiable Siamese augmentation)", "enabled": enabled,
                         "strategy": aug.strategy, "families": list(aug.families),
                         "parameters": list(parameters),
                         **{k: v for k, v in asdict(aug).items() if k in parameters}},
        "loss": "soft cross-entropy against softmax(label_logits)",
        # evaluate.evaluate_set: network k is seeded s = seed * 1009 + k; its initial weights
        # come from torch.manual_seed(2 s), its batch order and augmentation from a generator
        # seeded 2 s + 1 (evaluate.stream_seeds).
        "models": cfg.models, "seed": cfg.seed,
        "model_seeds": [cfg.seed * 1009 + k for k in range(cfg.models)],
    }


def _accuracy_for_card(paths: Paths, ipc: int, recipe: dict) -> dict:
    if not paths.evaluation(ipc).is_file():
        return {}
    ev = json.loads(paths.evaluation(ipc).read_text())
    runs = [r for r in ev["runs"] if r["set"] == "distilled"]
    fmt = lambda m, s: f"{100 * m:.2f} ± {100 * s:.2f} % ({len(runs)} models)"  # noqa: E731
    acc = {"distilled": fmt(ev["distilled"], ev["distilled_std"]),
           "random_real": fmt(ev["random_real"], ev["random_real_std"])}
    if ev.get("full_dataset") is not None:
        acc["full_dataset"] = f"{100 * ev['full_dataset']:.2f} %"
    measured = {k: runs[0].get(k) for k in ("lr", "epochs", "batch", "arch")} if runs else {}
    now = {k: recipe[k] for k in measured}
    if measured != now:  # params changed since the evaluation: say so rather than mislead
        acc["note"] = (f"measured with {measured}; params.yaml now gives {now}: run "
                       f"`datm evaluate --ipc {ipc}` for numbers under this recipe")
    return acc


def _recipe_of(params: Params, ipc: int | None) -> EvalConfig:
    """The evaluation recipe of an IPC the profile distills (evaluate.ipc.<ipc> overlaid);
    the `evaluate` section for a set of another size."""
    return params.evaluation(ipc) if ipc in params.ipcs else params.evaluate


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
    cfg = _recipe_of(params, card.get("ipc"))
    lr = evaluate.distilled_lr(cfg, lr)
    spec = evaluate.arch_spec(md.spec(params), cfg.arch)
    result = evaluate.evaluate_set(spec, x, logits.to(x.device), lr, cfg.epochs, cfg.models, cfg,
                                   params.augment, md.x_test, md.y_test, cfg.seed, callback)
    return {"folder": str(folder), "ipc": card.get("ipc"), "models": cfg.models,
            "epochs": cfg.epochs, "lr": lr, "acc_mean": result["mean"],
            "acc_std": result["std"], "accs": result["accs"]}
