"""A stage on several processes ends whole: kill -9 of the process that started the launch (`datm`,
or DVC's stage process) ends the torchrun launch and its ranks, at any moment, and so does kill -9
of the launch for its ranks (stages/__init__.py). Before, a launch killed while it imported torch
went on, and its ranks wrote the result of a stage that had failed with 137.

Every process of a launch carries a marker in its environment, which finds them wherever they
were reparented; the processes left over by a failing check are killed, so that none runs on.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import helpers
import psutil
import pytest

from datm.config import Paths
from stages import LAUNCHER_ENV, STARTER_ENV

MARK_ENV = "DATM_TEST_LAUNCH"
GONE_WITHIN = 15  # seconds from the kill until no process of the launch is left (busy 2 cores)
WAIT = 240        # for a phase of the launch to begin


def marked(mark: str) -> list[psutil.Process]:
    """The live processes of one launch, by their environment's marker."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARK_ENV) == mark:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def role(proc: psutil.Process) -> str:
    """`rank`, `launch` (torchrun's, `python -m stages.launch`) or `stage` (what started it)."""
    try:
        if "LOCAL_RANK" in proc.environ():
            return "rank"
        return "launch" if "stages.launch" in proc.cmdline() else "stage"
    except psutil.Error:
        return "gone"


def in_phase(mark: str, phase: str, checkpoint: Path) -> bool:
    """`launch`: the torchrun launch has started; `ranks`: both ranks have; `distilling`: the
    first checkpoint is on disk."""
    if phase == "distilling":
        return checkpoint.exists()
    roles = [role(p) for p in marked(mark)]
    return roles.count("rank") == 2 if phase == "ranks" else "launch" in roles


def left_over(mark: str) -> list[str]:
    """What of the launch outlives the kill by GONE_WITHIN seconds (then killed, not left)."""
    helpers.wait_for(lambda: not marked(mark), GONE_WITHIN, every=0.1)
    left = marked(mark)
    names = sorted(f"{role(p)} {p.pid}" for p in left)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return names


def victim(mark: str, proc: subprocess.Popen, which: str) -> int:
    """The pid to kill: `started` (the process started here), the `launch`, or the `stage`
    process that started the launch (under DVC not the process started here)."""
    if which == "started":
        return proc.pid
    launch = next((p for p in marked(mark) if role(p) == "launch"), None)
    assert launch is not None, "no launch to kill"
    return launch.ppid() if which == "stage" else launch.pid


def kill_at(args: list[str], project: Path, phase: str, delay: float, which: str,
            checkpoint: Path, **env: str) -> tuple[int, str, list[str]]:
    """Start `args` in `project`, wait for `phase`, then `delay` seconds, and kill -9 `which`
    (see `victim`): the exit code of the process started here, its output, and what was left
    of the launch."""
    shutil.rmtree(checkpoint.parent, ignore_errors=True)  # distilling: this try's checkpoint
    mark = uuid.uuid4().hex
    log = project / f"run_{mark}.log"
    proc = helpers.start(args, project, log, **{MARK_ENV: mark}, **env)
    try:
        if phase != "start":
            reached = helpers.wait_for(lambda: in_phase(mark, phase, checkpoint), WAIT, proc=proc)
            assert reached, f"never reached {phase}:\n{log.read_text()}"
        time.sleep(delay)
        psutil.Process(victim(mark, proc, which)).kill()
    finally:  # whatever happened, no process of this launch runs on
        code = helpers.finish(proc, timeout=60)
        left = left_over(mark)
    return code, log.read_text(), left


def distill_project(root: Path, launch: int = 1) -> Paths:
    """A tiny project whose distillation of IPC 2 would run for hours, a checkpoint a step."""
    raw = helpers.tiny_params()
    raw["distill"]["defaults"].update({"iterations": 100_000, "checkpoint_every": 1})
    raw["launch"]["distill"] = launch
    return helpers.tiny_project(root, raw)


@pytest.mark.parametrize("variable, signum", [(STARTER_ENV, signal.SIGTERM),
                                              (LAUNCHER_ENV, signal.SIGKILL)])
def test_a_stage_process_whose_starter_is_gone_ends_before_its_imports(variable, signum):
    """The starter died before the process could arm its parent-death signal: its parent is
    another process by then. It ends at once, as if that signal had come."""
    never_a_pid = str(2**32)  # above any pid_max: whoever the parent is, not this one
    result = subprocess.run([sys.executable, "-m", "stages.launch", "--help"], capture_output=True,
                            text=True, env=helpers.stage_env(**{variable: never_a_pid}), timeout=60)
    assert result.returncode == 128 + signum, helpers.describe(result)
    assert result.stdout == result.stderr == "", helpers.describe(result)


# kill moments: while `datm` imports (no launch yet); while the launch imports torch (the window
# the fix closed); while the ranks import, connect and load; while they distill
STARTER_MOMENTS = [("start", 0.05), ("launch", 0.0), ("launch", 0.3), ("launch", 1.0),
                   ("ranks", 0.0), ("ranks", 1.5), ("distilling", 0.2)]
LAUNCH_MOMENTS = [("ranks", 0.0), ("distilling", 0.2)]


@pytest.mark.slow
def test_kill_9_of_datm_or_of_its_launch_at_any_moment_leaves_no_process(tmp_path):
    paths = distill_project(tmp_path / "project")
    cmd = [helpers.DATM, "distill", "--ipc", "2"]
    failures = {}
    tries = [("started", *m) for m in STARTER_MOMENTS] + [("launch", *m) for m in LAUNCH_MOMENTS]
    for which, phase, delay in tries:
        code, log, left = kill_at(cmd, tmp_path / "project", phase, delay, which,
                                  paths.checkpoint(2), DATM_RANKS="2")
        if left or paths.distilled(2).exists() or code == 0:
            failures[(which, phase, delay)] = (code, left, log[-2000:])
    assert not failures, failures
    assert not paths.distilled(2).exists()


@pytest.mark.slow
def test_kill_9_of_the_stage_process_dvc_started_leaves_no_process(tmp_path):
    """`dvc repro` of distill@2 on 2 processes (launch.distill): the stage process DVC started
    is killed while its launch imports torch; the stage fails and nothing writes its output."""
    root = helpers.copy_project(tmp_path / "project")
    paths = distill_project(root, launch=2)
    cmd = [helpers.DVC, "repro", "--single-item", "distill@2"]
    code, log, left = kill_at(cmd, root, "launch", 0.3, "stage", paths.checkpoint(2))
    assert not left, (left, log)
    assert code != 0 and "failed to reproduce 'distill@2'" in log, (code, log)
    assert not paths.distilled(2).exists(), log


@pytest.mark.slow
@pytest.mark.parametrize("launch, phase, delay", [(2, "launch", 0.3), (2, "distilling", 0.2),
                                                  (1, "distilling", 0.2)])
def test_kill_9_of_dvc_repro_ends_its_stage_and_ranks(tmp_path, launch, phase, delay):
    """kill -9 of `dvc repro` itself: DVC cannot take its stage with it, so the stage process
    watches DVC (stages/__init__.py) and ends, with its launch and ranks; before, they ran on and
    wrote the output of a run that had failed."""
    root = helpers.copy_project(tmp_path / "project")
    paths = distill_project(root, launch=launch)
    cmd = [helpers.DVC, "repro", "--single-item", "distill@2"]
    code, log, left = kill_at(cmd, root, phase, delay, "started", paths.checkpoint(2))
    assert code == -signal.SIGKILL, (code, log)
    assert not left, (left, log)
    assert not paths.distilled(2).exists(), log
