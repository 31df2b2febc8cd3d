"""What every stage shares: argument parsing, params loading, the tracker, error reporting,
progress bars. Running a stage as several processes is stages/launch.py.

A stage is `python -m stages.<name>` (DVC runs that) or `datm <name>` (the CLI calls the same
`run` function). User mistakes end as one line on stderr and exit code 2, never a traceback.

Every way a stage ends badly ends in one line (`guarded`): a user error or a disk that refuses
a write (exit 2), Ctrl-C (130), SIGTERM (143), a rank or the launch killed (128 + the signal,
said by the process that started it). Only a kill -9 of the stage process itself ends silently:
SIGKILL cannot be caught, and what started it (a shell, DVC) reports the exit code.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from datm import artifacts, interrupts
from datm.compiled import compiler_missing
from datm.config import Params, Paths, load_params
from datm.distributed import (
    SINGLE,
    Group,
    launched,
)
from datm.errors import UserError
from datm.tracking import Tracker

# soft_wrap: rich would otherwise wrap at 80 columns when stderr is a pipe (DVC, CI), turning
# the one-line error into several.
console = Console(stderr=True, soft_wrap=True)
ERRORS_ENV = "DATM_RANK_ERRORS"      # where datm's own launch collects ranks' error lines
INTERRUPTED = "[yellow]interrupted:[/] run the same command again to resume"
TERMINATED = ("[yellow]terminated (SIGTERM):[/] {what} stopped; finished work is kept: run the "
              "same command again to resume")


def parse(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--root", default=".", help="project root holding data/ and artifacts/")
    if extra:
        extra(parser)
    return parser.parse_args()


def load(params: str | Path, warn: bool = True) -> Params:
    """The profile as this machine can run it: `compile` off, with one warning line (rank 0's;
    `warn` off for the launcher's own look at the profile), where torch.compile cannot build
    its kernels; the experts and the evaluations then record that they trained eager."""
    p = load_params(params)
    if p.wants_compile and (why := compiler_missing()):
        if warn and os.environ.get("RANK", "0") == "0":
            console.print(f"[yellow]warning:[/] {params} asks for torch.compile, but {why}: "
                          "training without it (the same training, slower, other float "
                          "rounding); scripts/setup.sh installs g++ and python3-dev")
        p = p.without_compile()
    return p


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


def tracker(stage: str, p: Params, root: str | Path, run_name: str | None = None,
            group: Group = SINGLE) -> AbstractContextManager[Tracker]:
    """The MLflow run of one stage execution, nested under the pipeline's parent run when DVC
    runs it (datm.tracking). On a rank other than 0 an inactive Tracker (never entered, so
    every call is a no-op): one run per stage execution, however many processes."""
    run = Tracker(stage, root, run_name=run_name, settings=settings(p))
    return run if group.is_main else nullcontext(run)


def dvc_tracked_warning(root: str | Path, stage: str) -> str | None:
    """A warning after running `stage` by hand when it changed outputs DVC tracks: they now
    differ from what dvc.lock records, `dvc status` reports the stage changed, and `dvc
    checkout` refuses to replace them without --force. None when DVC does not track them or
    they are what dvc.lock records (a file's md5; a folder's files against DVC's record)."""
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
        if path.is_file() and out.get("md5") == _md5(path):
            continue
        if path.is_dir() and _same_folder(root, path, str(out.get("md5", ""))):
            continue
        changed.append(str(out["path"]))
    if not changed:
        return None
    return (f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} tracked by DVC "
            f"(stage {stage}) and now differ{'s' if len(changed) == 1 else ''} from dvc.lock: "
            f"`dvc commit {stage}` records this version (or let `dvc repro` run the stage); "
            "until then `dvc status` reports it changed and `dvc checkout` refuses to "
            "overwrite it without --force")


def _md5(path: Path) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_folder(root: Path, folder: Path, dir_md5: str) -> bool:
    """Whether `folder` holds exactly the files of DVC's record `dir_md5` ("<md5>.dir"): the
    record's file list lies in DVC's cache (.dvc/cache/files/md5/ab/cdef....dir); without it
    nothing can be compared, and the folder counts as unchanged (no warning we cannot back)."""
    if not dir_md5.endswith(".dir"):
        return False
    record = root / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] / dir_md5[2:]
    try:
        entries = json.loads(record.read_text())
        want = {str(e["relpath"]): str(e["md5"]) for e in entries}
    except (OSError, ValueError, TypeError, KeyError):
        return True
    have = sorted(p for p in folder.rglob("*") if p.is_file())
    if sorted(p.relative_to(folder).as_posix() for p in have) != sorted(want):
        return False
    return all(want[p.relative_to(folder).as_posix()] == _md5(p) for p in have)


