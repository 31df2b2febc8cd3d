"""The pipeline's steps as functions of (params, paths): what each DVC stage and CLI command runs.

Each step reads its inputs from artifacts, writes its outputs atomically and returns a summary
dict (the stage's metrics). Tracking and progress display stay outside: steps only call back.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import artifacts, data, evaluate, experts
from .config import ConfigError, Params, Paths
from .distill import Distiller, DistillError, Selection
from .events import Callback
from .networks import NetSpec
from .zca import ZCA, fit


def _quiet(_: dict) -> None:
    pass


def write_json(path: Path, payload: dict) -> None:
    with artifacts.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


# --- download and zca ------------------------------------------------------------------------

def download(params: Params, paths: Paths) -> dict:
    train, test = data.load(params.data)
    train.save(paths.train, "train")
    test.save(paths.test, "test")
    return {"train_images": len(train.labels), "test_images": len(test.labels),
            "classes": train.num_classes, "shape": list(train.shape), "source": train.source}


def fit_zca(params: Params, paths: Paths) -> dict:
    train = data.Split.load(paths.train)
    if not params.zca.enabled:
        ZCA().save(paths.zca)
        return {"enabled": False}
    tic = time.perf_counter()
    # Raw [0, 1] pixels, not normalized ones, as the reference (see data.to_model_space). On the
    # compute device: Tiny ImageNet's 12288-dim fit takes minutes on a CPU, seconds on a GPU.
    images = train.images.to(params.torch_device())
    zca = fit(images, params.zca.eps, scale=1 / 255)
    zca.save(paths.zca, {"eps": params.zca.eps})
    return {"enabled": True, "eps": params.zca.eps, "seconds": time.perf_counter() - tic}


# --- model-space data ------------------------------------------------------------------------

@dataclass
class ModelData:
    """Train and test splits in model space (normalized, whitened) on the compute device."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    zca: ZCA
    source: str
    identity: str  # content hash of the train split and the ZCA: what experts were made from

    def spec(self, params: Params) -> NetSpec:
        c, h, _ = self.x.shape[1:]
        try:
            return NetSpec(c, len(self.classes), h, width=params.net.width,
                           depth=params.net.depth, norm=params.net.norm)
        except ValueError as exc:  # e.g. a depth that pools these images to nothing
            raise ConfigError(f"net: {exc}") from None

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> pixels in [0, 1], the inverse of how `x` was made."""
        return data.to_pixels(x, self.mean, self.std, self.zca)


def data_identity(paths: Paths) -> str:
    """What experts and distillations are made from: the training images, labels and class
    names, and the ZCA transform, by content (not file bytes or the folder they came from)."""
    train = artifacts.content_digest(paths.train, ("classes",))
    zca = artifacts.content_digest(paths.zca, ("enabled",))
    return f"{train[:16]}:{zca[:16]}"


def model_data(paths: Paths, device: torch.device) -> ModelData:
    train, test = data.Split.load(paths.train), data.Split.load(paths.test)
    zca = ZCA.load(paths.zca)
    to = lambda s: data.to_model_space(s.images, train.mean, train.std, zca).to(device)  # noqa: E731
    identity = data_identity(paths)
    return ModelData(to(train), train.labels.to(device), to(test), test.labels.to(device),
                     train.classes, train.mean, train.std, zca, train.source, identity)


# --- experts ---------------------------------------------------------------------------------

# Run-time facts (wall time, where a run resumed) that never go into an artifact: the same
# inputs and settings must give the same bytes, however and whenever they were computed.
VOLATILE = ("seconds", "resumed_at")


def _settled(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in VOLATILE}


def buffers(params: Params, paths: Paths, callback: Callback = _quiet) -> dict:
    md = model_data(paths, params.torch_device())
    spec = md.spec(params)
    seconds: dict[int, float] = {}

    def on_event(e: dict) -> None:
        if e["event"] == "expert":
            seconds[e["index"]] = e["seconds"]
        callback(e)

    files = experts.train_experts(paths.buffers, spec, md.x, md.y, md.x_test, md.y_test,
                                  params.buffers, params.augment, md.identity, on_event)
    metas = [artifacts.read_meta(f, experts.KIND) for f in files]
    final = [m["test_acc"][-1] for m in metas]
    # Only scalar accuracy keys at the top: `dvc metrics show` makes a column of each scalar and
    # skips lists, so per-run details live in the "runs" list. Wall times exist only for the
    # experts this run trained (None for those it found finished).
    return {"expert_acc": sum(final) / len(final),
            "runs": [{"expert": k, "epochs": params.buffers.epochs, "acc": m["test_acc"][-1],
                      "seconds": seconds.get(k),
                      "images_per_second": m["images_seen"] / seconds[k] if k in seconds else None}
                     for k, m in enumerate(metas)]}


def buffer_status(paths: Paths) -> dict:
    """How far the expert buffer is, for `datm status` (never raises)."""
    files = sorted(paths.buffers.glob("expert_*.safetensors")) if paths.buffers.is_dir() else []
    accs = []
    for f in files:
        try:
            accs.append(artifacts.read_meta(f, experts.KIND)["test_acc"][-1])
        except (artifacts.ArtifactError, KeyError, IndexError):
            pass
    return {"experts": len(files), "readable": len(accs),
            "mean_test_acc": sum(accs) / len(accs) if accs else None}


# --- distillation ----------------------------------------------------------------------------

def distill(params: Params, paths: Paths, ipc: int, callback: Callback = _quiet,
            fresh: bool = False) -> dict:
    cfg = params.distill(ipc)
    device = params.torch_device()
    buffer = experts.ExpertBuffer.open(paths.buffers)
    md = model_data(paths, device)
    if buffer.spec.num_classes != len(md.classes):
        raise DistillError("experts and dataset disagree on the number of classes: rerun buffers")
    inputs = [md.identity, buffer.metas[0]["hash"], len(buffer), asdict(params.augment)]
    selection = None
    if cfg.select_every:
        # Validation images from the TRAINING split; the test split is never handed over.
        val = evaluate.validation_subset(md.y, cfg.select_val_per_class, len(md.classes),
                                         params.evaluate.seed)
        selection = Selection(_eval_spec(params, md), params.evaluate, params.augment,
                              md.x[val], md.y[val])
        inputs += [asdict(params.evaluate), selection.spec.to_dict()]  # they change the choice
    identity = cfg.digest(json.dumps(inputs))
    state = None if fresh else Distiller.resume(paths.checkpoint(ipc), cfg, buffer,
                                                params.augment, identity, device, selection)
    resumed_at = state.iteration if state else 0
    if state is None:
        state = Distiller.create(cfg, buffer, md.x, md.y, params.augment, selection)
    callback({"event": "start", "iteration": state.iteration, "iterations": cfg.iterations,
              "resumed": resumed_at > 0, "initial": state, "pixels": md.pixels})
    tic = time.perf_counter()
    state.run(callback, paths.checkpoint(ipc), identity)
    seconds = time.perf_counter() - tic
    losses = [row[1] for row in state.history[-20:] if row[1] == row[1]]
    summary = {"ipc": ipc, "iterations": state.iteration, "skipped": state.skipped,
               "nonfinite": state.nonfinite, "final_loss": sum(losses) / max(len(losses), 1),
               "learned_lr": float(state.lr), "seconds": seconds, "resumed_at": resumed_at,
               "init_fallback_classes": len(state.init_report.get("fallback_classes", []))}
    if state.best is not None:
        summary.update(selected_iteration=state.best.iteration,
                       selected_val_acc=state.best.val_acc, selected_lr=float(state.best.lr))
    state.save_result(paths.distilled(ipc), {
        "classes": md.classes, "mean": md.mean, "std": md.std, "zca": md.zca.enabled,
        "dataset": params.data.name, "summary": _settled(summary)})
    callback({"event": "done", "state": state, "summary": summary})
    return summary


# --- evaluation ------------------------------------------------------------------------------

def _eval_spec(params: Params, md: ModelData) -> NetSpec:
    return evaluate.arch_spec(md.spec(params), params.evaluate.arch)


def fullset(params: Params, paths: Paths, callback: Callback = _quiet) -> dict:
    """Accuracy of the evaluation network trained on the whole real training set."""
    cfg = params.evaluate
    md = model_data(paths, params.torch_device())
    # Its own batch: `batch` is sized for sets of tens to hundreds of images (a few SGD steps
    # per epoch); on the whole training set it would mean thousands of tiny steps per epoch.
    full_cfg = replace(cfg, batch=cfg.fullset_batch)
    result = evaluate.evaluate_set(_eval_spec(params, md), md.x, md.y, cfg.fullset_lr,
                                   cfg.fullset_epochs, cfg.fullset_models, full_cfg,
                                   params.augment, md.x_test, md.y_test, cfg.seed + 17, callback)
    summary = {"full_dataset": result["mean"],
               "runs": _runs("full dataset", result, cfg.fullset_lr, cfg.fullset_epochs, full_cfg)}
    write_json(paths.fullset, summary)  # evaluate@N depends on it: no wall times inside
    return {**summary, "seconds": sum(result["seconds"])}


def _runs(name: str, result: dict, lr: float, epochs: int, cfg: evaluate.EvalConfig) -> list[dict]:
    """One record per trained model, for the metrics files' "runs" list."""
    return [{"set": name, "model": k, "acc": acc, "lr": lr, "epochs": epochs,
             "batch": cfg.batch, "arch": cfg.arch}
            for k, acc in enumerate(result["accs"])]


