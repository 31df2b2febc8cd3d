"""The `datm` command line: user mistakes end as one `error: ...` line and exit code 2.

These run the installed `datm` script in a throw-away folder (a few seconds each: every call
starts a Python that imports torch). End-to-end commands on a finished pipeline (export,
evaluate --from, status) are in test_dvc_repro.py.
"""

from __future__ import annotations

from pathlib import Path

import helpers
import pytest
import yaml
from helpers import datm, describe, error_lines

pytestmark = pytest.mark.slow  # each test starts `datm` (a Python importing torch): seconds


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, exactly one non-empty line of output, `error: ...`, no traceback."""
    text = result.stdout + result.stderr
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in text, describe(result)
    lines = error_lines(result)
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{text}"
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def project(tmp_path: Path, **data) -> Path:
    params = helpers.tiny_params()
    params["data"].update(data)
    helpers.write_params(tmp_path, params)
    return tmp_path


def test_missing_cifar_without_internet(tmp_path):
    (tmp_path / "empty").mkdir()
    project(tmp_path, name="cifar10", root="empty")
    result = datm("data", cwd=tmp_path)
    assert_user_error(result, "cifar10", "cifar-10-batches-py")
    assert not (tmp_path / "data" / "train.safetensors").exists()


def test_empty_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    project(tmp_path, name="imagefolder", root="images")
    result = datm("data", cwd=tmp_path)
    assert_user_error(result, "class subfolders")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_corrupt_artifact(tmp_path):
    project(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.safetensors").write_bytes(b"\x13garbage, not safetensors" * 9)
    result = datm("zca", cwd=tmp_path)
    assert_user_error(result, "corrupt", "train.safetensors")
    assert not (tmp_path / "artifacts" / "zca.safetensors").exists()


def test_corrupt_artifact_through_the_dvc_stage_command(tmp_path):
    """DVC runs `python -m stages.<name>`: the same one-line error, exit code 2."""
    project(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.safetensors").write_bytes(b"")
    result = helpers.run([str(helpers.VENV_BIN / "python"), "-m", "stages.zca"],
                         cwd=tmp_path,
                         env=helpers.base_env(PYTHONPATH=str(helpers.REPO)))
    assert_user_error(result, "train.safetensors")


@pytest.mark.parametrize("section,key", [("buffers", "epochz"), (None, "buffer"),
                                         ("distill.ipc.1", "sync_steps")])
def test_unknown_params_key(tmp_path, section, key):
    params = helpers.tiny_params()
    node = params
    for part in (section.split(".") if section else []):
        node = node[int(part) if part.isdigit() else part]
    node[key] = 3
    helpers.write_params(tmp_path, params)
    result = datm("status", cwd=tmp_path)
    assert_user_error(result, key)


def test_params_file_problems(tmp_path):
    result = datm("zca", cwd=tmp_path)  # no params.yaml at all
    assert_user_error(result, "params.yaml")
    (tmp_path / "params.yaml").write_text("data: [unclosed\n")
    result = datm("zca", cwd=tmp_path)
    assert_user_error(result, "params.yaml")


def test_distill_an_ipc_that_is_not_configured(tmp_path):
    project(tmp_path)
    result = datm("distill", "--ipc", "7", cwd=tmp_path)
    assert_user_error(result, "7", "1, 2")


def test_export_without_any_distilled_set(tmp_path):
    project(tmp_path)
    result = datm("export", "--ipc", "999", "--out", "out", cwd=tmp_path)
    assert_user_error(result, "999", "none")
    assert not (tmp_path / "out").exists()


def test_evaluate_needs_exactly_one_source(tmp_path):
    project(tmp_path)
    result = datm("evaluate", cwd=tmp_path)
    assert_user_error(result, "--ipc", "--from")


def test_status_on_an_empty_project(tmp_path):
    project(tmp_path)
    result = datm("status", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    text = result.stdout + result.stderr
    assert "missing" in text and "0/2" in text


def test_tiny_params_are_valid_for_the_package():
    """The test profile itself must parse (so the other failures here are the CLI's)."""
    from datm.config import Params

    params = Params.from_dict(yaml.safe_load(yaml.safe_dump(helpers.tiny_params())))
    assert params.ipcs == [1, 2]
    for ipc in params.ipcs:
        assert params.distill(ipc).last_epoch_needed <= params.buffers.epochs


def test_status_with_a_damaged_checkpoint(tmp_path):
    """`datm distill` treats a damaged checkpoint as "start over"; status must still report."""
    project(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "distill_ipc_1.safetensors").write_bytes(b"half a file")
    result = datm("status", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert "ipc 2" in result.stdout + result.stderr  # the whole table was printed
