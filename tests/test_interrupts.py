"""Ctrl-C at awkward moments (datm.interrupts): inside safetensors' reader it is an interrupt,
not a damaged file; during a stage's start-up it waits for the stage; in a native wait it ends
the process. The end-to-end checks send SIGINT to real stage processes at many moments."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch
from helpers import start

from datm import artifacts, experts, interrupts

PYTHON = sys.executable


@pytest.fixture(autouse=True)
def python_sigint():
    """Python's own SIGINT handler, whatever pytest was started with (a background job
    inherits SIGINT ignored); put back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_in_a_deferred_block_replaces_the_error_it_caused():
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            ctrl_c()
            ran.append("after the signal")  # the block is not cut short
            raise TypeError("what a native reader makes of an interrupt")
    assert ran == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_in_a_deferred_block_without_error_is_raised_at_its_end():
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            ctrl_c()
            ran.append("done")
    assert ran == ["done"]


def test_a_deferred_block_without_ctrl_c_keeps_its_own_error():
    with pytest.raises(TypeError, match="damaged"):
        with interrupts.deferred():
            raise TypeError("damaged")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deferred_leaves_an_ignored_sigint_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with interrupts.deferred():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        ctrl_c()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_hold_keeps_a_ctrl_c_until_release():
    interrupts.hold()
    try:
        ctrl_c()
        time.sleep(0.05)  # Python would have raised by now
    except KeyboardInterrupt:
        interrupts.release()
        pytest.fail("raised while held")
    with pytest.raises(KeyboardInterrupt):
        interrupts.release()
    interrupts.release()  # no hold: nothing to do


def test_fatal_ends_the_process_on_ctrl_c():
    code = ("import os, signal\nfrom datm import interrupts\n"
            "with interrupts.fatal():\n    os.kill(os.getpid(), signal.SIGINT)\n"
            "    import time; time.sleep(5)\nprint('survived')")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60,
                            env=helpers.stage_env(), preexec_fn=helpers.default_sigint)
    assert result.returncode == -signal.SIGINT, helpers.describe(result)
    assert "survived" not in result.stdout


# --- safetensors' reader -------------------------------------------------------------------------

def interrupted_reads(read, tries: int = 300) -> dict[str, int]:
    """Run `read` repeatedly with a Ctrl-C timed to land at ~100 points inside it (an interval
    timer whose handler sends SIGINT, as a terminal would); what each try ended with."""
    outcomes: dict[str, int] = {}
    armed = [False]

    def alarm(*_: object) -> None:
        if armed[0]:  # a timer that fired as the try ended sends nothing once it is disarmed
            ctrl_c()

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        for i in range(tries):
            try:
                outcome = one_interrupted_read(read, armed, 1e-5 + 2e-5 * (i % 100))
            except KeyboardInterrupt:  # sent just as the reads ended, raised while disarming
                outcome = "interrupted"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return outcomes


def one_interrupted_read(read, armed: list[bool], delay: float) -> str:
    armed[0] = True
    signal.setitimer(signal.ITIMER_REAL, delay)
    try:
        for _ in range(30):
            read()
        return "finished"
    except KeyboardInterrupt:
        return "interrupted"
    except artifacts.ArtifactError as exc:
        return f"ArtifactError: {exc}"
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)


@pytest.mark.parametrize("reader", ["load", "load_rows", "read_meta"])
def test_a_ctrl_c_inside_safetensors_reader_is_an_interrupt_not_a_damaged_file(tmp_path, reader):
    """Without `deferred`, ~15 % of these interrupts came out of safetensors as "could not
    determine the shape of object type 'torch.storage.UntypedStorage'": a corrupt artifact."""
    path = artifacts.save(tmp_path / "expert.safetensors",
                          {"trajectory": torch.randn(8, 2000)}, experts.KIND)
    read = {"load": lambda: artifacts.load(path),
            "load_rows": lambda: artifacts.load_rows(path, "trajectory", [1, 5]),
            "read_meta": lambda: artifacts.read_meta(path)}[reader]
    outcomes = interrupted_reads(read)
    assert set(outcomes) <= {"finished", "interrupted"}, outcomes
    assert outcomes.get("interrupted", 0) > 0, outcomes  # the timer did land inside reads
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_inside_a_write_is_an_interrupt_and_leaves_the_previous_artifact(tmp_path,
                                                                                 monkeypatch):
    path = tmp_path / "a.safetensors"
    artifacts.save(path, {"x": torch.zeros(4)}, "test")

    def interrupted_save_file(*args, **kwargs):
        try:  # as safetensors' Rust does, the writer turns a Ctrl-C in it into another error
            ctrl_c()
            time.sleep(0.01)
        except KeyboardInterrupt:
            pass
        raise RuntimeError("I/O error")

    monkeypatch.setattr(artifacts, "save_file", interrupted_save_file)
    with pytest.raises(KeyboardInterrupt):
        artifacts.save(path, {"x": torch.ones(4)}, "test")
    assert artifacts.load(path)[0]["x"].tolist() == [0.0] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temp left


