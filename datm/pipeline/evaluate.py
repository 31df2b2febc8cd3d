"""Steps baseline@<ipc>, evaluate@<ipc> and crossarch@<ipc>: accuracy of fresh networks
trained on each set (the full-set reference is the experts', datm/pipeline/buffers.py).

The random real baseline of an IPC depends on the evaluation recipe and the data, never on the
distilled set: baseline@<ipc> computes it once into metrics/baseline/ipc_<ipc>.json, and
evaluate@<ipc> reads it there, so a new distilled set does not train it again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from .. import augment, compiled, evaluate, networks, provenance
from ..config import EvalConfig, Params, Paths
from ..distributed import SINGLE, Group
from ..events import Callback
from .project import (
    ModelData,
    check_finite,
    device_of,
    environment,
    full_dataset,
    load_distilled,
    model_data,
    quiet,
    set_digest,
    write_json,
)


def runs(name: str, result: dict, lr: float, epochs: int, cfg: EvalConfig,
         **extra: object) -> list[dict]:
    """One record per trained model, for the metrics files' "runs" list."""
    return [{"set": name, "model": k, "acc": acc, "lr": lr, "epochs": epochs,
             "batch": cfg.batch, "arch": cfg.arch, **extra}
            for k, acc in enumerate(result["accs"])]


def measured_recipe(params: Params, cfg: EvalConfig, lr: float, device: str,
                    threads: int | None) -> dict:
    """Everything a distilled set's number is a function of besides the set and the data: the
    recipe `cfg` of its IPC with the lr it trains at, the network and DSA settings, where it
    runs (the device kind and, on a CPU, the threads per process: they change the float
    rounding, which training amplifies) and the code. evaluate@<ipc> records it beside the
    number; an export compares it with the recipe its card states (datm/pipeline/export.py)."""
    aug = params.augment
    return {"arch": cfg.arch, "net": asdict(params.net), "lr": lr, "epochs": cfg.epochs,
            "batch": cfg.batch, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
            "models": cfg.models, "seed": cfg.seed, "compile": cfg.compile,
            "augment": asdict(aug) if aug.enabled and cfg.augment else {"enabled": False},
            "device": device, "threads": threads if device == "cpu" else None,
            "code": provenance.code_digest(evaluate, augment, networks, compiled)}


# The `evaluate` settings a random real baseline is a function of (its protocol below); the
# baseline@<ipc> stage lists each as a DVC param (tests/test_dvc_repro.py checks dvc.yaml).
BASELINE_KEYS = ("arch", "models", "epochs", "batch", "momentum", "weight_decay", "augment",
                 "random_lr", "seed", "compile")


def baseline_path(paths: Paths, ipc: int) -> Path:
    return paths.metrics / "baseline" / f"ipc_{ipc}.json"


