"""What the stages and the `datm` command promise a user, checked on real processes.

A killed stage resumes to the very bytes an uninterrupted run writes; Ctrl-C ends a stage with
exit code 130 and one "interrupted" line; `datm repro` hands back dvc's exit code; refusals are
one line and exit code 2; an image folder becomes a dataset; the core runs without MLflow.

Every process here runs the checkout these tests live in (PYTHONPATH=REPO) on a tiny project
made in-process; each starts a Python that imports torch (seconds), hence `slow`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest
import yaml
from helpers import DATM, DVC, describe, error_lines, start

from datm import artifacts, data

pytestmark = pytest.mark.slow

PYTHON = sys.executable


def stage(name: str, *args: str) -> list[str]:
    return [PYTHON, "-m", f"stages.{name}", *args]


def distill_params(iterations: int, **defaults) -> dict:
    raw = helpers.tiny_params()
    raw["buffers"].update({"num_experts": 2, "epochs": 2, "batch": 16})
    raw["distill"]["defaults"].update({"iterations": iterations, "checkpoint_every": 1,
                                       **defaults})
    return raw


def finish(proc: subprocess.Popen, log: Path, timeout: float = 60) -> tuple[int, str]:
    return helpers.finish(proc, timeout), log.read_text()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    text = result.stdout + result.stderr
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in text, describe(result)
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), describe(result)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- a killed distill stage resumes to the same bytes -------------------------------------------

def test_a_killed_distill_stage_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL (no clean-up at all) once the first checkpoint is on disk, then the same command
    again: the result file is byte-identical to an uninterrupted run's."""
    iterations = 200  # 5-15 ms each (a checkpoint every iteration): a second or more to kill in
    reference = tmp_path / "reference"
    helpers.tiny_project(reference, distill_params(iterations))
    killed = shutil.copytree(reference, tmp_path / "killed")  # same data, ZCA and experts
    result = helpers.run(stage("distill", "--ipc", "2"), cwd=reference, env=helpers.stage_env())
    assert result.returncode == 0, describe(result)
    expected = (reference / "artifacts/distilled/ipc_2.safetensors").read_bytes()

    checkpoint = killed / "checkpoints/distill_ipc_2.safetensors"
    proc = start(stage("distill", "--ipc", "2"), killed, tmp_path / "killed.log")
    appeared = helpers.wait_for(checkpoint.is_file, timeout=120, proc=proc)
    proc.send_signal(signal.SIGKILL)
    code, log = finish(proc, tmp_path / "killed.log")
    assert appeared, f"no checkpoint appeared:\n{log}"
    assert code == -signal.SIGKILL, f"the run ended by itself before the kill:\n{log}"
    assert not (killed / "artifacts/distilled/ipc_2.safetensors").exists()
    at = artifacts.read_meta(checkpoint)["iteration"]
    assert 1 <= at < iterations

    again = helpers.run(stage("distill", "--ipc", "2"), cwd=killed, env=helpers.stage_env())
    assert again.returncode == 0, describe(again)
    assert "resuming ipc 2 at iteration" in again.stderr, describe(again)
    got = (killed / "artifacts/distilled/ipc_2.safetensors").read_bytes()
    assert got == expected, "the resumed run's result differs from the uninterrupted run's"


# --- Ctrl-C --------------------------------------------------------------------------------------

def assert_interrupted(code: int, log: str) -> None:
    assert code == 130, log
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if "interrupted" in line]
    assert len(lines) == 1, log
    assert "again to resume" in lines[0], lines[0]


def test_ctrl_c_stops_datm_distill_with_130_and_keeps_the_checkpoint(tmp_path):
    paths = helpers.tiny_project(tmp_path, distill_params(100_000))
    checkpoint = paths.checkpoint(2)
    proc = start([DATM, "distill", "--ipc", "2"], tmp_path, tmp_path / "run.log")
    appeared = helpers.wait_for(checkpoint.is_file, timeout=120, proc=proc)
    proc.send_signal(signal.SIGINT)
    code, log = finish(proc, tmp_path / "run.log")
    assert appeared, log
    assert_interrupted(code, log)
    assert artifacts.read_meta(checkpoint)["iteration"] >= 1  # where the next run resumes
    assert not paths.distilled(2).exists()
    assert not checkpoint.with_suffix(".lock").exists()  # the IPC lock was let go


