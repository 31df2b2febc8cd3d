"""What a kill, a second process or a busy port must not break.

Temp files a killed writer leaves (DVC must not see them; the next run removes them), the
export swap, MLflow's store under concurrent first use, one distiller per IPC, runs a killed
stage left RUNNING, and `datm ui`'s server going away with it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch

from datm import artifacts, data, pipeline
from datm import export as export_mod
from datm.config import Params, Paths

# --- a tiny project: splits, ZCA and two experts, built once and copied per test ------------

def _tiny_raw() -> dict:
    raw = helpers.tiny_params()
    raw["buffers"].update({"num_experts": 2, "epochs": 2, "batch": 16})
    raw["evaluate"].update({"epochs": 1})
    for table in raw["distill"]["ipc"].values():
        table["batch_syn"] = 3
    return raw


def _write_splits(paths: Paths) -> None:
    """Tiny 1x8x8 uint8 splits of 3 classes, saved the way the download stage saves them."""
    mean = std = None
    for split, n, seed in (("train", 60, 0), ("test", 30, 100)):
        images, labels = helpers.learnable_uint8(n, 3, 1, 8, seed=seed)
        images_t = torch.from_numpy(images)
        if split == "train":
            mean, std = data.channel_stats(images_t)
        s = data.Split(images_t, torch.from_numpy(labels.astype(np.int64)), ["a", "b", "c"],
                       "tiny-standin", mean, std)
        s.save(paths.train if split == "train" else paths.test, split)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("built")
    raw = _tiny_raw()
    helpers.write_params(root, raw)
    paths, params = Paths(root), Params.from_dict(raw)
    _write_splits(paths)
    pipeline.fit_zca(params, paths)
    pipeline.train_experts(params, paths)
    return root


@pytest.fixture
def project(built, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(built, root)
    monkeypatch.setenv("DATM_TRACKING", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DATM_EXPERIMENT", raising=False)
    return root


_NEVER_FINISHED: list = []  # writers that "died" mid-write (kept: closing one cleans up)


def _leave_temp(target: Path) -> Path:
    """A temp file exactly as a writer of `target` killed mid-write leaves it."""
    writing = artifacts.atomic_path(target)
    tmp = writing.__enter__()  # never exited: the process "dies" here
    _NEVER_FINISHED.append(writing)
    tmp.write_bytes(b"half a file")
    return tmp


# --- 6. temp files: invisible to DVC, removed by the next run -------------------------------

@pytest.mark.slow
def test_dvcignore_keeps_a_temp_file_out_of_a_folder_hash(tmp_path):
    """A stray temp file in a folder a stage depends on leaves `dvc status` clean."""
    env = helpers.base_env()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
           "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([helpers.DVC, "init", "-q"], cwd=tmp_path, check=True, env=env)
    shutil.copy(helpers.REPO / ".dvcignore", tmp_path / ".dvcignore")
    folder = tmp_path / "artifacts" / "distilled"
    folder.mkdir(parents=True)
    (folder / "ipc_1.safetensors").write_bytes(b"result")
    dvc = lambda *a: helpers.run([helpers.DVC, *a], cwd=tmp_path, env=env)  # noqa: E731
    added = dvc("stage", "add", "-n", "summary", "-d", "artifacts/distilled", "-o", "n.txt",
                "ls artifacts/distilled | wc -l > n.txt")
    assert added.returncode == 0, helpers.describe(added)
    repro = dvc("repro")
    assert repro.returncode == 0, helpers.describe(repro)
    assert json.loads(dvc("status", "--json").stdout) == {}

    tmp = _leave_temp(folder / "ipc_2.safetensors")
    status = dvc("status", "--json")
    assert json.loads(status.stdout) == {}, (tmp.name, status.stdout)
    (folder / "ipc_3.safetensors").write_bytes(b"a real new result")  # DVC still sees these
    assert json.loads(dvc("status", "--json").stdout) != {}


def test_remove_stale_temps_removes_only_that_targets_temps(tmp_path):
    target = tmp_path / "ipc_1.safetensors"
    artifacts.save(target, {"x": torch.zeros(2)}, "t")
    other = tmp_path / "ipc_10.safetensors"
    stale = [_leave_temp(target), _leave_temp(target)]
    kept = [_leave_temp(other), tmp_path / "ipc_1.safetensors.bak", tmp_path / "notes.tmp"]
    for path in kept[1:]:
        path.write_text("mine")

    artifacts.remove_stale_temps(target)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept) and target.is_file()
    artifacts.remove_stale_temps(tmp_path / "missing" / "x.safetensors")  # no folder: no error


def test_distill_removes_temps_a_killed_run_left(project):
    from stages import distill as stage

    pa = Paths(project)
    stale = [_leave_temp(pa.distilled(1)), _leave_temp(pa.checkpoint(1))]
    stage.run(1, str(project / "params.yaml"), str(project))
    assert pa.distilled(1).is_file() and pa.checkpoint(1).is_file()
    assert not any(p.exists() for p in stale)
    # nothing else beside the result and the checkpoint (the lock file goes with its holder)
    assert sorted(p.name for p in pa.distilled(1).parent.iterdir()) == [pa.distilled(1).name]
    assert sorted(p.name for p in pa.checkpoint(1).parent.iterdir()) == [pa.checkpoint(1).name]


KILL_WRITER = """
import os, signal, sys
from pathlib import Path
import torch
from datm import artifacts
from datm.pipeline.project import write_json
target, kind = Path(sys.argv[1]), sys.argv[2]
def replace(src, dst):  # killed after its temp is complete, just before the rename
    os.kill(os.getpid(), signal.SIGKILL)
