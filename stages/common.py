"""What every stage shares: argument parsing, params loading, error reporting, progress bars.

A stage is `python -m stages.<name>` (DVC runs that) or `datm <name>` (the CLI calls the same
`run` function). User mistakes end as one line on stderr and exit code 2, never a traceback.

Scale-out (`start`): a stage whose count in params.yaml's `launch` section (or DATM_RANKS) is
W > 1 runs as W processes of one torchrun launch on this machine; a process that torchrun
started (by us, or by a user on several machines) is one rank of a torch.distributed group.
Rank 0 alone writes metrics and results, logs to MLflow and prints. The outputs are the same
for any W at the same threads per process (datm/distributed.py says why); on a CPU W changes
the threads per process, hence the rounding, so launch.<stage> is a DVC param of the stage.

`python -m stages.common TORCHRUN-ARGS` is that launch: torchrun whose failures end as the
failed rank's exit code (a user error 2, Ctrl-C 130) instead of torchrun's report and 1.

Every way a stage ends badly ends in one line (`guarded`): a user error or a disk that refuses
a write (exit 2), Ctrl-C (130), SIGTERM (143), a rank or the launch killed (128 + the signal,
said by the process that started it). Only a kill -9 of the stage process itself ends silently:
SIGKILL cannot be caught, and what started it (a shell, DVC) reports the exit code.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch.distributed as torch_dist
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
from datm.config import Params, Paths, compiler_missing, load_params
from datm.distributed import (
    DEFAULT_TIMEOUT_S,
    SINGLE,
    DistributedError,
    Group,
    cores,
    init_from_env,
    launched,
)
from datm.errors import UserError
from datm.tracking import Tracker
from stages import LAUNCHER_ENV, STARTER_ENV

# soft_wrap: rich would otherwise wrap at 80 columns when stderr is a pipe (DVC, CI), turning
# the one-line error into several.
console = Console(stderr=True, soft_wrap=True)
RANKS_ENV = "DATM_RANKS"             # processes per stage, for stages run by hand (not DVC)
OWN_LAUNCH_ENV = "DATM_OWN_LAUNCH"   # set for the ranks of `torchrun` below
TIMEOUT_ENV = "DATM_DIST_TIMEOUT_S"  # how long a rank waits for the others in a collective
ERRORS_ENV = "DATM_RANK_ERRORS"      # where datm's own launch collects ranks' error lines
INTERRUPTED = "[yellow]interrupted:[/] run the same command again to resume"
TERMINATED = ("[yellow]terminated (SIGTERM):[/] {what} stopped; finished work is kept: run the "
              "same command again to resume")
_rank = 0  # this process's rank when torchrun started it (its error lines say so)


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
            console.print(TERMINATED.format(what=escape(_stopped())), highlight=False)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        if announce:
            console.print(INTERRUPTED)
        return 130
    return 0


def report(exc: UserError) -> int:
    """Print a user error's one line (a rank under datm's launch saves it instead); exit 2."""
    message = escape(str(exc))  # e.g. gloo's "[.../pair.cc:545] ..." is not markup
    errors = os.environ.get(ERRORS_ENV)
    if errors:  # datm's own launch prints one line for all ranks, once they have ended
        # whole or absent should torchrun stop this rank while it writes
        try:
            with artifacts.atomic_path(Path(errors, f"rank{_rank}.err")) as partial:
                partial.write_text(str(exc))
            return 2
        except OSError:  # a full temp dir: the line goes straight to stderr
            pass
    if _rank:  # the console of ranks other than 0 is quiet; an error must still show
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/] rank {_rank}: {message}", highlight=False)
    else:
        console.print(f"[bold red]error:[/] {message}", highlight=False)
    return 2


def _stopped() -> str:
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


# --- several processes: torchrun -----------------------------------------------------------------

def processes(launch: str, params: str | Path,
              most: Callable[[Params], int] | None = None) -> int:
    """How many processes run a stage on this machine: DATM_RANKS if set, else the stage's
    `launch.<launch>` in params.yaml; never more than `most(params)`, what the stage can use
    (its evaluation models, its expert batches; 1 where its work does not split)."""
    p = load(params, warn=False)
    raw = os.environ.get(RANKS_ENV, "").strip()
    if raw:
        if os.environ.get("DVC_STAGE"):
            # dvc.lock records launch.<stage> from params.yaml: on a CPU the threads per process
            # (cores / processes) change the float rounding that training amplifies, so a
            # layout DVC does not see would leave it a record of other bytes.
            raise UserError(f"{RANKS_ENV} does not apply under DVC (stage "
                            f"{os.environ['DVC_STAGE']}): set launch.{launch} in params.yaml, "
                            f"which DVC tracks, and unset {RANKS_ENV}")
        try:
            world = int(raw)
        except ValueError:
            world = 0
        if world < 1:
            raise UserError(f"{RANKS_ENV} must be a whole number >= 1 (processes per stage), "
                            f"got {raw!r}")
    else:
        world = getattr(p.launch, launch)
    return max(1, min(world, most(p))) if most else world


def dist_timeout() -> float:
    """DATM_DIST_TIMEOUT_S: seconds a rank waits for the others in a collective before it
    fails (a dead or stuck rank); default datm.distributed.DEFAULT_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return seconds


