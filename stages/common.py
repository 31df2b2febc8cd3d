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
