"""`datm export` and `datm evaluate --from`: a distilled set out to common formats, and a set
handed over (a datm export, a DATM / MTT `.pt` set, an image folder) back through the
pipeline's evaluation protocol."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import artifacts, data, evaluate, sets
from ..config import EvalConfig, Params, Paths
from ..distributed import SINGLE, Group
from ..events import Callback
from ..export import (
    LOSSLESS,
    NOT_MEASURED,
    ZCA_FILE,
    ExportError,
    export,
    label_kind,
    recipe_differences,
    stated_recipe,
)
from ..networks import first_conv_padding
from ..zca import ZCA
from .evaluate import measured_recipe
from .project import (
    device_of,
    distilled_ipcs,
    distilled_pixels,
    load_distilled,
    model_data,
    net_spec,
    quiet,
    set_digest,
)


def export_ipc(params: Params, paths: Paths, ipc: int, fmt: str, out: Path, force: bool = False,
               git_commit: str = "unknown", threads: int | None = None) -> Path:
    """Write distilled IPC `ipc` to `out` with everything needed to train on it elsewhere: the
    ZCA it was whitened with, and a card whose `preprocessing` and `recipe` are the pipeline's
    evaluation as `params` sets it, and whose accuracy is of exactly the exported tensors
    (evaluate@IPC's, when it measured this very set under this recipe and the format is
    lossless; otherwise "not measured", until `datm evaluate --from` measures it). `threads`:
    the threads per process `datm evaluate` runs with on a CPU (default: this process's)."""
    if not paths.distilled(ipc).is_file():
        done = ", ".join(map(str, distilled_ipcs(paths))) or "none yet"
        raise ExportError(f"IPC {ipc} was not distilled (distilled IPCs: {done})")
    device = params.torch_device().type
    threads = (threads or torch.get_num_threads()) if device == "cpu" else None
    tensors, meta = load_distilled(paths.distilled(ipc))
    pixels = distilled_pixels(paths, tensors, meta, clip=False)
    zca = ZCA.load(paths.zca) if meta.get("zca") else ZCA()
    learned = float(tensors["lr"][0])
    recipe = _recipe(params, ipc, pixels.shape[1:], len(meta["classes"]), learned, threads)
    # the card's recipe as evaluate@IPC records the one it measured under
    stated = measured_recipe(params, _recipe_of(params, ipc), recipe["lr"], device, threads)
    card = {"dataset": meta.get("dataset") or params.data.name, "ipc": ipc,
            "settings": meta.get("settings"), "trajectories": meta.get("trajectories"),
            "spec": meta.get("spec"), "git_commit": git_commit,
            "zca": meta.get("zca"), "mean": meta["mean"], "std": meta["std"],
            "iterations": meta.get("iteration"), "preprocessing": _preprocessing(paths, meta),
            "recipe": recipe, "set_digest": set_digest(tensors),
            "accuracy": _accuracy_for_card(paths, ipc, stated, set_digest(tensors), fmt)}
    return export(tensors["images"], pixels, tensors["labels"], learned, meta["classes"], out,
                  fmt, card, force, zca)


def _preprocessing(paths: Paths, meta: dict) -> dict:
    """How an export's pixels become the network's input (data.pixels_to_model_space)."""
    if meta.get("zca"):
        return {"zca": True, "file": ZCA_FILE, "eps": artifacts.read_meta(paths.zca, "zca").get("eps"),
                "formula": "x_white = ((x.flatten(1) - mean) @ matrix).view_as(x), x pixels on "
                           "the [0, 1] scale; no per-channel normalization"}
    return {"zca": False, "mean": meta["mean"], "std": meta["std"],
            "formula": "(x - mean[c]) / std[c] per channel, x pixels on the [0, 1] scale"}


def _recipe(params: Params, ipc: int, shape: torch.Size, num_classes: int,
            learned: float, threads: int | None = None) -> dict:
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
        # torch.compile(network) for the training steps (the test pass eager): the same
        # training with fused kernels, whose float rounding the card's number has
        "compile": cfg.compile,
        **({"threads": threads} if threads else {}),
    }