def test_ctrl_c_stops_the_buffers_stage_with_130(tmp_path):
    raw = helpers.tiny_params()
    raw["buffers"].update({"num_experts": 40, "epochs": 20, "batch": 16})
    paths = helpers.tiny_project(tmp_path, raw, experts=False)
    first = paths.buffers / "expert_000.safetensors"
    proc = start(stage("buffers"), tmp_path, tmp_path / "run.log")
    appeared = helpers.wait_for(first.is_file, timeout=120, proc=proc)
    proc.send_signal(signal.SIGINT)
    code, log = finish(proc, tmp_path / "run.log")
    assert appeared, log
    assert_interrupted(code, log)
    assert first.is_file()  # finished experts stay for the next run
    assert len(list(paths.buffers.glob("expert_*.safetensors"))) < 40


# --- datm repro is dvc repro ---------------------------------------------------------------------

def dvc_project(root: Path, cmd: str) -> Path:
    root.mkdir()
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=root, check=True, env=helpers.base_env())
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"only": {"cmd": cmd}}}))
    return root


def test_datm_repro_returns_dvcs_exit_code(tmp_path):
    outside = tmp_path / "not_a_dvc_repo"
    outside.mkdir()
    codes = {}
    for tool in (DATM, DVC):
        result = helpers.run([tool, "repro"], cwd=outside, env=helpers.stage_env())
        codes[tool] = result.returncode
    assert codes[DATM] == codes[DVC] != 0, codes

    failing = dvc_project(tmp_path / "failing", "python -c 'import sys; sys.exit(3)'")
    ours = helpers.run([DATM, "repro"], cwd=failing, env=helpers.stage_env())
    theirs = helpers.run([DVC, "repro"], cwd=failing, env=helpers.stage_env())
    assert ours.returncode == theirs.returncode != 0, (describe(ours), describe(theirs))
    assert "exited with 3" in ours.stderr

    passing = dvc_project(tmp_path / "passing", "python -c 'open(\"ran\", \"w\").close()'")
    ours = helpers.run([DATM, "repro", "--root", str(passing)], cwd=tmp_path,
                       env=helpers.stage_env())
    assert ours.returncode == 0, describe(ours)
    assert (passing / "ran").is_file()  # it ran dvc in --root


def test_an_unknown_preset_is_one_line_and_leaves_params_alone(tmp_path):
    helpers.write_params(tmp_path, helpers.tiny_params())
    before = (tmp_path / "params.yaml").read_bytes()
    result = helpers.run([DATM, "repro", "--preset", "nope"], cwd=tmp_path,
                         env=helpers.stage_env())
    line = assert_one_line_error(result, "'nope'", "cifar10")
    assert "$ " not in line and "dvc" not in result.stdout  # dvc never started
    assert (tmp_path / "params.yaml").read_bytes() == before


def test_repro_refuses_what_stops_dvc_before_a_preset_replaces_params(tmp_path):
    """No --root folder, DATM_RANKS set: one line, exit 2, and with --preset the params.yaml
    left as it was (the checks run before the copy)."""
    helpers.write_params(tmp_path, helpers.tiny_params())
    before = (tmp_path / "params.yaml").read_bytes()
    missing = helpers.run([DATM, "repro", "--root", str(tmp_path / "nope"), "--preset",
                           "cifar10"], cwd=tmp_path, env=helpers.stage_env())
    assert_one_line_error(missing, "no such folder")
    ranks = helpers.run([DATM, "repro", "--preset", "cifar10"], cwd=tmp_path,
                        env={**helpers.stage_env(), "DATM_RANKS": "2"})
    assert_one_line_error(ranks, "DATM_RANKS")
    assert (tmp_path / "params.yaml").read_bytes() == before