def start(launch: str, module: str, args: Sequence[str], fn: Callable[[Group], object],
          params: str | Path = "params.yaml",
          most: Callable[[Params], int] | None = None) -> int:
    """Run a stage as its processes; the exit code (see `guarded`).

    * started by torchrun (launched()): this process is one rank, fn(its Group);
    * else W = processes(launch, params, most) > 1: `python -m module args` as W processes of
      one torchrun launch on this machine (a subprocess; `torchrun`);
    * else fn(SINGLE) in this process, as without torch.distributed.
    """
    if launched():
        return _as_rank(fn, params)
    world = 1

    def count() -> None:
        nonlocal world
        world = processes(launch, params, most)
        if world > 1:
            dist_timeout()  # a bad value: one line here, not one per rank

    code = guarded(count)  # a bad params file or DATM_RANKS: one line here, no launch
    if code:
        return code
    if world == 1:
        return guarded(lambda: fn(SINGLE))
    return torchrun(world, module, args)


def _as_rank(fn: Callable[[Group], object], params: str | Path) -> int:
    """fn(group) as the rank torchrun's variables name; only rank 0 prints."""
    global _rank
    _rank = int(os.environ.get("RANK", "0"))
    console.quiet = _rank != 0
    group = SINGLE

    def go() -> None:
        nonlocal group
        device, timeout_s = load(params, warn=False).torch_device(), dist_timeout()
        try:
            # Connecting waits in gloo's C++ for every peer, even one a Ctrl-C already ended,
            # and Python cannot raise there: a Ctrl-C ends this process at once instead (it
            # has written nothing yet), not after torchrun's 30 s grace.
            with interrupts.fatal():
                group = init_from_env(device, timeout_s=timeout_s)
            fn(group)
        except RuntimeError as exc:  # a peer died or hung: one line, not a traceback
            if not (isinstance(exc, torch_dist.DistError) or "gloo" in str(exc)):
                raise  # a bug: its traceback
            raise DistributedError(
                f"lost the other processes ({_peer_lost(exc)}): one of them died or hung; run "
                "the same command again to resume") from None

    try:
        # Under datm's own launch (`torchrun`) the stage process that started it says
        # "interrupted", once, however the ranks ended.
        return guarded(go, announce=not os.environ.get(OWN_LAUNCH_ENV))
    finally:
        group.close()