def _accuracy_for_card(paths: Paths, ipc: int, stated: dict, digest: str, fmt: str) -> dict:
    """The card's numbers. `distilled` is of exactly the exported tensors under the card's
    recipe, or NOT_MEASURED with the reason: evaluate@IPC's number counts only when it
    measured this very set (its digest) under everything the card's recipe states (`stated`,
    as pipeline/evaluate.measured_recipe records it: settings, lr, device, threads, code) and the
    format keeps the set bit for bit."""
    if not paths.evaluation(ipc).is_file():
        return {"distilled": NOT_MEASURED, "measured": f"evaluate@{ipc} has not run: "
                f"`datm evaluate --from <this folder> --record` measures this export"}
    ev = json.loads(paths.evaluation(ipc).read_text())
    runs = [r for r in ev["runs"] if r["set"] == "distilled"]
    fmt_acc = lambda m, s: f"{100 * m:.2f} ± {100 * s:.2f} % ({len(runs)} models)"  # noqa: E731
    acc = {"random_real": fmt_acc(ev["random_real"], ev["random_real_std"])}
    if ev.get("full_dataset") is not None:
        std = ev.get("full_dataset_std")
        acc["full_dataset"] = f"{100 * ev['full_dataset']:.2f}" + (
            f" ± {100 * std:.2f} %" if std is not None else " %")
    pipeline = fmt_acc(ev["distilled"], ev["distilled_std"])
    rerun = f"run `datm evaluate --ipc {ipc}` for numbers under this recipe"
    recorded = runs[0].get("recipe") if runs else None
    if not isinstance(recorded, dict) or recipe_differences({**recorded, "lr": None},
                                                            {**stated, "lr": None}):
        # the random real baseline trains by the same recipe (at its own lr): not this one's
        acc["random_real"] = NOT_MEASURED
    if not runs or runs[0].get("set_digest") != digest:
        acc.update(distilled=NOT_MEASURED, note=f"evaluate@{ipc} measured another version of "
                   f"this IPC's set: run `datm evaluate --ipc {ipc}`, or `datm evaluate --from "
                   "<this folder> --record`")
    elif not isinstance(recorded, dict):
        acc.update(distilled=NOT_MEASURED, note=f"evaluate@{ipc} ({pipeline}) recorded no "
                   f"recipe to match this card's (an earlier datm): {rerun}")
    elif differ := recipe_differences(recorded, stated):
        # params, threads or code changed since the evaluation: say so rather than mislead
        acc.update(distilled=NOT_MEASURED, note=f"evaluate@{ipc} measured this set ({pipeline}) "
                   f"under another recipe than this card's: {differ}"
                   f"; {rerun}")
    elif fmt in LOSSLESS:
        acc.update(distilled=pipeline, measured=f"by evaluate@{ipc} on exactly the tensors in "
                   f"`inputs` (set digest {digest}) under this card's recipe")
    else:
        acc.update(distilled=NOT_MEASURED, lossless_set=pipeline,
                   measured=f"the PNGs round the set to 8 bits: evaluate@{ipc} measured the "
                   f"lossless set ({pipeline}), not these files; `datm export` measures them "
                   "unless --no-measure")
    return acc


def _recipe_of(params: Params, ipc: int | None) -> EvalConfig:
    """The evaluation recipe of an IPC the profile distills (evaluate.ipc.<ipc> overlaid);
    the `evaluate` section for a set of another size."""
    return params.evaluation(ipc) if ipc in params.ipcs else params.evaluate


@dataclass(frozen=True)
class FromOptions:
    """How `datm evaluate --from` treats a set: `zca` whitens with the run's transform (True),
    normalizes per channel (False) or does what the run did (None); `lr` fixes the lr."""

    zca: bool | None = None
    lr: float | None = None


def check_from(params: Params, paths: Paths, folder: Path, options: FromOptions = FromOptions(),
               record: bool = False,
               threads: Callable[[int], int | None] = lambda models: None) -> int:
    """Read the set as `evaluate_from` will, against the data's classes and image shape,
    without the data itself: a set that cannot be evaluated fails here, once, before any
    process is launched to evaluate it; so does --record of a measurement that would not be
    under the card's recipe (`threads(models)`: the threads per process of the processes to
    come). The number of models the set's recipe trains: the most processes it keeps busy."""
    meta = artifacts.read_meta(paths.train, data.KIND)
    shape = tuple(artifacts.load_rows(paths.train, "images", [0], data.KIND).shape[1:])
    handed = sets.read_set(folder, meta["classes"], shape)
    ipc = handed.per_class(len(meta["classes"]))
    models = _recipe_of(params, ipc).models
    if record:
        problem = _record_problem(params, handed, ipc, len(meta["classes"]), options,
                                  threads(models))
        if problem:
            raise sets.SetError(f"--record {folder}: {problem}")
    return models


def _record_problem(params: Params, handed: sets.HandedSet, ipc: int | None, num_classes: int,
                    options: FromOptions, threads: int | None) -> str | None:
    """Why a measurement of `handed` would not be its card's number (--record), or None."""
    if why := _no_card_recipe(handed, options):
        return why
    measured = _card_recipe(params, handed, ipc, num_classes, options, threads)
    if differ := recipe_differences(measured, stated_recipe(handed.card)):
        return (f"these params give another recipe than the card's ({differ}): measure with "
                "the params it was exported with, or export it again")
    return None


def _no_card_recipe(handed: sets.HandedSet, options: FromOptions) -> str | None:
    """Why no card states the recipe `evaluate_from` trains `handed` under, or None."""
    if handed.kind != "datm export":
        return f"a {handed.kind} has no card to record into (only a datm export has)"
    if options.lr or (options.zca is not None and options.zca != bool(handed.card.get("zca"))):
        return "--lr and --zca / --no-zca train under another recipe than the card's: drop them"
    if not handed.card.get("recipe") or handed.lr is None or not handed.soft:
        return "its card states no recipe (an earlier datm's export): export the set again"
    return None


