"""The pipeline's steps: one module per DVC stage, each a plain function of (params, paths).

    download.download_data   data/{train,test}.safetensors
    zca.fit_zca              artifacts/zca.safetensors
    buffers.train_experts    artifacts/buffers/expert_*.safetensors (+ the full-set reference)
    distill.distill_ipc      artifacts/distilled/ipc_<ipc>.safetensors
    evaluate.baseline_ipc / evaluate_ipc / crossarch_ipc     metrics/{baseline,evaluate,crossarch}
    decompose.decompose_ipc  metrics/decompose/ipc_<ipc>.json
    export.export_ipc / evaluate_from                        `datm export`, `datm evaluate --from`

`stages/<name>.py` is the process around each (arguments, tracker, progress, launch). For the
CLI, tests and notebooks every step is also reachable here (`pipeline.distill_ipc(...)`); the
names load their module on first use, so a stage that imports `datm.pipeline.zca` runs only
the code of its own step (dvc.yaml lists exactly that, tests/test_dvc_deps.py).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "download_data": "download", "fit_zca": "zca",
    "train_experts": "buffers", "buffer_status": "buffers",
    "distill_ipc": "distill",
    "baseline_ipc": "evaluate", "evaluate_ipc": "evaluate", "crossarch_ipc": "evaluate",
    "check_finite": "project",
    "decompose_ipc": "decompose",
    "export_ipc": "export", "evaluate_from": "export", "FromOptions": "export",
    **{name: "project" for name in ("VOLATILE", "ModelData", "data_identity", "distilled_ipcs",
                                    "distilled_pixels", "full_dataset", "load_distilled",
                                    "model_data", "settled", "write_json")},
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
