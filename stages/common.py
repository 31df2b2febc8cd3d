"""What every stage shares: argument parsing, params loading, error reporting, progress bars.

A stage is `python -m stages.<name>` (DVC runs that) or `datm <name>` (the CLI calls the same
`run` function). User mistakes end as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from datm.config import Params, Paths, load_params
from datm.errors import UserError
from datm.tracking import Tracker

# soft_wrap: rich would otherwise wrap at 80 columns when stderr is a pipe (DVC, CI), turning
# the one-line error into several.
console = Console(stderr=True, soft_wrap=True)


def parse(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--root", default=".", help="project root holding data/ and artifacts/")
    if extra:
        extra(parser)
    return parser.parse_args()


def load(params: str | Path) -> Params:
    return load_params(params)


def paths(root: str | Path) -> Paths:
    return Paths(Path(root))


def settings(p: Params, ipc: int | None = None) -> dict:
    """The settings a result depends on, for MLflow (flattened there to `net.width`, ...):
    dataset, network, ZCA, augmentation, experts, evaluation and the distillation, of one IPC
    as `distill.*` or of every IPC as `distill.ipc<N>.*` (the pipeline's parent run)."""
    def plain(cfg, *drop: str) -> dict:  # seeds all equal the top-level one
        return {k: v for k, v in asdict(cfg).items() if k not in ("seed", *drop)}

    out = {"seed": p.data.seed, "device": p.device, "data": plain(p.data, "root"),
           "zca": asdict(p.zca), "net": asdict(p.net), "augment": asdict(p.augment),
           "buffers": plain(p.buffers), "evaluate": plain(p.evaluate)}
    if ipc is None:
        out["distill"] = {"ipcs": p.ipcs, **{f"ipc{i}": plain(p.distill(i), "ipc") for i in p.ipcs}}
    else:
        out["distill"] = plain(p.distill(ipc))
    return out


def tracker(stage: str, p: Params, root: str | Path, run_name: str | None = None) -> Tracker:
    """The MLflow run of one stage execution, nested under the pipeline's parent run when DVC
    runs it (datm.tracking)."""
    return Tracker(stage, root, run_name=run_name, settings=settings(p))


def dvc_tracked_warning(root: str | Path, stage: str) -> str | None:
    """A warning after running `stage` by hand when it changed outputs DVC tracks: they now
    differ from what dvc.lock records, `dvc status` reports the stage changed, and `dvc
    checkout` refuses to replace them without --force. None when DVC does not track them or
    they are what dvc.lock records (a file's md5; a folder counts as changed)."""
    import hashlib

    import yaml

    root = Path(root)
    try:
        stages = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages") or {}
        outs = (stages.get(stage) or {}).get("outs") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    changed = []
    for out in outs:
        path = root / str(out.get("path", "")) if isinstance(out, dict) else None
        if path is None or not path.exists():
            continue
        if path.is_file():
            digest = hashlib.md5()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            if out.get("md5") == digest.hexdigest():
                continue
        changed.append(str(out["path"]))
    if not changed:
        return None
    return (f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} tracked by DVC "
            f"(stage {stage}) and now differ{'s' if len(changed) == 1 else ''} from dvc.lock: "
            f"`dvc commit {stage}` records this version (or let `dvc repro` run the stage); "
            "until then `dvc status` reports it changed and `dvc checkout` refuses to "
            "overwrite it without --force")


def guarded(fn: Callable[[], object]) -> int:
    """Run a stage: user errors print one line and exit 2; Ctrl-C exits 130 (resume later).

    DATM_DEBUG=1 shows the traceback instead.
    """
    try:
        fn()
    except UserError as exc:
        if os.environ.get("DATM_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] run the same command again to resume")
        return 130
    return 0


def main(fn: Callable[[], object]) -> None:
    sys.exit(guarded(fn))


@contextmanager
def progress_bar() -> Iterator[Progress]:
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, transient=False, refresh_per_second=4)
    with bar:
        yield bar