def guarded(fn: Callable[[], object], announce: bool = True) -> int:
    """Run a stage: user errors print one line and exit 2, and so does a disk that refuses a
    write (`refused`); Ctrl-C exits 130 (resume later), SIGTERM 143, each saying so unless not
    `announce` (another process says it). Outside a rank SIGTERM is taken from here on (before,
    while the process imports, it ends it silently); a rank's launch reports its end instead.

    DATM_DEBUG=1 shows the traceback instead.
    """
    if not launched():
        interrupts.terminate_gently()
    try:
        # a Ctrl-C held since this process started (stages/__init__.py); the ranks, started
        # with it blocked, hold one through their own start-up in turn
        interrupts.release(children_held=True)
        try:
            fn()
        except (RuntimeError, MemoryError) as exc:
            # settings this machine cannot hold (a network too wide, a batch too large) are
            # the user's to change, not a bug: one line, like any other bad setting
            why = out_of_memory(exc)
            if why is None:
                raise
            raise UserError(why) from exc
        except OSError as exc:  # a full or read-only disk is the machine's, not a bug
            why = refused(exc)
            if why is None:
                raise
            raise UserError(why) from exc
    except UserError as exc:
        if os.environ.get("DATM_DEBUG"):
            raise
        return report(exc)
    except interrupts.Terminated:
        if announce:
            console.print(TERMINATED.format(what=escape(stopped())), highlight=False)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        if announce:
            console.print(INTERRUPTED)
        return 130
    return 0


def rank() -> int:
    """This process's rank when torchrun started it, else 0 (its error lines say it)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def report(exc: UserError) -> int:
    """Print a user error's one line (a rank under datm's launch saves it instead); exit 2."""
    message = escape(str(exc))  # e.g. gloo's "[.../pair.cc:545] ..." is not markup
    errors = os.environ.get(ERRORS_ENV)
    if errors:  # datm's own launch prints one line for all ranks, once they have ended
        # whole or absent should torchrun stop this rank while it writes
        try:
            with artifacts.atomic_path(Path(errors, f"rank{rank()}.err")) as partial:
                partial.write_text(str(exc))
            return 2
        except OSError:  # a full temp dir: the line goes straight to stderr
            pass
    if rank():  # the console of ranks other than 0 is quiet; an error must still show
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/] rank {rank()}: {message}", highlight=False)
    else:
        console.print(f"[bold red]error:[/] {message}", highlight=False)
    return 2


def stopped() -> str:
    """What a SIGTERM stopped, for its line: DVC's stage, `datm <command>` or the stage module."""
    if os.environ.get("DVC_STAGE"):
        return f"stage {os.environ['DVC_STAGE']}"
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "datm"
    return f"datm {sys.argv[1]}" if name == "datm" and len(sys.argv) > 1 else name


# What to do when the machine refuses a file operation, by errno (`refused`); others are bugs.
_WRITES = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space within your quota",
           errno.EFBIG: "the file system takes no file this large: use another (--root)",
           errno.EROFS: "the file system is read-only: run where datm may write (--root), or "
                        "remount it writable"}
_ACCESS = {errno.EACCES: "give this user access to it", errno.EPERM: "give this user access to it",
           errno.EIO: "the disk reported an I/O error: check it",
           errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
           errno.ENFILE: "too many open files on this machine: close some"}


def refused(exc: OSError) -> str | None:
    """The one line for an OSError the machine caused (a full or read-only disk, no permission,
    a failing disk): the path, why and what to do; None for any other OSError (a bug)."""
    advice = _WRITES.get(exc.errno) or _ACCESS.get(exc.errno)
    if advice is None:
        return None
    where = exc.filename2 or exc.filename  # a rename names its destination second
    verb = "write" if exc.errno in _WRITES else "use"
    what = f"cannot {verb} {where}" if where else f"cannot {verb} a file"
    return (f"{what}: {exc.strerror or os.strerror(exc.errno)}: {advice}, then run the same "
            "command again (finished work is kept)")


def out_of_memory(exc: BaseException) -> str | None:
    """The one line for an allocation that failed (torch's CPU allocator, a CUDA or MPS
    out-of-memory, Python's MemoryError); None for any other error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    return (f"out of memory: {text or type(exc).__name__} (lower net.width, a batch size or "
            "the processes per stage in `launch`, or use a machine with more memory)")


def main(fn: Callable[[], object]) -> None:
    sys.exit(guarded(fn))


@contextmanager
def progress_bar() -> Iterator[Progress]:
    """A progress display; none on ranks other than 0 (their console is quiet)."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, transient=False, refresh_per_second=4,
                   disable=console.quiet)
    bar.start()
    try:
        yield bar
    except BaseException:
        # A stage that fails (or is interrupted) says why in one line; its bar, left where the
        # work stopped, would stand above it: the bar goes (a finished one stays). Not
        # bar.stop(): on a pipe it ends the bar's line, which would leave an empty one.
        bar.live.transient = True
        bar.live.stop()
        raise
    bar.stop()
