"""Step buffers: train the expert trajectories -> artifacts/buffers/expert_*.safetensors.

The experts train on the whole training set to convergence, so they are also the full-set
reference: their final test accuracy (mean ± std over experts) is what a distilled set is
compared with ("lossless" means reaching it).
"""

from __future__ import annotations

import math

from .. import artifacts, experts
from ..config import Params, Paths
from ..distributed import SINGLE, Group
from ..events import Callback
from .project import device_of, environment, model_data, quiet


def train_experts(params: Params, paths: Paths, callback: Callback = quiet,
            group: Group = SINGLE) -> tuple[dict, dict[int, dict]]:
    """Train the missing experts; on several ranks (`group`) each trains its share.

    Returns (summary, timing): the summary is a function of the experts alone (what
    metrics/buffers.json holds, byte-identical however often the stage runs); `timing` has the
    wall time and images/s of each expert this run trained (all ranks'), for the console and
    MLflow only.
    """
    md = model_data(paths, device_of(params, group))
    spec = md.spec(params)
    seconds: dict[int, float] = {}

    def on_event(e: dict) -> None:
        if e["event"] == "expert":
            seconds[e["index"]] = e["seconds"]
        callback(e)

    files = experts.train_experts(paths.buffers, spec, md.x, md.y, md.x_test, md.y_test,
                                  params.buffers, params.augment, md.identity, on_event,
                                  group=group)
    if group.distributed:  # the wall times of the experts the other ranks trained, too
        gathered = group.gather_floats(seconds, params.buffers.num_experts)
        seconds = {k: s for k, s in enumerate(gathered) if s > 0}
    metas = [artifacts.read_meta(f, experts.KIND) for f in files]
    timing = {k: {"seconds": s, "images_per_second": metas[k]["images_seen"] / s}
              for k, s in seconds.items() if s > 0}
    return {**summarize(metas), "env": environment(md.x.device)}, timing


def summarize(metas: list[dict]) -> dict:
    """metrics/buffers.json: the experts' final test accuracy as the full-set reference.

    Only scalars at the top (`dvc metrics show` makes a column of each scalar and skips lists);
    per-expert curves in "runs".
    """
    final = [m["test_acc"][-1] for m in metas]
    mean = sum(final) / len(final)
    std = math.sqrt(sum((a - mean) ** 2 for a in final) / (len(final) - 1)) if len(final) > 1 else 0.0
    return {"full_dataset": mean, "full_dataset_std": std, "experts": len(metas),
            "epochs": metas[0]["epochs"],
            "runs": [{"expert": m["index"], "acc": m["test_acc"][-1], "test_acc": m["test_acc"],
                      "train_acc": m["train_acc"], "lr": m.get("lrs")} for m in metas]}


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