def load_distilled(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return artifacts.load(path, "distilled")


def check_finite(where: str | Path, **tensors: torch.Tensor) -> None:
    """A set with NaN/inf would train to chance (10 %) and be reported as a number: refuse."""
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise DistillError(f"{where}: {' and '.join(bad)} hold NaN or inf values (a diverged "
                           "distillation?): refusing to evaluate it; distill again with a "
                           "lower lr_img / lr_lr")


def evaluate_ipc(params: Params, paths: Paths, ipc: int, callback: Callback = _quiet) -> dict:
    """Distilled set vs a random real subset of the same size vs the full set (cached)."""
    cfg = params.evaluate
    params.distill(ipc)  # a clear error for an IPC that is not configured
    md = model_data(paths, params.torch_device())
    tensors, meta = load_distilled(paths.distilled(ipc))
    check_finite(paths.distilled(ipc), images=tensors["images"], labels=tensors["labels"],
                 lr=tensors["lr"])
    spec = _eval_spec(params, md)
    lr = evaluate.distilled_lr(cfg, float(tensors["lr"][0]))
    callback({"event": "set", "name": "distilled", "models": cfg.models})
    dist = evaluate.evaluate_set(spec, tensors["images"].to(md.x.device),
                                 tensors["labels"].to(md.x.device), lr, cfg.epochs, cfg.models,
                                 cfg, params.augment, md.x_test, md.y_test, cfg.seed, callback)
    callback({"event": "set", "name": "random real", "models": cfg.models})
    idx = evaluate.random_subset(md.y, ipc, len(md.classes), cfg.seed + ipc)
    rand = evaluate.evaluate_set(spec, md.x[idx], md.y[idx], cfg.random_lr, cfg.epochs,
                                 cfg.models, cfg, params.augment, md.x_test, md.y_test,
                                 cfg.seed + 1, callback)
    full = json.loads(paths.fullset.read_text()) if paths.fullset.is_file() else {}
    # One row per IPC in `dvc metrics show`: the accuracies as scalars, details in "runs".
    summary = {"ipc": ipc, "distilled": dist["mean"], "distilled_std": dist["std"],
               "random_real": rand["mean"], "random_real_std": rand["std"],
               "full_dataset": full.get("full_dataset"),
               "matching_loss": meta["summary"]["final_loss"],
               "runs": _runs("distilled", dist, lr, cfg.epochs, cfg)
               + _runs("random real", rand, cfg.random_lr, cfg.epochs, cfg)}
    write_json(paths.evaluation(ipc), summary)
    return {**summary, "seconds": sum(dist["seconds"]) + sum(rand["seconds"])}


# --- export ----------------------------------------------------------------------------------

def distilled_ipcs(paths: Paths) -> list[int]:
    folder = paths.distilled(0).parent
    found = [p.stem.removeprefix("ipc_") for p in folder.glob("ipc_*.safetensors")]
    return sorted(int(s) for s in found if s.isdigit())


def distilled_pixels(paths: Paths, tensors: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """A distilled set's images as pixels in [0, 1] (de-whitened with the pipeline's ZCA, or
    de-normalized with the mean and std it was distilled with)."""
    zca = ZCA.load(paths.zca) if meta.get("zca") else ZCA()
    return data.to_pixels(tensors["images"], meta["mean"], meta["std"], zca)


def export_ipc(paths: Paths, ipc: int, fmt: str, out: Path, force: bool = False,
               git_commit: str = "unknown") -> Path:
    from .export import export

    if not paths.distilled(ipc).is_file():
        done = ", ".join(map(str, distilled_ipcs(paths))) or "none yet"
        raise DistillError(f"IPC {ipc} was not distilled (distilled IPCs: {done})")
    tensors, meta = load_distilled(paths.distilled(ipc))
    pixels = distilled_pixels(paths, tensors, meta)
    card = {"dataset": meta.get("source"), "ipc": ipc, "settings": meta.get("settings"),
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
                    callback: Callback = _quiet) -> dict:
    """Evaluate an exported set (ours or someone's) with the pipeline's protocol."""
    from .export import read

    pixels, logits, lr, card = read(folder)
    check_finite(folder, images=pixels, labels=logits, lr=torch.tensor(lr))
    md = model_data(paths, params.torch_device())
    if list(pixels.shape[1:]) != list(md.x.shape[1:]) or logits.shape[1] != len(md.classes):
        raise DistillError(f"{folder} holds {list(pixels.shape[1:])} images of "
                           f"{logits.shape[1]} classes; the pipeline's data is "
                           f"{list(md.x.shape[1:])} with {len(md.classes)} classes")
    # Back to model space by the very function that made the pipeline's data.
    x = data.to_model_space(pixels * 255, md.mean, md.std, md.zca).to(md.x.device)
    cfg = params.evaluate
    lr = evaluate.distilled_lr(cfg, lr)
    result = evaluate.evaluate_set(_eval_spec(params, md), x, logits.to(x.device), lr, cfg.epochs,
                                   cfg.models, cfg, params.augment, md.x_test, md.y_test, cfg.seed,
                                   callback)
    return {"folder": str(folder), "ipc": card.get("ipc"), "models": cfg.models,
            "epochs": cfg.epochs, "lr": lr, "acc_mean": result["mean"],
            "acc_std": result["std"], "accs": result["accs"]}