artifacts.os.replace = replace
if kind == "json":
    write_json(target, {"distilled": 0.75})
else:
    artifacts.save(target, {"x": torch.ones(2)}, "t")
"""


def _temps_beside(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["json", "safetensors"])
def test_the_next_write_removes_the_temp_of_a_writer_killed_before_its_rename(tmp_path, kind):
    """A metrics file (no lock guards it) or an artifact: a SIGKILL at the rename leaves the
    complete temp beside the old file; the next write of that file removes it."""
    from datm.pipeline.project import write_json

    target = tmp_path / "metrics" / "evaluate" / f"ipc_2.{kind}"
    write = (lambda value: write_json(target, {"distilled": value})) if kind == "json" else (
        lambda value: artifacts.save(target, {"x": torch.full((2,), value)}, "t"))
    write(0.5)
    before = target.read_bytes()
    killed = helpers.run([sys.executable, "-c", KILL_WRITER, str(target), kind], cwd=tmp_path,
                         env=helpers.base_env(PYTHONPATH=str(helpers.REPO)))
    assert killed.returncode == -signal.SIGKILL, helpers.describe(killed)
    assert target.read_bytes() == before and len(_temps_beside(target)) == 1

    write(0.25)
    assert _temps_beside(target) == []
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert target.read_bytes() != before


LIVE_WRITER = """
import sys
from pathlib import Path
from datm import artifacts
with artifacts.atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_text("theirs")
    print(tmp, flush=True)
    sys.stdin.readline()  # still writing until the test says so
"""


@pytest.mark.slow
def test_the_next_write_keeps_the_temp_of_a_live_writer(tmp_path):
    """Two writers of one metrics file at once: neither removes the other's temp."""
    from datm.pipeline.project import write_json

    target = tmp_path / "ipc_2.json"
    live = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(target)], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=helpers.base_env(PYTHONPATH=str(helpers.REPO)))
    try:
        theirs = Path(live.stdout.readline().strip())
        assert theirs.is_file(), theirs
        write_json(target, {"mine": 1})
        assert theirs.is_file() and json.loads(target.read_text()) == {"mine": 1}
        live.communicate("go\n", timeout=60)
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    assert live.returncode == 0  # its rename found its temp
    assert target.read_text() == "theirs" and _temps_beside(target) == []


def test_the_next_write_keeps_temps_it_cannot_tell_dead(tmp_path):
    """A temp of another host (its pid means nothing here), one named before pids were in the
    names, and this live process's own: only a lock holder removes those (remove_stale_temps)."""
    target = tmp_path / "ipc_2.json"
    kept = [tmp_path / ".ipc_2.json.999999999-00000000-abc.tmp", tmp_path / ".ipc_2.json.x8k2_q1z.tmp",
            _leave_temp(target)]
    for path in kept[:2]:
        path.write_text("half")
    artifacts.save(target, {"x": torch.zeros(1)}, "t")
    assert all(p.exists() for p in kept)
    artifacts.remove_stale_temps(target)
    assert not any(p.exists() for p in kept)


def test_git_ignores_the_temps_beside_metrics():
    for temp in ("metrics/evaluate/.ipc_2.json.123-0a1b2c3d-x8k2_q1z.tmp",
                 "metrics/.buffers.json.x8k2_q1z.tmp"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", temp],
                                 cwd=helpers.REPO)
        assert ignored.returncode == 0, temp


# --- 7. export --force: the old export survives a failure or a kill mid-swap ----------------

