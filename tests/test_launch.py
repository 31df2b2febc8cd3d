"""Stages as W processes: params.yaml's `launch` section, DATM_RANKS and the torchrun re-exec.

A stage whose count is W > 1 runs its own command again under torchrun (stages/launch.py); its
outputs must be those of one process: experts byte for byte, evaluation metrics equal, a
distilled set equal to float rounding. Each stage run here is a real process on a tiny project
on the CPU (gloo); a 2-process run costs ~5 s more than one (torchrun and two imports of torch).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch
import yaml
from helpers import describe, error_lines, finish, start

from datm import artifacts, pipeline
from datm.config import ConfigError, LaunchConfig, Params, Paths, load_params
from datm.errors import UserError
from stages import launch

PYTHON = sys.executable
TIMEOUT = 240  # a stage run that takes longer hangs


def stage(name: str, *args: str) -> list[str]:
    return [PYTHON, "-m", f"stages.{name}", *args]


def launch_params(**launch: int) -> dict:
    """tiny_params with 3 evaluation models and 3 experts, so that 2 processes share them
    unevenly (model / expert k on process k % 2)."""
    raw = helpers.tiny_params()
    raw["buffers"]["num_experts"] = 3
    raw["evaluate"]["models"] = 3
    raw["launch"] = {"buffers": 1, "baseline": 1, "distill": 1, "evaluate": 1, "decompose": 1,
                     "crossarch": 1, **launch}
    return raw


def run_stage(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return helpers.run(args, cwd=cwd, env=helpers.stage_env(**env), timeout=TIMEOUT)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    return result.stdout + result.stderr


def twin(project: Path, name: str) -> Path:
    """A copy of the project beside it (the same data, ZCA and experts)."""
    return Path(shutil.copytree(project, project.parent / name))


# --- the launch section --------------------------------------------------------------------------

def test_the_launch_section_names_every_stage():
    """DVC's stages depend on launch.<stage>: a params.yaml without one would fail under `dvc
    repro` after the other stages ran, so datm refuses it at once."""
    raw = helpers.tiny_params()
    raw.pop("launch", None)
    with pytest.raises(ConfigError, match="lack the 'launch' section"):
        Params.from_dict(raw)
    raw["launch"] = {"evaluate": 3}
    with pytest.raises(ConfigError, match=r"launch\.buffers"):
        Params.from_dict(raw)
    raw["launch"] = {f: 1 for f in vars(LaunchConfig())} | {"evaluate": 3}
    assert Params.from_dict(raw).launch == LaunchConfig(evaluate=3)


@pytest.mark.slow
def test_an_error_every_rank_hits_is_one_line(tmp_path):
    """A set with NaN refused by both processes of a 2-process evaluation: one line (rank 0's,
    or rank 1's when torchrun stopped rank 0 first), not one per rank."""
    from datm import artifacts, pipeline

    raw = launch_params(evaluate=2)
    project = tmp_path / "project"
    paths = helpers.tiny_project(project, raw)
    pipeline.distill_ipc(Params.from_dict(raw), paths, 1)
    tensors, meta = pipeline.load_distilled(paths.distilled(1))
    tensors["images"][0, 0, 0, 0] = float("nan")
    artifacts.save(paths.distilled(1), tensors, "distilled", meta)
    result = run_stage(stage("evaluate", "--ipc", "1"), project, DATM_TRACKING="off")
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, describe(result)
    assert lines[0].startswith("error:") and "NaN or inf" in lines[0]


def test_a_launch_reports_rank_0s_saved_line_else_the_first_others(tmp_path, capsys):
    """The ranks of datm's launch save their error lines; once all have ended the launch prints
    one: the first rank's own error, whichever rank ended first (torchrun stops the rest at the
    first failure), a lost peer only when no rank saved its own error."""
    from stages import launch

    def reported() -> str:
        launch._report_rank_errors(launch._saved_errors(tmp_path))
        return capsys.readouterr().err.strip()

    (tmp_path / "rank2.err").write_text(f"{launch.PEERS_LOST} (peer gone)")
    (tmp_path / ".rank3.tmp").write_text("half writ")  # stopped while saving: not a line
    assert reported() == f"error: rank 2: {launch.PEERS_LOST} (peer gone)"
    (tmp_path / "rank4.err").write_text("images hold NaN")
    assert reported() == "error: rank 4: images hold NaN"
    (tmp_path / "rank0.err").write_text("images hold NaN")
    assert reported() == "error: images hold NaN"
    for path in tmp_path.iterdir():
        path.unlink()
    assert reported() == ""


def test_shipped_params_parse_their_launch_section():
    shipped = helpers.shipped_params()["launch"]
    assert vars(load_params(helpers.REPO / "params.yaml").launch) == shipped


@pytest.mark.parametrize("launch, key", [
    ({"buffers": 0}, "launch.buffers"),
    ({"evaluate": -2}, "launch.evaluate"),
    ({"distill": "x"}, "launch.distill"),
    ({"baseline": 1.5}, "launch.baseline"),
    ({"crossarch": True}, "launch.crossarch"),
    ({"buffer": 2}, "launch.buffer"),
])
def test_bad_launch_values_are_config_errors_naming_the_key(launch, key):
    raw = helpers.tiny_params()
    raw["launch"] = {f: 1 for f in vars(LaunchConfig())} | launch  # complete but for one value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Params.from_dict(raw)


def test_a_launch_section_that_is_no_mapping_is_a_config_error():
    raw = helpers.tiny_params()
    raw["launch"] = [2]
    with pytest.raises(ConfigError, match="launch must be a mapping"):
        Params.from_dict(raw)


def test_processes_take_datm_ranks_over_params_and_cap_at_the_work(tmp_path, monkeypatch):
    params = helpers.write_params(tmp_path, launch_params(evaluate=2, distill=4))
    monkeypatch.delenv(launch.RANKS_ENV, raising=False)
    assert launch.processes("evaluate", params) == 2
    assert launch.processes("buffers", params) == 1
    assert launch.processes("distill", params, most=lambda p: 3) == 3  # no idle process
    monkeypatch.setenv(launch.RANKS_ENV, "5")
    assert launch.processes("buffers", params) == 5
    assert launch.processes("evaluate", params, most=lambda p: p.evaluate.models) == 3
    for bad in ("0", "-1", "x", "1.5"):
        monkeypatch.setenv(launch.RANKS_ENV, bad)
        with pytest.raises(UserError, match=f"DATM_RANKS .*{bad!r}"):
            launch.processes("evaluate", params)


def test_a_bad_distributed_timeout_is_a_user_error(monkeypatch):
    monkeypatch.setenv(launch.TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match="DATM_DIST_TIMEOUT_S"):
        launch.dist_timeout()
    monkeypatch.setenv(launch.TIMEOUT_ENV, "2.5")
    assert launch.dist_timeout() == 2.5


def test_datm_ranks_is_refused_under_dvc(tmp_path, monkeypatch):
    """dvc.lock records launch.<stage>; an override DVC cannot see would record other bytes."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(launch_params(baseline=2)))
    monkeypatch.setenv(launch.RANKS_ENV, "1")
    assert launch.processes("baseline", params) == 1  # by hand: the override holds
    monkeypatch.setenv("DVC_STAGE", "baseline@1")
    with pytest.raises(UserError, match="launch.baseline in params.yaml"):
        launch.processes("baseline", params)


# --- stages as 2 processes against 1 --------------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project (data and ZCA, no experts); tests work on copies."""
    root = tmp_path_factory.mktemp("launch") / "project"
    helpers.tiny_project(root, launch_params(buffers=2, baseline=2, distill=2), experts=False)
    return root


def test_datm_ranks_zero_is_one_line_and_exit_2(project):
    result = run_stage(stage("buffers"), project, DATM_RANKS="0")
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "DATM_RANKS" in lines[0], lines
    assert not (project / "artifacts" / "buffers").exists()


def test_buffers_on_two_processes_write_the_one_process_bytes(project):
    two, one = twin(project, "buffers2"), twin(project, "buffers1")
    out2 = ok(run_stage(stage("buffers"), two))  # launch.buffers: 2
    out1 = ok(run_stage(stage("buffers"), one, DATM_RANKS="1"))
    # rank 0 trains experts 0 and 2 and alone prints; one process trains all three
    assert "expert 1:" not in out2 and "expert 0:" in out2 and "expert 1:" in out1
    assert out2.count("buffers: 3 experts") == 1
    names = sorted(p.name for p in (one / "artifacts" / "buffers").iterdir())
    assert len(names) == 3
    assert names == sorted(p.name for p in (two / "artifacts" / "buffers").iterdir())
    for name in names:
        got = (two / "artifacts" / "buffers" / name).read_bytes()
        assert got == (one / "artifacts" / "buffers" / name).read_bytes(), name
    m2, m1 = (json.loads((p / "metrics" / "buffers.json").read_text()) for p in (two, one))
    # rank 0 wrote the file with every expert's curves, the other rank's too; no wall time
    assert [r["expert"] for r in m2["runs"]] == [0, 1, 2]
    m2.pop("env"), m1.pop("env")  # threads per process differ by design
    assert m2 == m1
    assert "seconds" not in json.dumps(m2)
    assert not list((two / "metrics").glob("*.tmp*")) and len(list((two / "metrics").iterdir())) == 1


def test_baseline_on_two_processes_equals_one_process(project, tmp_path):
    """`datm baseline` with launch.baseline 2 runs the stage module as 2 processes (model k on
    process k % 2), and they write what one process writes."""
    two, one = twin(project, "baseline2"), twin(project, "baseline1")
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    # what a launch killed with -9 left (its pid is dead) and what a running one holds
    from datm import artifacts

    host = artifacts.owner_tag().split("-", 1)[1]
    gone = helpers.run([sys.executable, "-c", "import os; print(os.getpid())"], cwd=tmp_path)
    dead = temp / f"datm-rank-errors-{gone.stdout.strip()}-{host}-k1ll3d"
    live = temp / f"datm-rank-errors-{artifacts.owner_tag()}-runn1n"
    for folder in (dead, live):
        (folder / "torchrun").mkdir(parents=True)
    # launch.baseline: 2; the launch leaves nothing per run in the temp dir (torchrun's log
    # folders did), only torch's one cache folder per user, and clears what killed ones left
    out2 = ok(helpers.datm("baseline", "--ipc", "2", cwd=two,
                           env=helpers.stage_env(TMPDIR=str(temp)), timeout=TIMEOUT))
    left = sorted(p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_"))
    assert left == [live.name], left
    out1 = ok(run_stage(stage("evaluate", "--baseline", "2"), one, DATM_RANKS="1"))
    assert "model 2/3" not in out2 and "model 3/3" in out2 and "model 2/3" in out1
    got, expected = (json.loads((p / "metrics" / "baseline" / "ipc_2.json").read_text())
                     for p in (two, one))
    assert [r["acc"] for r in got["runs"]] == [r["acc"] for r in expected["runs"]]
    assert got == expected


def test_distill_on_two_processes_equals_one_process(project):
    two = twin(project, "distill2")
    pipeline.train_experts(load_params(two / "params.yaml"), Paths(two))
    one = twin(two, "distill1")
    ok(run_stage(stage("distill", "--ipc", "2"), two))  # launch.distill: 2, recompute, instance
    ok(run_stage(stage("distill", "--ipc", "2"), one, DATM_RANKS="1"))
    result = "artifacts/distilled/ipc_2.safetensors"
    (t2, meta2), (t1, meta1) = artifacts.load(two / result), artifacts.load(one / result)
    assert meta2["iteration"] == meta1["iteration"] == 3
    assert meta2["history_columns"] == meta1["history_columns"]
    for name in ("images", "labels", "lr"):
        torch.testing.assert_close(t2[name], t1[name], atol=1e-5, rtol=0, msg=name)
    # the same draws and skip decisions: start epoch, upper bound, skipped
    exact = [0, 2, 3, 5]
    assert torch.equal(t2["history"][:, exact], t1["history"][:, exact])
    assert not list((two / "checkpoints").glob("*.lock"))  # rank 0's IPC lock was let go


# --- failures -------------------------------------------------------------------------------------

def workers(proc: subprocess.Popen) -> dict[int, object]:
    """The torchrun ranks under a stage process, by rank."""
    import psutil

    found = {}
    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                env = child.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "RANK" in env and "stages." in " ".join(child.cmdline()):
                found[int(env["RANK"])] = child
    except psutil.NoSuchProcess:
        pass
    return found


def slow_experts(root: Path) -> Path:
    raw = launch_params(buffers=2)
    raw["buffers"].update({"num_experts": 6, "epochs": 60, "batch": 16})
    helpers.tiny_project(root, raw, experts=False, n_train=120)
    return root


@pytest.mark.slow
def test_a_killed_rank_fails_the_stage_and_a_rerun_resumes(tmp_path):
    """SIGKILL to rank 1 once the first expert is on disk: the stage exits non-zero within a
    bounded time (the others are stopped, or time out after DATM_DIST_TIMEOUT_S), the finished
    experts stay as they are, and the same command finishes the rest: the one-process bytes."""
    project = slow_experts(tmp_path / "killed")
    reference = twin(project, "reference")
    buffers = project / "artifacts" / "buffers"
    log = tmp_path / "run.log"
    proc = start(stage("buffers"), project, log, DATM_DIST_TIMEOUT_S="10")
    try:
        appeared = helpers.wait_for(lambda: any(buffers.glob("expert_*.safetensors")),
                                    timeout=TIMEOUT, proc=proc)
        assert appeared, log.read_text()
        ranks = workers(proc)
        assert sorted(ranks) == [0, 1], (ranks, log.read_text())
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    ended = time.monotonic() - killed
    text = log.read_text()
    assert code not in (0, None), text
    assert ended < 60, (ended, text)
    assert "killed by SIGKILL" in text and "again to resume" in text, text
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in buffers.iterdir()
            if p.name.startswith("expert_") and p.suffix == ".safetensors"}
    assert 1 <= len(kept) < 6, sorted(kept)
    ok(run_stage(stage("buffers"), project))  # the same command again, 2 processes
    ok(run_stage(stage("buffers"), reference, DATM_RANKS="1"))
    for name, (mtime, data) in kept.items():  # not trained again
        assert (buffers / name).stat().st_mtime_ns == mtime and (buffers / name).read_bytes() == data
    names = sorted(p.name for p in (reference / "artifacts" / "buffers").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in buffers.iterdir())
    for name in names:
        assert (buffers / name).read_bytes() == \
            (reference / "artifacts" / "buffers" / name).read_bytes(), name


@pytest.mark.slow
def test_ctrl_c_stops_two_processes_with_130_and_one_line(tmp_path):
    project = slow_experts(tmp_path / "project")
    buffers = project / "artifacts" / "buffers"
    log = tmp_path / "run.log"
    proc = start(stage("buffers"), project, log)
    try:
        appeared = helpers.wait_for(lambda: any(buffers.glob("expert_*.safetensors")),
                                    timeout=TIMEOUT, proc=proc)
        assert appeared, log.read_text()
        proc.send_signal(signal.SIGINT)
        code = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 130, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "again to resume" in lines[0], text
    assert not workers(proc)