def _peer_lost(exc: BaseException) -> str:
    """gloo's reason in a few words: "[.../gloo/transport/tcp/pair.cc:561] Connection closed by
    peer [127.0.0.1]:14211. This is typically caused by ... GLHF!" -> "Connection closed by
    peer [127.0.0.1]:14211"."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first)  # the C++ source line
    return first.split(". ")[0][:200]


def core_share(world: int) -> int:
    """The threads each of `world` processes of a launch gets when OMP_NUM_THREADS is unset."""
    return max(1, cores() // world)


def torchrun(world: int, module: str, args: Sequence[str]) -> int:
    """`python -m module args` as `world` processes of one torchrun launch on this machine
    (`python -m stages.common`, a subprocess); its exit code.

    SIGINT and SIGTERM sent to this process go to the launch (in a process group of its own,
    so a Ctrl-C reaches it once), which hands them to the ranks: Ctrl-C still ends with 130.
    Each process gets an equal share of the cores unless OMP_NUM_THREADS says otherwise
    (torchrun itself would give each one thread).
    """
    # STARTER_ENV: the launch ends with this process, even with one killed by SIGKILL
    # (stages/__init__.py), and so do its ranks: none goes on to write a failed stage's outputs.
    env = dict(os.environ, **{OWN_LAUNCH_ENV: "1", STARTER_ENV: str(os.getpid())})
    env.setdefault("OMP_NUM_THREADS", str(core_share(world)))
    cmd = [sys.executable, "-m", "stages.common", "--standalone", f"--nproc_per_node={world}",
           "-m", module, *args]

    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {}
    # Started with Ctrl-C blocked, the launch holds one until it can take it (stages/__init__.py),
    # and this process hands one on only once `forward` is in place.
    with interrupts.blocked():
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: signals reach only the main thread's handlers
            pass
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _launch_ended(code, received, proc.pid, module)


def _launch_ended(code: int, received: list[int], pid: int, module: str) -> int:
    """The exit code of a stage whose launch ended with `code` (negative: killed by that
    signal), after this process handed it the signals `received`; the stage's one line where
    the launch could not say it (Ctrl-C and SIGTERM: the ranks keep quiet about them)."""
    if code and (signal.SIGTERM in received or code == -signal.SIGTERM):  # to us or the launch
        console.print(TERMINATED.format(what=escape(_stopped())), highlight=False)
        return 128 + signal.SIGTERM
    if code < 0 and code != -signal.SIGINT:  # a kill -9 of the launch: it could say nothing
        console.print(f"[bold red]error:[/] the launch of {module} (pid {pid}) was killed by "
                      f"{_signal_name(-code)}, and its processes with it: run the same command "
                      "again to resume", highlight=False)
    code = 128 - code if code < 0 else code
    if code == 130:  # Ctrl-C, wherever the launch or its ranks were (they keep quiet about it)
        console.print(INTERRUPTED)
    return code


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _launch(argv: list[str]) -> int:
    """torch.distributed.run on `argv` (torchrun's arguments), ending as its first failed
    rank ended: that rank printed why (its error line, or its traceback for a bug); a rank
    killed by a signal gets a line here (`_rank_failed`). No torchrun failure report, no
    traceback. A SIGTERM ends this process by that signal (its stage process says it)."""
    import logging

    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in list(logging.root.manager.loggerDict):  # its warnings: the ranks say it
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    try:
        errors = _errors_folder()
    except OSError as exc:  # a full or read-only temp dir: no launch
        why = refused(exc)
        if why is None:
            raise
        return report(UserError(why))
    terminated = False
    try:
        # a Ctrl-C held since this process started (stages/__init__.py); the ranks, started
        # with it blocked, hold one through their own start-up in turn
        interrupts.release(children_held=True)
        # The ranks end with this process (stages/__init__.py): torchrun starts them from
        # this thread, as its children, with the environment of this process.
        os.environ[LAUNCHER_ENV] = str(os.getpid())
        os.environ[ERRORS_ENV] = errors
        # torchrun's own logs go under the folder removed below: by default it leaves a
        # torchelastic_* folder in the temp dir per launch, ~10 per `dvc repro`
        torch_run.run(torch_run.parse_args(["--log-dir", os.path.join(errors, "torchrun"),
                                            *argv]))
    except ChildFailedError as exc:
        return _rank_failed(exc, Path(errors))
    except SignalException as exc:  # Ctrl-C or a kill: torchrun handed it to the ranks
        # SIGTERM under datm's own launch: end by it, once the ranks have gone, so that the
        # stage process says it in one line, whoever sent it (`_launch_ended`)
        terminated = int(exc.sigval) == signal.SIGTERM and bool(os.environ.get(OWN_LAUNCH_ENV))
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:  # Ctrl-C before torchrun took over the signals: no rank yet
        return 130  # `torchrun`, which started this process, says so
    finally:
        shutil.rmtree(errors, ignore_errors=True)
        if terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
    return 0


def _rank_failed(exc, errors: Path) -> int:
    """The launch's one line and exit code when a rank failed (torchrun's ChildFailedError): a
    rank killed by a signal is the cause, and the others' "lost the other processes" only its
    consequence, so its line alone; else the ranks' saved error line; Ctrl-C says nothing."""
    failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
    killed = [(rank, f) for rank, f in failures if f.exitcode < 0 and f.exitcode != -signal.SIGINT]
    rank, failure = killed[0] if killed else exc.get_first_failure()
    if not killed:
        _report_rank_errors(errors)
    if failure.exitcode == -signal.SIGINT:  # Ctrl-C (interrupts.fatal): `torchrun` says so
        return 130
    if failure.exitcode >= 0:
        return failure.exitcode
    console.print(f"[bold red]error:[/] rank {rank} (pid {failure.pid}) was killed by "
                  f"{_signal_name(-failure.exitcode)}, so the others were stopped: run the same "
                  "command again to resume", highlight=False)
    return 128 - failure.exitcode


def _errors_folder() -> str:
    """A new folder for the error lines of this launch's ranks, named for this process; those
    that launches killed before their clean-up (kill -9) left in the temp dir go first."""
    import tempfile

    prefix = "datm-rank-errors-"
    for old in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        if artifacts.writer_is_dead(old.name.removeprefix(prefix)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}{artifacts.owner_tag()}-")


def _report_rank_errors(errors: Path) -> None:
    """One error line for a launch: rank 0's when it saved one, else the first other rank's (a
    user error every rank hit, or a peer lost because rank 0 stopped, is one line). The ranks
    save their lines rather than print them: torchrun stops the others as soon as one rank
    fails, so which of them gets to print would be a race."""
    saved = {int(path.stem.removeprefix("rank")): path for path in errors.glob("rank*.err")}
    if saved:
        rank = min(saved)
        prefix = f"rank {rank}: " if rank else ""
        console.print(f"[bold red]error:[/] {prefix}{escape(saved[rank].read_text())}",
                      highlight=False)


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
