"""Running a stage as several processes: one torchrun launch on this machine.

A stage whose count in params.yaml's `launch` section (or DATM_RANKS) is W > 1 runs as W
processes of one torchrun launch (`start`); a process that torchrun started (by us, or by a user
on several machines) is one rank of a torch.distributed group. Rank 0 alone writes metrics and
results, logs to MLflow and prints. The outputs are the same for any W at the same threads per
process (datm/distributed.py says why); on a CPU W changes the threads per process, hence the
rounding, so launch.<stage> is a DVC param of the stage.

`python -m stages.launch TORCHRUN-ARGS` is that launch: torchrun whose failures end as the
failed rank's exit code (a user error 2, Ctrl-C 130) instead of torchrun's report and 1.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as torch_dist
from rich.markup import escape

from datm import artifacts, interrupts
from datm.config import Params
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
from stages import LAUNCHER_ENV, STARTER_ENV
from stages.common import (
    ERRORS_ENV,
    INTERRUPTED,
    TERMINATED,
    console,
    guarded,
    load,
    rank,
    refused,
    report,
    stopped,
)

RANKS_ENV = "DATM_RANKS"             # processes per stage, for stages run by hand (not DVC)
OWN_LAUNCH_ENV = "DATM_OWN_LAUNCH"   # set for the ranks of `torchrun` below
TIMEOUT_ENV = "DATM_DIST_TIMEOUT_S"  # how long a rank waits for the others in a collective
PEERS_LOST = "lost the other processes"  # a rank's line when a peer died: a consequence, not a cause


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
    console.quiet = rank() != 0
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
                f"{PEERS_LOST} ({_peer_lost(exc)}): one of them died or hung; run "
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
    (`python -m stages.launch`, a subprocess); its exit code.

    SIGINT and SIGTERM sent to this process go to the launch (in a process group of its own,
    so a Ctrl-C reaches it once), which hands them to the ranks: Ctrl-C still ends with 130.
    Each process gets an equal share of the cores unless OMP_NUM_THREADS says otherwise
    (torchrun itself would give each one thread).
    """
    # STARTER_ENV: the launch ends with this process, even with one killed by SIGKILL
    # (stages/__init__.py), and so do its ranks: none goes on to write a failed stage's outputs.
    env = dict(os.environ, **{OWN_LAUNCH_ENV: "1", STARTER_ENV: str(os.getpid())})
    env.setdefault("OMP_NUM_THREADS", str(core_share(world)))
    cmd = [sys.executable, "-m", "stages.launch", "--standalone", f"--nproc_per_node={world}",
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
        console.print(TERMINATED.format(what=escape(stopped())), highlight=False)
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
    """The launch's one line and exit code when a rank failed (torchrun's ChildFailedError).

    A rank killed by a signal is the cause, and the others' "lost the other processes" only its
    consequence, so its line alone; else the ranks' saved error line; Ctrl-C says nothing. One
    exception: torchrun stops the ranks still running at the first failure with SIGTERM, and a
    rank still starting up dies of it, so beside a rank's own error (a saved line that is not
    a lost peer) a rank killed by SIGTERM is that stop, not a cause.
    """
    saved = _saved_errors(errors)
    failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
    if _own_error_ranks(saved):
        failures = [(r, f) for r, f in failures if f.exitcode != -signal.SIGTERM] or failures
    killed = [(rank, f) for rank, f in failures if f.exitcode < 0 and f.exitcode != -signal.SIGINT]
    rank, failure = killed[0] if killed else failures[0]
    if not killed:
        _report_rank_errors(saved)
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


def _saved_errors(errors: Path) -> dict[int, str]:
    """The error lines the ranks saved, by rank (one torchrun stopped while saving is absent)."""
    return {int(path.stem.removeprefix("rank")): path.read_text()
            for path in errors.glob("rank*.err")}


def _own_error_ranks(saved: dict[int, str]) -> list[int]:
    """The ranks whose saved line is their own error, not a peer they lost."""
    return [rank for rank, line in saved.items() if not line.startswith(PEERS_LOST)]


def _report_rank_errors(saved: dict[int, str]) -> None:
    """One error line for a launch: the first rank's own error (rank 0's when it has one), else
    the first rank's lost peer (a user error every rank hit, or a peer lost because rank 0
    stopped, is one line). The ranks save their lines rather than print them: torchrun stops
    the others as soon as one rank fails, so which of them gets to print would be a race."""
    if saved:
        rank = min(_own_error_ranks(saved) or saved)
        prefix = f"rank {rank}: " if rank else ""
        console.print(f"[bold red]error:[/] {prefix}{escape(saved[rank])}", highlight=False)


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
