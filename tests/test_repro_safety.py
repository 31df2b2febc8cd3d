"""A bad setting under `dvc repro` / `datm repro` never deletes a finished result.

DVC deletes a stage's outputs before its command runs, unless they are `persist: true`; those
it does not cache (metrics, tables) would then be gone for good when the stage fails on a bad
params.yaml. `datm repro` refuses such a params.yaml before DVC starts (one `error:` line,
exit 2); plain `dvc repro` keeps them (`persist: true`, and the stages write atomically).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers
import pytest
import yaml
from helpers import DATM, DVC, describe, error_lines

REPO = helpers.REPO


def _single_file_outputs_dvc_does_not_cache() -> list[tuple[str, dict]]:
    """(path, options) of every `cache: false` file output, metric and plot of dvc.yaml."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    found = []
    for stage in stages.values():
        body = stage.get("do", stage)
        for section in ("outs", "metrics", "plots"):
            for entry in body.get(section) or []:
                if isinstance(entry, dict):
                    (path, options), = entry.items()
                    if (options or {}).get("cache") is False and "." in Path(path).name:
                        found.append((path, options))
    return found


def test_outputs_dvc_does_not_cache_persist():
    """DVC keeps them until the stage's command replaces them (reports/, a folder whose stale
    grids DVC's deletion clears, is the one exception: git keeps the report)."""
    outputs = _single_file_outputs_dvc_does_not_cache()
    assert {"metrics/buffers.json", "metrics/evaluate/ipc_${item}.json",
            "metrics/baseline/ipc_${item}.json"} <= {path for path, _ in outputs}
    assert [path for path, options in outputs if options.get("persist") is not True] == []


# --- a finished DVC project (download, zca, buffers, baseline@2), built once ----------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = helpers.copy_project(tmp_path_factory.mktemp("finished") / "project")
    helpers.make_fashion_mnist(root / "standin", 200, 50)
    params = helpers.tiny_params()
    params["launch"] = {stage: 1 for stage in params["launch"]}
    helpers.write_params(root, params)
    helpers.git_commit_all(root)
    first = helpers.run([DVC, "repro", "buffers", "baseline@2"], cwd=root, env=helpers.base_env(),
                        timeout=600)
    assert first.returncode == 0, describe(first)
    return root


@pytest.fixture
def project(finished, tmp_path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(finished, root, symlinks=True)
    return root


def _edit(root: Path, change) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    change(params)
    helpers.write_params(root, params)


def _status(root: Path, stage: str) -> dict:
    result = helpers.run([DVC, "status", "--json", stage], cwd=root)
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout or "{}")


BAD = {  # what a hostile probe wrote into a finished project: each stage refuses it
    "buffers": ("metrics/buffers.json", "net.width",
                lambda p: p["net"].update(width="4")),
    "baseline@2": ("metrics/baseline/ipc_2.json", "evaluate.ipc.2",
                   lambda p: p["evaluate"]["ipc"][2].update(models=0)),
}
GOOD = {  # a setting that re-runs the stage
    "buffers": lambda p: p["buffers"].update(lr=0.04),
    "baseline@2": lambda p: p["evaluate"]["ipc"][2].update(epochs=3),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["baseline@2"])  # buffers': the same persist, 1 min more
def test_dvc_repro_on_bad_params_keeps_the_finished_output(project, stage):
    output, _, bad = BAD[stage]
    before, lock = (project / output).read_bytes(), (project / "dvc.lock").read_bytes()
    good_params = (project / "params.yaml").read_bytes()
    _edit(project, bad)
    failed = helpers.run([DVC, "repro", stage], cwd=project, timeout=600)
    assert failed.returncode != 0, describe(failed)
    assert (project / output).read_bytes() == before, "DVC deleted a finished output"
    assert (project / "dvc.lock").read_bytes() == lock
    assert stage in _status(project, stage)  # still to run

    (project / "params.yaml").write_bytes(good_params)
    assert _status(project, stage) == {}  # the kept output is the one dvc.lock records
    _edit(project, GOOD[stage])
    again = helpers.run([DVC, "repro", stage], cwd=project, timeout=600)
    assert again.returncode == 0, describe(again)
    assert (project / output).read_bytes() != before  # a good run still replaces it
    assert _status(project, stage) == {}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(BAD))
def test_datm_repro_refuses_bad_params_before_dvc_starts(project, stage):
    output, fragment, bad = BAD[stage]
    before, lock = (project / output).read_bytes(), (project / "dvc.lock").read_bytes()
    _edit(project, bad)
    result = helpers.run([DATM, "repro"], cwd=project, timeout=600)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, describe(result)
    assert lines[0].startswith("error: ") and fragment in lines[0], lines
    assert "Running stage" not in result.stdout + result.stderr  # DVC never started
    assert (project / output).read_bytes() == before
    assert (project / "dvc.lock").read_bytes() == lock


@pytest.mark.slow
def test_datm_repro_refuses_datm_ranks(tmp_path):
    """No stage accepts DATM_RANKS under DVC: refused once, before DVC starts each stage."""
    helpers.write_params(tmp_path, helpers.tiny_params())
    result = helpers.run([DATM, "repro"], cwd=tmp_path, env=helpers.base_env(DATM_RANKS="2"))
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, describe(result)
    assert lines[0].startswith("error: ") and "DATM_RANKS" in lines[0], lines
