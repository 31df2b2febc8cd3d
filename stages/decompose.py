"""`python -m stages.decompose --ipc N` (dvc.yaml) and `datm decompose`: the process around
the step datm/pipeline/decompose.py. With `launch.decompose` W > 1 the models are dealt out to
W processes (the same accuracies as one).
"""

from __future__ import annotations

import sys

from datm.distributed import SINGLE, Group
from datm.pipeline.decompose import decompose_ipc
from stages import common, launch
from stages.evaluate import measure

KEYS = ("distilled_soft", "distilled_hard", "random_soft", "random_hard", "images_gain",
        "labels_gain")


def run(ipc: int, params: str = "params.yaml", root: str = ".", group: Group = SINGLE) -> dict:
    summary = measure("decompose", ipc, params, root, group, f"images vs labels ipc {ipc}", "",
                      decompose_ipc, lambda s: (
                          {k: s[k] for k in KEYS},
                          {f"decompose.ipc{ipc}.{k}": s[k] for k in KEYS}))
    pct = lambda key: f"{100 * summary[key]:.2f}"  # noqa: E731
    common.console.print(
        f"[green]decompose ipc {ipc}:[/] distilled images {pct('distilled_soft')} with their "
        f"labels, {pct('distilled_hard')} with hard labels; random real {pct('random_soft')} "
        f"with the experts' soft labels, {pct('random_hard')} with hard labels (images gain "
        f"{100 * summary['images_gain']:+.2f}, labels gain {100 * summary['labels_gain']:+.2f})")
    return summary


def start(ipc: int, params: str = "params.yaml", root: str = ".") -> int:
    """The stage as `launch.decompose` (or DATM_RANKS) processes, at most one per model; its
    exit code."""
    return launch.start("decompose", "stages.decompose",
                        ["--ipc", str(ipc), "--params", params, "--root", root],
                        lambda group: run(ipc, params, root, group), params,
                        most=lambda p: p.evaluation(ipc).models)


if __name__ == "__main__":
    args = common.parse(__doc__, lambda a: a.add_argument("--ipc", type=int, required=True))
    sys.exit(start(args.ipc, args.params, args.root))
