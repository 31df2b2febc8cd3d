"""The pipeline's stages: each is `python -m stages.<name>` (what dvc.yaml runs), with the
functions the `datm` CLI calls; stages/common.py has what they share, stages/launch.py runs
one as several processes."""

import os
import signal
import sys

# Under datm's own launch (stages.launch.torchrun) each process names the pid of the process
# that started it: the launch (`python -m stages.launch`) its stage process, a rank the launch.
STARTER_ENV = "DATM_STARTER_PID"    # for the launch, set by its stage process
LAUNCHER_ENV = "DATM_LAUNCHER_PID"  # for the ranks, set by the launch


def _tie_to_parent(variable: str, signum: int) -> None:
    """End this process (`signum`) when the process named in `variable` does, the process that
    started it: a kill -9 of `datm` or of DVC's stage process must not leave a launch that
    goes on to write outputs of a stage that failed.

    The parent-death signal is armed first (Linux), then the parent checked: one that died
    before could not send it. The variable goes, so that no process further down inherits it.
    """
    parent = os.environ.pop(variable, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signum)  # PR_SET_PDEATHSIG: sent when the parent thread ends
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # reparented: the starter is gone already
        os._exit(128 + signum)


def _tie_to_dvc() -> None:
    """End this stage process (SIGTERM, which ends its launch and ranks in turn) when the
    `dvc repro` that started it ends: DVC has no way to take its stage with it after a kill -9,
    and a stage that goes on writes the outputs of a run that failed.

    DVC runs `$SHELL -c CMD`; bash and dash exec a lone command, so DVC is the parent. Where a
    shell stays in between, a watcher thread ends the stage once that shell is reparented.
    """
    if "DVC_STAGE" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/comm") as f:
            name = f.read().strip()
    except OSError:
        return
    if name not in {"sh", "bash", "dash", "zsh", "fish", "ksh"}:
        os.environ[STARTER_ENV] = str(parent)
        _tie_to_parent(STARTER_ENV, signal.SIGTERM)
        return
    grandparent = _parent_of(parent)

    def watch() -> None:
        import time

        while _parent_of(parent) == grandparent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    import threading

    threading.Thread(target=watch, name="datm-dvc-watch", daemon=True).start()


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid`, None once it is gone (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# `python -m stages.<name>` imports this package while sys.argv[0] is still "-m": the start of
# a stage process (DVC's, the launch, or a rank), before its imports (seconds of torch).
if sys.argv[:1] == ["-m"]:
    # A stage process DVC started (not a launch or a rank: they name their starter)
    if STARTER_ENV not in os.environ and LAUNCHER_ENV not in os.environ:
        _tie_to_dvc()
    # The launch on its starter's death: SIGTERM, which torchrun hands to the ranks (before
    # torchrun runs, its default action ends the launch, which has no ranks yet). A rank on
    # the launch's death: SIGKILL, which nothing can catch or delay; its outputs are written
    # to a temp file and renamed, so a kill leaves no half-written result.
    _tie_to_parent(STARTER_ENV, signal.SIGTERM)
    _tie_to_parent(LAUNCHER_ENV, signal.SIGKILL)

    from datm import interrupts

    # A Ctrl-C during the imports would abort inside torch's C++ start-up or print a
    # traceback; it is held until the stage's work starts (stages.common.guarded), which ends
    # it with exit 130 and one line.
    interrupts.hold()