# --- real stage processes ------------------------------------------------------------------------

def interrupt_at(args: list[str], cwd: Path, log: Path, delay: float) -> tuple[int, str]:
    proc = start(args, cwd, log)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
    finally:
        code = helpers.finish(proc, timeout=120)
    return code, log.read_text()


def assert_one_interrupted_line(code: int, log: str, when: str = "") -> None:
    assert code == 130, f"{when}{log}"
    assert "Traceback" not in log and "error:" not in log, f"{when}{log}"
    lines = [line for line in log.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), f"{when}{log}"


@pytest.mark.slow
def test_a_ctrl_c_while_a_stage_imports_torch_is_130_and_one_line(tmp_path):
    """SIGINT 0.2 s after start: the stage process is still importing (torch takes seconds)."""
    helpers.tiny_project(tmp_path, helpers.tiny_params(), experts=False)
    (tmp_path / "artifacts" / "zca.safetensors").unlink()
    code, log = interrupt_at([PYTHON, "-m", "stages.zca"], tmp_path, tmp_path / "run.log", 0.2)
    assert_one_interrupted_line(code, log)
    assert not (tmp_path / "artifacts" / "zca.safetensors").exists()


@pytest.mark.slow
def test_a_ctrl_c_at_any_moment_of_a_two_process_distill_is_130_and_one_line(tmp_path):
    """`datm distill` on 2 processes, interrupted while datm starts, while the launch and the
    ranks start, while they connect and load the experts, and while they distill. Before
    datm.interrupts a Ctrl-C here could end as a traceback, an abort (134), a 'corrupt
    artifact' (2), or 30 s of waiting for a rank stuck connecting to one that had gone."""
    raw = helpers.tiny_params()
    raw["buffers"].update({"num_experts": 2, "epochs": 40, "batch": 16})  # longer loads
    raw["distill"]["defaults"].update({"iterations": 100_000, "checkpoint_every": 1})
    raw["launch"]["distill"] = 2
    paths = helpers.tiny_project(tmp_path / "project", raw)
    for delay in (0.3, 1.5, 2.5, 3.5, 4.5, 6.0):
        shutil.rmtree(paths.checkpoint(2).parent, ignore_errors=True)
        began = time.monotonic()
        code, log = interrupt_at([helpers.DATM, "distill", "--ipc", "2"], tmp_path / "project",
                                 tmp_path / f"run_{delay}.log", delay)
        assert_one_interrupted_line(code, log, when=f"SIGINT {delay} s after the start:\n")
        assert time.monotonic() - began < delay + 20, f"slow to stop after {delay} s:\n{log}"
        assert not paths.distilled(2).exists()


SLOW_RANK_START = """import os
if "DATM_LAUNCHER_PID" in os.environ:  # a rank: its Python start-up slow, as on a busy machine
    import time
    for _ in range(30):
        time.sleep(0.05)
        import json  # noqa: F401  (an import, where a KeyboardInterrupt would be a traceback)
"""


@pytest.mark.slow
def test_a_ctrl_c_while_the_ranks_start_python_is_130_and_one_line(tmp_path):
    """The ranks' Python start-up (site, .pth files) runs before stages/__init__.py can hold a
    Ctrl-C; made 1.5 s long here, as a loaded CI machine makes it. The launch starts them with
    SIGINT blocked: before, torchrun handed them the Ctrl-C and one printed a traceback."""
    raw = helpers.tiny_params()
    raw["launch"]["distill"] = 2
    paths = helpers.tiny_project(tmp_path / "project", raw)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_RANK_START)
    env = helpers.base_env(PYTHONPATH=f"{site}{os.pathsep}{helpers.REPO}")
    for delay in (2.5, 3.5):
        log = tmp_path / f"run_{delay}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([helpers.DATM, "distill", "--ipc", "2"],
                                    cwd=tmp_path / "project", stdout=out,
                                    stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=helpers.default_sigint)
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
        finally:
            code = helpers.finish(proc, timeout=120)
        assert_one_interrupted_line(code, log.read_text(), when=f"SIGINT {delay} s after:\n")
        assert not paths.distilled(2).exists()


def test_a_ctrl_c_between_a_commands_guarded_steps_is_130_and_one_line(monkeypatch):
    """A Ctrl-C that leaves a command (one while it imports its stage, or before a launch has
    taken the signal over) ends as a guarded step ends one. Typer alone turns it into exit
    130 without a word: a user could not tell an interrupt from any other silent end."""
    from typer.testing import CliRunner

    from cli.main import app
    from stages import distill

    def interrupted(*_args, **_kwargs) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "start", interrupted)
    result = CliRunner().invoke(app, ["distill", "--ipc", "2"])
    assert_one_interrupted_line(result.exit_code, result.output)