def test_repro_without_dvc_installed_is_one_line(tmp_path, monkeypatch):
    """DVC comes with the `pipeline` extra: a datm without it says so, in one line."""
    from typer.testing import CliRunner

    import cli.main

    helpers.write_params(tmp_path, helpers.tiny_params())
    monkeypatch.setattr(cli.main.shutil, "which", lambda name: None)
    monkeypatch.setattr(cli.main.sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.delenv("DATM_RANKS", raising=False)
    result = CliRunner().invoke(cli.main.app, ["repro", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: dvc is not installed"), lines


def test_evaluate_stage_without_flags_is_one_line(tmp_path):
    helpers.write_params(tmp_path, helpers.tiny_params())
    result = helpers.run(stage("evaluate"), cwd=tmp_path, env=helpers.stage_env())
    assert_one_line_error(result, "--ipc", "--crossarch")


# --- an image folder becomes a dataset -----------------------------------------------------------

COLORS = {"cat": (220, 30, 30), "dog": (30, 220, 30), "bird": (30, 30, 220)}


def write_image_folder(root: Path, per_class: dict[str, int]) -> None:
    """12x12 RGB PNGs, each class its own colour plus noise, under root/<split>/<class>/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(color) + rng.integers(-20, 21, (12, 12, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def test_datm_data_and_zca_read_an_image_folder(tmp_path):
    write_image_folder(tmp_path / "images", {"train": 4, "test": 2})
    params = helpers.tiny_params("imagefolder", "images")
    params["data"].update({"im_size": 8, "channels": 3})
    helpers.write_params(tmp_path, params)
    for command in ("data", "zca"):
        result = helpers.run([DATM, command], cwd=tmp_path, env=helpers.stage_env())
        assert result.returncode == 0, describe(result)

    classes = sorted(COLORS)  # ImageFolder order: sorted folder names
    for split, n in (("train", 4), ("test", 2)):
        s = data.Split.load(tmp_path / "data" / f"{split}.safetensors")
        assert s.images.shape == (3 * n, 3, 8, 8) and s.images.dtype.is_floating_point is False
        assert s.classes == classes
        assert s.labels.bincount(minlength=3).tolist() == [n] * 3
        # each image carries its folder's label: its dominant colour channel says which
        dominant = s.images.float().mean((2, 3)).argmax(1)
        for image_channel, label in zip(dominant.tolist(), s.labels.tolist()):
            assert COLORS[classes[label]][image_channel] == 220
    train = data.Split.load(tmp_path / "data/train.safetensors")
    assert len(train.mean) == len(train.std) == 3
    tensors, meta = artifacts.load(tmp_path / "artifacts/zca.safetensors", "zca")
    assert meta["enabled"] is True and meta["eps"] == params["zca"]["eps"]
    assert tensors["matrix"].shape == (3 * 8 * 8, 3 * 8 * 8)


# --- the core without MLflow ---------------------------------------------------------------------

NO_MLFLOW = r"""
import importlib.abc, sys

class NoMlflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoMlflow())
try:
    import mlflow  # noqa: F401
    raise SystemExit("mlflow was not blocked")
except ModuleNotFoundError:
    pass

from pathlib import Path
sys.path.insert(0, sys.argv[1])
import helpers
from datm import pipeline
from datm.config import Params
from datm.tracking import Tracker

root = Path(sys.argv[2])
raw = helpers.tiny_params()
raw["buffers"].update({"num_experts": 2, "epochs": 2, "batch": 16})
paths = helpers.tiny_project(root, raw)
with Tracker("distill", root) as tracker:
    assert not tracker.active
    tracker.params({"a": 1})
    tracker.tags({"b": "c"})
    tracker.metrics({"d": 1.0}, 0)
    tracker.flush()
params = Params.from_dict(raw)
summary = pipeline.distill_ipc(params, paths, 1)
ev = pipeline.evaluate_ipc(params, paths, 1)
from stages import distill
distill.run(2, str(root / "params.yaml"), str(root))
loaded = sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow."))
print("OK", summary["iterations"], ev["ipc"], paths.distilled(2).is_file(), loaded)
"""


def test_the_core_runs_without_mlflow(tmp_path):
    env = helpers.stage_env(DATM_TRACKING="on")  # tracking asked for, but no mlflow to do it
    result = helpers.run([PYTHON, "-c", NO_MLFLOW, str(helpers.REPO / "tests"),
                          str(tmp_path)], cwd=tmp_path, env=env)
    assert result.returncode == 0, describe(result)
    assert "OK 3 1 True []" in result.stdout, describe(result)
    assert not (tmp_path / "mlflow.db").exists()