def _export(out: Path, value: float, force: bool = False) -> Path:
    pixels = torch.full((3, 1, 4, 4), value)
    return export_mod.export(pixels, pixels, torch.zeros(3, 3), value, ["a", "b", "c"], out,
                             "safetensors", {"dataset": "t", "ipc": 1}, force=force)


def test_export_removes_temp_folders_a_killed_export_left(tmp_path):
    out = tmp_path / "exports" / "ipc1"
    out.parent.mkdir()
    stale = _leave_temp(out)
    _export(out, 0.25)
    assert not stale.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ipc1"]


def test_export_force_keeps_the_old_export_when_the_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "ipc1"
    _export(out, 0.25)
    real_replace, failures = os.replace, [OSError("injected: disk gone")]

    def failing_replace(src, dst):
        if Path(dst) == out and failures:  # moving the new export into place, once
            raise failures.pop()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(export_mod.ExportError, match="injected"):
        _export(out, 0.75, force=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert export_mod.read(out).lr == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ipc1"]


KILL_EXPORT = """
import os, shutil, sys
from pathlib import Path
import torch
from datm import export
out, point = Path(sys.argv[1]), sys.argv[2]
real_replace, real_rmtree = os.replace, shutil.rmtree
def replace(src, dst):
    if point == "before-new-in-place" and Path(dst) == out:
        os._exit(9)
    return real_replace(src, dst)
def rmtree(path, *a, **k):
    if point == "before-old-removed" and (Path(path) / "images.safetensors").is_file():
        os._exit(9)
    return real_rmtree(path, *a, **k)
os.replace, shutil.rmtree = replace, rmtree
x = torch.full((3, 1, 4, 4), 0.75)
export.export(x, x, torch.zeros(3, 3), 0.75, ["a", "b", "c"], out, "safetensors",
              {"dataset": "t", "ipc": 1}, force=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before-new-in-place", "before-old-removed"])
def test_export_force_killed_mid_swap_never_loses_the_export(tmp_path, point):
    out = tmp_path / "ipc1"
    _export(out, 0.25)
    killed = helpers.run([sys.executable, "-c", KILL_EXPORT, str(out), point], cwd=tmp_path,
                         env=helpers.base_env(PYTHONPATH=str(helpers.REPO)))
    assert killed.returncode == 9, helpers.describe(killed)

    # the next export finds a complete export at `out` (restored if the kill came too early)
    expected = 0.25 if point == "before-new-in-place" else 0.75
    with pytest.raises(export_mod.ExportError, match="--force"):
        _export(out, 0.5)
    assert export_mod.read(out).lr == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ipc1"]  # nothing left beside it
    _export(out, 0.5, force=True)
    assert export_mod.read(out).lr == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ipc1"]


# --- 8. MLflow's store: first use by several processes at once -------------------------------

def _open_tracker(root: str, barrier) -> None:
    from datm.tracking import Tracker

    barrier.wait()
    with Tracker("buffers", root) as tracker:
        assert tracker.active


@pytest.mark.slow
def test_trackers_starting_at_once_on_a_fresh_store_all_succeed(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from datm.tracking import default_uri

    monkeypatch.setenv("DATM_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DATM_EXPERIMENT", raising=False)
    n = 4
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_open_tracker, args=(str(tmp_path), barrier)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n

    client = MlflowClient(tracking_uri=default_uri(tmp_path))
    experiments = [e for e in client.search_experiments() if e.name == "datm"]
    assert len(experiments) == 1
    assert len(client.search_runs([experiments[0].experiment_id])) == n


# --- 9. one distiller per IPC -----------------------------------------------------------------

HOLD_IPC = """
import sys, time
from pathlib import Path
from datm.config import Paths
from stages import distill
with distill.ipc_lock(Paths(Path(sys.argv[1])), int(sys.argv[2])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_distill_of_the_same_ipc_is_refused(project, capsys):
    from stages import common
    from stages import distill as stage

    pa = Paths(project)
    pa.checkpoint(2).parent.mkdir(parents=True, exist_ok=True)
    pa.checkpoint(2).write_bytes(b"the first run's checkpoint")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_IPC, str(project), "2"],
                              stdout=subprocess.PIPE, text=True,
                              env=helpers.base_env(PYTHONPATH=str(helpers.REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        code = common.guarded(lambda: stage.run(2, str(project / "params.yaml"), str(project)))
        err = capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: IPC 2 is being distilled by pid "), lines[0]
    assert f"pid {holder.pid} on host {socket.gethostname()} since " in lines[0]
    assert "wait for it or stop it" in lines[0]
    assert pa.checkpoint(2).read_bytes() == b"the first run's checkpoint"
    assert not pa.distilled(2).exists()

    # the holder is gone (killed): the lock went with it and the next run proceeds
    stage.run(2, str(project / "params.yaml"), str(project))
    assert pa.distilled(2).is_file()


# --- 10. runs a killed stage left RUNNING; curves of resumed runs; `datm ui` -------------------

def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_tracker_marks_runs_of_dead_processes_killed(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from datm.tracking import Tracker, default_uri

    monkeypatch.setenv("DATM_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DATM_EXPERIMENT", raising=False)
    with Tracker("distill", tmp_path, run_name="distill@1"):
        pass
    client = MlflowClient(tracking_uri=default_uri(tmp_path))
    exp_id = client.get_experiment_by_name("datm").experiment_id
    host, dead = socket.gethostname(), str(_dead_pid())

    def running(name: str, pid: str, on: str = host, stage: str = "distill") -> str:
        tags = {"stage": stage, "mlflow.runName": name, "pid": pid, "host": on}
        return client.create_run(exp_id, tags=tags).info.run_id

    killed = running("distill@1", dead)
    alive = running("distill@1", str(os.getpid()))
    left = [running("distill@2", dead), running("distill@1", dead, on="elsewhere"),
            running("distill@1", dead, stage="evaluate")]
    with Tracker("distill", tmp_path, run_name="distill@1") as tracker:
        new = client.get_run(tracker.run_id)
        assert new.data.tags["pid"] == str(os.getpid()) and new.data.tags["host"] == host
    status = lambda run_id: client.get_run(run_id).info.status  # noqa: E731
    assert status(killed) == "KILLED"
    assert status(alive) == "RUNNING"
    assert [status(r) for r in left] == ["RUNNING"] * 3


@pytest.mark.slow
def test_resumed_runs_continue_their_curves(project, monkeypatch):
    """distill logs at step = iteration (a resumed run goes on where it stopped); buffers
    logs each expert's curves at its epoch."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from datm.tracking import default_uri
    from stages import buffers
    from stages import distill as stage

    monkeypatch.setenv("DATM_TRACKING", "on")
    params = project / "params.yaml"
    stage.run(1, str(params), str(project))
    raw = _tiny_raw()
    raw["distill"]["defaults"]["iterations"] = 5
    helpers.write_params(project, raw)
    summary = stage.run(1, str(params), str(project))
    assert summary["resumed_at"] == 3

    client = MlflowClient(tracking_uri=default_uri(project))
    exp_id = client.get_experiment_by_name("datm").experiment_id
    runs = client.search_runs([exp_id], order_by=["attributes.start_time ASC"])
    steps = [[m.step for m in client.get_metric_history(r.info.run_id, "loss")] for r in runs]
    assert [sorted(s) for s in steps] == [[1, 2, 3], [4, 5]]

    shutil.rmtree(Paths(project).buffers)
    buffers.run(str(params), str(project))
    run = client.search_runs([exp_id], filter_string="tags.stage = 'buffers'")[0]
    for k in range(2):
        history = client.get_metric_history(run.info.run_id, f"expert_{k:03d}.test_acc")
        assert sorted(m.step for m in history) == [1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_ui_on_a_busy_port_fails_with_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ui = subprocess.Popen([helpers.DATM, "ui", "--port", str(port), "--root", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=tmp_path, env=helpers.base_env())
        try:
            out, _ = ui.communicate(timeout=60)
        finally:
            for pid in _descendants(ui.pid):
                os.kill(pid, signal.SIGKILL)
            ui.kill()
    lines = [line for line in out.splitlines() if line.strip()]
    assert ui.returncode != 0, out
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(port) in lines[0], out


@pytest.mark.slow
def test_sigterm_to_ui_stops_the_server_and_its_workers(tmp_path):
    """Two workers (one is the default): the processes a signal to datm alone would leave."""
    port = _free_port()
    ui = subprocess.Popen([helpers.DATM, "ui", "--port", str(port), "--workers", "2",
                           "--root", str(tmp_path)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                          env=helpers.base_env())
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not _answers(port):
            assert ui.poll() is None and time.monotonic() < deadline, "the UI never answered"
            time.sleep(0.5)
        below = _descendants(ui.pid)
        assert below, "mlflow runs as a child of datm"
        ui.send_signal(signal.SIGTERM)
        code = ui.wait(30)
        deadline = time.monotonic() + 15
        while (_answers(port) or any(_alive(p) for p in below)) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not _answers(port), "the port still answers"
        assert not [p for p in below if _alive(p)], "children of datm ui survived"
        assert code == 128 + signal.SIGTERM
    finally:
        for pid in below | _descendants(ui.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ui.kill()
        ui.wait()
