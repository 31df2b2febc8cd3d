"""Step buffers: train the expert trajectories -> artifacts/buffers/expert_*.safetensors."""

from __future__ import annotations

from .. import artifacts, experts
from ..config import Params, Paths
from ..distributed import SINGLE, Group
from ..events import Callback
from .project import model_data, quiet


def buffers(params: Params, paths: Paths, callback: Callback = quiet,
            group: Group = SINGLE) -> dict:
    """Train the missing experts; on several ranks (`group`) each trains its share and every
    rank returns the summary of all of them (the stage writes it on rank 0)."""
    md = model_data(paths, group.device if group.distributed else params.torch_device())
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