def _protocol(params: Params, md: ModelData, ipc: int) -> str:
    """What a random real baseline is a function of: the data (by content), the recipe's
    settings the baseline uses, the IPC and the code. A baseline file of another protocol is
    not used (e.g. `datm evaluate` by hand after a settings change)."""
    cfg = params.evaluation(ipc)
    # the device's kind as one process names it: a rank's own GPU (cuda:1) is cuda:0 here
    device = md.x.device
    recipe = {"ipc": ipc, "data": md.identity, "net": asdict(params.net),
              "augment": asdict(params.augment),
              "device": device.type if device.index is None else f"{device.type}:0",
              **{k: getattr(cfg, k) for k in BASELINE_KEYS},
              "code": provenance.code_digest(evaluate, augment, networks, compiled)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def random_real(params: Params, md: ModelData, ipc: int, callback: Callback,
                 arch: str | None = None, group: Group = SINGLE) -> dict:
    """`evaluate.models` fresh networks on a random real subset of `ipc` images per class, on
    the IPC's architecture or on `arch` (the cross-architecture table)."""
    cfg = params.evaluation(ipc)
    cfg = replace(cfg, arch=arch or cfg.arch)
    spec = evaluate.arch_spec(md.spec(params), cfg.arch)
    name = "random real" if arch is None else f"random real on {arch}"
    callback({"event": "set", "name": name, "models": cfg.models})
    idx = evaluate.random_subset(md.y, ipc, len(md.classes), cfg.seed + ipc)
    rand = evaluate.evaluate_set(spec, md.x[idx], md.y[idx], cfg.random_lr, cfg.epochs,
                                 cfg.models, cfg, params.augment, md.x_test, md.y_test,
                                 cfg.seed + 1, callback, group=group)
    return {"ipc": ipc, "random_real": rand["mean"], "random_real_std": rand["std"],
            "protocol": _protocol(params, md, ipc), "env": environment(md.x.device),
            "runs": runs("random real", rand, cfg.random_lr, cfg.epochs, cfg),
            "seconds": sum(rand["seconds"])}


def baseline_ipc(params: Params, paths: Paths, ipc: int, callback: Callback = quiet,
                 group: Group = SINGLE) -> dict:
    """The random real baseline of an IPC -> metrics/baseline/ipc_<ipc>.json (no wall time:
    evaluate@<ipc> depends on the file)."""
    params.distill(ipc)  # a clear error for an IPC that is not configured
    summary = random_real(params, model_data(paths, device_of(params, group)), ipc, callback,
                           group=group)
    if group.is_main:
        write_json(baseline_path(paths, ipc),
                   {k: v for k, v in summary.items() if k != "seconds"})
    return summary


def stored_baseline(params: Params, paths: Paths, md: ModelData, ipc: int) -> dict | None:
    """The baseline file of this IPC when it was computed under the current protocol."""
    try:
        stored = json.loads(baseline_path(paths, ipc).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("protocol") != _protocol(params, md, ipc):
        return None
    return {**stored, "seconds": 0.0}


def crossarch_ipc(params: Params, paths: Paths, ipc: int, callback: Callback = quiet,
                  group: Group = SINGLE) -> dict:
    """The distilled set and a random real subset of the same size, each trained on every
    architecture of `evaluate.cross_archs` with the IPC's recipe -> metrics/crossarch/ipc_N.json
    (the cross-architecture table of the summary; empty when no other architecture is asked)."""
    cfg = params.evaluation(ipc)
    md = model_data(paths, device_of(params, group)) if cfg.cross_archs else None
    rows, seconds = [], 0.0
    if md is not None:
        tensors, _ = load_distilled(paths.distilled(ipc))
        check_finite(paths.distilled(ipc), images=tensors["images"], labels=tensors["labels"],
                     lr=tensors["lr"])
        x, labels = tensors["images"].to(md.x.device), tensors["labels"].to(md.x.device)
        lr = evaluate.distilled_lr(cfg, float(tensors["lr"][0]))
        for arch in cfg.cross_archs:
            spec = evaluate.arch_spec(md.spec(params), arch)
            arch_cfg = replace(cfg, arch=arch)
            callback({"event": "set", "name": f"distilled on {arch}", "models": cfg.models})
            dist = evaluate.evaluate_set(spec, x, labels, lr, cfg.epochs, cfg.models, arch_cfg,
                                         params.augment, md.x_test, md.y_test, cfg.seed, callback,
                                         group=group)
            rand = random_real(params, md, ipc, callback, arch, group)
            seconds += sum(dist["seconds"]) + rand["seconds"]
            rows.append({"arch": arch, "distilled": dist["mean"], "distilled_std": dist["std"],
                         "random_real": rand["random_real"],
                         "random_real_std": rand["random_real_std"],
                         "runs": runs("distilled", dist, lr, cfg.epochs, arch_cfg) + rand["runs"]})
    # a list, not scalars: `dvc metrics show` keeps one row per IPC from evaluate@<ipc>
    summary = {"ipc": ipc, "archs": rows,
               **({"env": environment(md.x.device)} if md is not None else {})}
    if group.is_main:
        write_json(paths.crossarch(ipc), summary)
    return {**summary, "seconds": seconds}


def evaluate_ipc(params: Params, paths: Paths, ipc: int, callback: Callback = quiet,
                 group: Group = SINGLE) -> dict:
    """Distilled set vs a random real subset of the same size vs the full set (cached).

    The random real subset's accuracy comes from baseline@<ipc>'s file when it holds the
    current protocol; otherwise it is trained here (and not written: that is baseline's file).
    """
    cfg = params.evaluation(ipc)  # also a clear error for an IPC that is not configured
    md = model_data(paths, device_of(params, group))
    tensors, meta = load_distilled(paths.distilled(ipc))
    check_finite(paths.distilled(ipc), images=tensors["images"], labels=tensors["labels"],
                 lr=tensors["lr"])
    spec = evaluate.arch_spec(md.spec(params), cfg.arch)
    lr = evaluate.distilled_lr(cfg, float(tensors["lr"][0]))
    callback({"event": "set", "name": "distilled", "models": cfg.models})
    dist = evaluate.evaluate_set(spec, tensors["images"].to(md.x.device),
                                 tensors["labels"].to(md.x.device), lr, cfg.epochs, cfg.models,
                                 cfg, params.augment, md.x_test, md.y_test, cfg.seed, callback,
                                 group=group)
    init = None
    if "init_images" in tensors:
        # What the matching adds: the exact set the distillation started from, same recipe
        init_lr = evaluate.distilled_lr(cfg, float(tensors["init_lr"][0]))
        callback({"event": "set", "name": "initialization", "models": cfg.models})
        init = evaluate.evaluate_set(spec, tensors["init_images"].to(md.x.device),
                                     tensors["init_labels"].to(md.x.device), init_lr,
                                     cfg.epochs, cfg.models, cfg, params.augment, md.x_test,
                                     md.y_test, cfg.seed, callback, group=group)
    rand = stored_baseline(params, paths, md, ipc) or random_real(params, md, ipc, callback,
                                                                    group=group)
    full_acc, full_std = full_dataset(paths)
    env = environment(md.x.device)
    recipe = measured_recipe(params, cfg, lr, md.x.device.type, env["threads"])
    # One row per IPC in `dvc metrics show`: the accuracies as scalars, details in "runs".
    # Where lossless stands: the gap to the full set, and the share of the training set used.
    summary = {"ipc": ipc, "distilled": dist["mean"], "distilled_std": dist["std"],
               "init": None if init is None else init["mean"],
               "init_std": None if init is None else init["std"],
               "matching_gain": None if init is None else dist["mean"] - init["mean"],
               "random_real": rand["random_real"], "random_real_std": rand["random_real_std"],
               "full_dataset": full_acc, "full_dataset_std": full_std,
               "gap_to_full": None if full_acc is None else dist["mean"] - full_acc,
               "train_fraction": tensors["images"].shape[0] / md.x.shape[0],
               "matching_loss": meta["summary"]["final_loss"],
               "env": env,
               # runs: a list, which `dvc metrics show` leaves out; set_digest and recipe say
               # which version of the set was measured and how (an export's card checks both)
               "runs": runs("distilled", dist, lr, cfg.epochs, cfg, set_digest=set_digest(tensors),
                            recipe=recipe)
                       + (runs("initialization", init, init_lr, cfg.epochs, cfg) if init else [])
                       + rand["runs"]}
    if group.is_main:
        write_json(paths.evaluation(ipc), summary)
    seconds = sum(dist["seconds"]) + rand["seconds"] + (sum(init["seconds"]) if init else 0.0)
    return {**summary, "seconds": seconds}