def _card_recipe(params: Params, handed: sets.HandedSet, ipc: int | None, num_classes: int,
                 options: FromOptions, threads: int | None) -> dict | None:
    """The recipe `evaluate_from` trains a datm export under, in its card's terms; None where
    no card states it (`_no_card_recipe`)."""
    if _no_card_recipe(handed, options):
        return None
    return _recipe(params, ipc, handed.images.shape[1:], num_classes, handed.lr, threads)


def evaluate_from(params: Params, paths: Paths, folder: Path, options: FromOptions = FromOptions(),
                  callback: Callback = quiet, group: Group = SINGLE) -> dict:
    """Evaluate a handed-over set with the pipeline's protocol: the recipe of the IPC it has
    (evaluate.ipc), its learned lr by the pipeline's rule (soft labels) or the random real
    baseline's lr and seeds (hard labels); the test split through the same transform."""
    md = model_data(paths, device_of(params, group))
    handed = sets.read_set(folder, md.classes, tuple(md.x.shape[1:]))
    card_zca = handed.card.get("zca")
    if card_zca is not None and bool(card_zca) != md.zca.enabled:
        raise sets.SetError(f"{folder} was exported from a run with zca.enabled {bool(card_zca)}; "
                            f"this project's is {md.zca.enabled}")
    whiten = md.zca.enabled if options.zca is None else options.zca
    if whiten and not md.zca.enabled:
        raise sets.SetError("--zca: this run has no whitening (zca.enabled false in params.yaml)")
    transform = md.zca if whiten else ZCA()
    x_test = md.x_test
    if whiten != md.zca.enabled:
        test = data.Split.load(paths.test)
        x_test = data.to_model_space(test.images, md.mean, md.std, transform).to(md.x.device)
    x = handed.inputs if handed.inputs is not None else data.pixels_to_model_space(
        handed.pixels, md.mean, md.std, transform)
    ipc = handed.per_class(len(md.classes))
    cfg = _recipe_of(params, ipc)
    if options.lr:
        lr, rule = options.lr, f"--lr {options.lr}"
    elif handed.soft:
        if handed.lr is None:
            raise sets.SetError(f"{folder}: soft labels but no learned lr: pass --lr")
        lr = evaluate.distilled_lr(cfg, handed.lr)
        rule = f"evaluate.lr {cfg.lr}" if cfg.lr else \
            f"learned lr {handed.lr:.6g} x lr_scale {cfg.lr_scale}"
    else:
        lr, rule = cfg.random_lr, "evaluate.random_lr (hard labels: the random real baseline's)"
    # soft labels: evaluate@IPC's seeds; hard labels: the random real baseline's (seed + 1)
    seed = cfg.seed + (0 if handed.soft else 1)
    spec = evaluate.arch_spec(md.spec(params), cfg.arch)
    labels = "soft" if handed.soft else "hard"
    recipe = {"kind": handed.kind, "images": int(x.shape[0]), "ipc": ipc,
              "labels": labels, "lr": lr, "lr_rule": rule,
              # a datm export's logits may be one-hot: its card's settings say which kind
              "label_kind": label_kind(handed.card.get("settings"))
              if handed.kind == "datm export" else f"{labels} labels",
              "epochs": cfg.epochs, "batch": cfg.batch, "models": cfg.models, "arch": cfg.arch,
              "compile": cfg.compile, "seed": seed,
              "preprocessing": "network inputs as given" if handed.inputs is not None
              else ("ZCA whitening of the run" if whiten else "per-channel normalization"),
              "test_split": "ZCA whitening of the run" if whiten else "per-channel normalization",
              "recipe_of": f"evaluate.ipc.{ipc}" if ipc in params.ipcs else "evaluate",
              "notes": handed.notes}
    callback({"event": "recipe", "recipe": recipe})
    callback({"event": "set", "name": "handed-over set", "models": cfg.models})
    result = evaluate.evaluate_set(spec, x.to(md.x.device), handed.targets.to(md.x.device), lr,
                                   cfg.epochs, cfg.models, cfg, params.augment, x_test,
                                   md.y_test, seed, callback, group=group)
    threads = torch.get_num_threads() if md.x.device.type == "cpu" else None
    # what --record checks against the card: the files measured and the recipe, card-shaped
    return {"folder": str(folder), "recipe": recipe, "acc_mean": result["mean"],
            "acc_std": result["std"], "accs": result["accs"],
            "files_digest": handed.card.get("files_digest"),
            "card_recipe": _card_recipe(params, handed, ipc, len(md.classes), options, threads),
            "seconds": sum(result["seconds"])}


def describe_result(result: dict) -> str:
    """"70.64 ± 3.80 % (2 models)", as a card states a number."""
    return (f"{100 * result['acc_mean']:.2f} ± {100 * result['acc_std']:.2f} % "
            f"({len(result['accs'])} models)")
