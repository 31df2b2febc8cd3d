"""Every pipeline step in one namespace, for the CLI, tests and notebooks.

The steps themselves live in `datm.steps.*`, one module per DVC stage, so that a stage depends
only on the code it runs; DVC stages import their step module directly, never this one.
"""

from __future__ import annotations

from .steps.buffers import buffer_status, buffers
from .steps.decompose import decompose_ipc
from .steps.distill import distill
from .steps.download import download
from .steps.evaluate import baseline_ipc, check_finite, crossarch_ipc, evaluate_ipc
from .steps.export import FromOptions, evaluate_from, export_ipc
from .steps.project import (
    VOLATILE,
    ModelData,
    data_identity,
    distilled_ipcs,
    distilled_pixels,
    full_dataset,
    load_distilled,
    model_data,
    settled,
    write_json,
)
from .steps.zca import fit_zca

__all__ = ["VOLATILE", "FromOptions", "ModelData", "baseline_ipc", "buffer_status", "buffers", "check_finite",
           "crossarch_ipc", "data_identity", "decompose_ipc",
           "distill", "distilled_ipcs", "distilled_pixels", "download", "evaluate_from",
           "evaluate_ipc", "export_ipc", "fit_zca", "full_dataset", "load_distilled", "model_data",
           "settled", "write_json"]
