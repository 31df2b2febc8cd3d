"""Experiments people can compare (issue #15): `dvc exp`, MLflow's runs table, `dvc plots`.

The fast tests check the pieces in-process: per-IPC `-S` overrides of every shipped profile,
MLflow parent and child runs, artifacts that move with the project, the random real baseline
file, the warning for a stage run by hand. The slow ones run the real `dvc repro` and two
`dvc exp run`s on a tiny project (Fashion-MNIST-shaped stand-in, ZCA and MLflow tracking on,
distill and evaluate under torchrun) and read the result back through its artifacts,
`dvc exp show`, MLflow's API, `datm status` and `datm plots` (the CIFAR-shaped project with
tracking off: tests/test_dvc_repro.py).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import helpers
import pytest
import yaml
from helpers import DVC, REPO, datm, describe, ran_stages

from datm.config import Params, load_params

PROFILES = [REPO / "params.yaml", *sorted((REPO / "presets").glob("*.yaml"))]


# --- 1. `dvc exp run -S distill.ipc.<N>.<key>=...` -----------------------------------------------

@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_per_ipc_overrides_apply_to_every_profile(profile, tmp_path):
    """What `dvc exp run -S` does to params.yaml (DVC's own Hydra override code): a listed key
    is replaced, an unlisted one added with `++`, in the same IPC table that datm reads."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copyfile(profile, path)
    before = load_params(path)
    ipcs = before.ipcs
    apply_overrides(path, [f"distill.ipc.{ipcs[-1]}.syn_steps=7",
                           f"++distill.ipc.{ipcs[0]}.threshold=1.7"])
    after = load_params(path)
    assert after.distill(ipcs[-1]).syn_steps == 7
    assert after.distill(ipcs[0]).threshold == 1.7
    for ipc in ipcs[1:-1]:
        assert after.distill(ipc) == before.distill(ipc)
    assert all(isinstance(k, str) for k in yaml.safe_load(path.read_text())["distill"]["ipc"])


def test_the_default_profile_lists_iterations_per_ipc(tmp_path):
    """The README's `dvc exp run -S distill.ipc.10.iterations=500` needs the key in the table."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copyfile(REPO / "params.yaml", path)
    for ipc in load_params(path).ipcs:
        apply_overrides(path, [f"distill.ipc.{ipc}.iterations={ipc + 3}"])
    params = load_params(path)
    assert [params.distill(ipc).iterations for ipc in params.ipcs] == [
        ipc + 3 for ipc in params.ipcs]


# --- 3. and 4. MLflow: parent runs, tags, artifacts beside the store -------------------------------

def _tracking(monkeypatch, **env: str) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("DATM_TRACKING", "on")
    for name in ("MLFLOW_TRACKING_URI", "DATM_EXPERIMENT", "DVC_STAGE", "DVC_EXP_NAME",
                 "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    from datm.tracking import default_uri

    return MlflowClient(tracking_uri=default_uri(root))


SETTINGS = {"net": {"width": 4}, "distill": {"ipc1": {"iterations": 3}}}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy, inside mlflow
def test_stage_runs_nest_under_one_parent_per_experiment(tmp_path, monkeypatch):
    from datm.tracking import Tracker

    _tracking(monkeypatch, DVC_STAGE="distill@1", DVC_EXP_NAME="exp-a")
    with Tracker("distill", tmp_path, run_name="distill@1", settings=SETTINGS) as first:
        first.pipeline_metrics({"acc.distilled.ipc1": 0.5, "acc.full_dataset": None})
    with Tracker("evaluate", tmp_path, run_name="evaluate@1", settings=SETTINGS) as second:
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "exp-b")
    with Tracker("distill", tmp_path, run_name="distill@1", settings=SETTINGS) as other:
        pass
    monkeypatch.delenv("DVC_STAGE")  # by hand: a run of its own
    with Tracker("distill", tmp_path, run_name="distill@1", settings=SETTINGS) as by_hand:
        pass

    client = _client(tmp_path)
    assert first.parent_id and first.parent_id == second.parent_id != other.parent_id
    assert by_hand.parent_id is None
    parent = client.get_run(first.parent_id)
    assert parent.info.run_name == "exp-a" and parent.info.status == "FINISHED"
    assert parent.data.tags["dvc_exp"] == "exp-a" and parent.data.tags["stage"] == "pipeline"
    assert parent.data.params == {"net.width": "4", "distill.ipc1.iterations": "3"}
    assert parent.data.metrics == {"acc.distilled.ipc1": 0.5}
    run = client.get_run(first.run_id)
    assert run.info.run_name == "distill@1 [exp-a]"
    assert run.data.tags["mlflow.parentRunId"] == first.parent_id
    assert run.data.tags["dvc_exp"] == "exp-a" and run.data.tags["git_commit"]
    assert client.get_run(other.run_id).info.run_name == "distill@1 [exp-b]"
    assert client.get_run(by_hand.run_id).data.tags["dvc_exp"] == "exp-b"

    # outside an experiment: one parent per commit and settings
    monkeypatch.setenv("DVC_STAGE", "zca")
    monkeypatch.delenv("DVC_EXP_NAME")
    with Tracker("zca", tmp_path, settings=SETTINGS) as a, \
            Tracker("zca", tmp_path, settings={**SETTINGS, "seed": 1}) as b:
        pass
    assert a.parent_id and b.parent_id and a.parent_id != b.parent_id
    assert client.get_run(a.run_id).info.run_name == "zca"
    assert client.get_run(a.parent_id).data.tags["dvc_exp"] == "workspace"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_artifacts_stay_inside_a_moved_project(tmp_path, monkeypatch):
    from datm.tracking import Tracker

    _tracking(monkeypatch)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (tmp_path / "grid_final.png").write_bytes(b"first")
    with Tracker("distill", old) as tracker:
        tracker.artifact(tmp_path / "grid_final.png")
        first = tracker.run_id
    assert (old / "mlartifacts").is_dir()
    shutil.move(old, new)
    (tmp_path / "grid_final.png").write_bytes(b"second")
    with Tracker("distill", new) as tracker:
        tracker.artifact(tmp_path / "grid_final.png", "grids")
        second = tracker.run_id
    assert not old.exists(), "the moved project's runs wrote into its old folder"
    client = _client(new)
    for run_id, rel, content in ((first, "grid_final.png", b"first"),
                                 (second, "grids/grid_final.png", b"second")):
        uri = client.get_run(run_id).info.artifact_uri
        assert str(tmp_path) not in uri and uri.startswith("mlflow-artifacts:/"), uri
        files = list((new / "mlartifacts").rglob(rel))
        assert [f.read_bytes() for f in files if run_id in str(f)] == [content]


@pytest.mark.slow
def test_the_ui_serves_the_artifacts_of_a_moved_project(tmp_path, monkeypatch):
    """`datm ui` on the moved project lists and serves what the runs logged before the move."""
    from urllib.request import urlopen

    from datm.tracking import Tracker

    _tracking(monkeypatch)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (tmp_path / "summary.md").write_text("# moved\n")
    with Tracker("summary", old) as tracker:
        tracker.artifact(tmp_path / "summary.md")
        run_id = tracker.run_id
    shutil.move(old, new)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([helpers.DATM, "ui", "--port", str(port), "--root", str(new)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                          env=helpers.base_env(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        listing = None
        while listing is None:
            assert ui.poll() is None and time.monotonic() < deadline, "the UI never answered"
            try:
                with urlopen(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={run_id}",
                             timeout=5) as response:
                    listing = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert [f["path"] for f in listing["files"]] == ["summary.md"]
        with urlopen(f"{base}/get-artifact?path=summary.md&run_uuid={run_id}",
                     timeout=10) as response:
            assert response.read() == b"# moved\n"
    finally:
        import os
        import signal

        try:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(ui.pid, signal.SIGKILL)


# --- 5. the random real baseline: computed once, read by evaluate ---------------------------------

def test_evaluate_reads_the_baseline_of_its_protocol(tmp_path, monkeypatch):
    from datm import evaluate as protocol
    from datm import pipeline
    from datm.pipeline.evaluate import baseline_ipc, baseline_path

    raw = helpers.tiny_params()
    raw["evaluate"].update(models=1, epochs=2)
    paths = helpers.tiny_project(tmp_path, raw)
    params = Params.from_dict(yaml.safe_load(yaml.safe_dump(raw)))
    pipeline.distill_ipc(params, paths, 1)
    base = baseline_ipc(params, paths, 1)
    stored = json.loads(baseline_path(paths, 1).read_text())
    assert "seconds" not in stored and stored["random_real"] == base["random_real"]

    trained: list[str] = []
    real = protocol.evaluate_set

    def spy(*args, **kwargs):
        trained.append("set")
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "evaluate_set", spy)
    ev = pipeline.evaluate_ipc(params, paths, 1)
    # the distilled set and the set it started from; the random real subset comes from the baseline
    assert len(trained) == 2, "evaluate trained the random real subset again"
    assert ev["random_real"] == base["random_real"]
    assert [r["set"] for r in ev["runs"]] == ["distilled", "initialization", "random real"]

    # another recipe: the stored baseline is not that protocol's, so evaluate trains its own
    raw["evaluate"]["random_lr"] = 0.02
    other = Params.from_dict(yaml.safe_load(yaml.safe_dump(raw)))
    trained.clear()
    ev = pipeline.evaluate_ipc(other, paths, 1)
    assert len(trained) == 3 and ev["runs"][-1]["lr"] == 0.02
    assert json.loads(baseline_path(paths, 1).read_text()) == stored  # not evaluate's file


# --- 7. a stage run by hand on DVC-tracked outputs ---------------------------------------------------

def test_warning_for_a_by_hand_change_of_a_dvc_tracked_output(tmp_path):
    import hashlib

    from stages.common import dvc_tracked_warning

    out = tmp_path / "artifacts" / "distilled" / "ipc_1.safetensors"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"recorded")
    assert dvc_tracked_warning(tmp_path, "distill@1") is None  # no dvc.lock: no DVC project
    lock = {"schema": "2.0", "stages": {"distill@1": {"cmd": "python -m stages.distill", "outs": [
        {"path": "artifacts/distilled/ipc_1.safetensors", "hash": "md5",
         "md5": hashlib.md5(b"recorded").hexdigest(), "size": 8}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert dvc_tracked_warning(tmp_path, "distill@1") is None  # what dvc.lock records
    assert dvc_tracked_warning(tmp_path, "distill@2") is None  # a stage DVC never ran
    out.write_bytes(b"changed by hand")
    message = dvc_tracked_warning(tmp_path, "distill@1")
    assert message and "artifacts/distilled/ipc_1.safetensors" in message
    assert "dvc commit distill@1" in message and "dvc repro" in message


def test_a_folder_output_warns_only_when_its_files_changed(tmp_path):
    """buffers' output is a folder: dvc.lock holds a `.dir` md5 whose file list DVC keeps in its
    cache. A by-hand `datm buffers` that left the experts as they were must not warn (before,
    a folder always counted as changed)."""
    from stages.common import dvc_tracked_warning

    root = tmp_path
    env = helpers.base_env()
    assert helpers.run(["git", "init", "-q"], cwd=root, env=env).returncode == 0
    assert helpers.run([DVC, "init", "-q"], cwd=root, env=env).returncode == 0
    experts = root / "artifacts" / "buffers"
    experts.mkdir(parents=True)
    for k in range(2):
        (experts / f"expert_00{k}.safetensors").write_bytes(bytes([k]) * 100)
    (root / "dvc.yaml").write_text("stages:\n  buffers:\n    cmd: \"true\"\n"
                                   "    outs: [artifacts/buffers]\n")
    result = helpers.run([DVC, "commit", "-f", "buffers"], cwd=root, env=env)
    assert result.returncode == 0, helpers.describe(result)
    assert dvc_tracked_warning(root, "buffers") is None
    (experts / "expert_001.safetensors").write_bytes(b"retrained")
    assert "artifacts/buffers" in dvc_tracked_warning(root, "buffers")
    (experts / "expert_001.safetensors").write_bytes(bytes([1]) * 100)
    assert dvc_tracked_warning(root, "buffers") is None
    (experts / "expert_002.safetensors").write_bytes(b"one more")
    assert "artifacts/buffers" in dvc_tracked_warning(root, "buffers")


@pytest.mark.slow
def test_status_prints_its_table_to_stdout(tmp_path):
    helpers.write_params(tmp_path, helpers.tiny_params())
    result = datm("status", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert "distilled ipc 2" in result.stdout and "missing" in result.stdout
    assert "distilled ipc" not in result.stderr


# --- end to end: `dvc repro`, two `dvc exp run`s, MLflow, status, plots (slow) -----------------------

class Project:
    def __init__(self, root: Path, env: dict, commit: str) -> None:
        self.root, self.env, self.commit = root, env, commit

    def dvc(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return helpers.run([DVC, *args], cwd=self.root, env=self.env, timeout=timeout)

    def git(self, *args: str) -> subprocess.CompletedProcess:
        return helpers.run(["git", "-c", "user.name=datm tests", "-c",
                            "user.email=tests@example.invalid", *args], cwd=self.root,
                           env=self.env)

    def restore(self) -> None:
        """The committed state: params, dvc.lock, metrics and reports, and the outputs."""
        assert self.git("checkout", "HEAD", "--", ".").returncode == 0
        assert self.dvc("checkout", "--force").returncode == 0

    def client(self):
        return _client(self.root)

    def runs(self) -> list:
        client = self.client()
        exp = client.get_experiment_by_name("datm")
        return client.search_runs([exp.experiment_id], max_results=1000)


N_TRAIN, N_TEST = 120, 40


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A tiny git + DVC project after `dvc repro` with MLflow tracking on, results committed."""
    pytest.importorskip("mlflow")
    root = helpers.copy_project(tmp_path_factory.mktemp("experiments"))
    helpers.make_fashion_mnist(root / "standin", N_TRAIN, N_TEST)
    params = helpers.tiny_params("fashion_mnist", "standin")
    # per-IPC keys as the shipped profile has them: strings, each table listing iterations
    params["distill"]["ipc"] = {str(k): {**v, "iterations": 3}
                                for k, v in params["distill"]["ipc"].items()}
    # torchrun where rank 0 logs for the others (distill, evaluate); a start-up of ~8 s saved
    # on each of the rest
    params["launch"].update(baseline=1, crossarch=1, decompose=1)
    helpers.write_params(root, params)
    env = helpers.base_env(DATM_TRACKING="on")
    commit = helpers.git_commit_all(root)
    first = helpers.run([DVC, "repro"], cwd=root, env=env, timeout=900)
    if first.returncode != 0:
        pytest.fail(f"`dvc repro` failed:\n{describe(first)}")
    project = Project(root, env, commit)
    project.first = first
    helpers.git_commit_all(root, "results")  # metrics/, reports/ and dvc.lock: git's
    return project


@pytest.mark.slow
def test_repro_builds_every_artifact(project):
    helpers.check_every_artifact(project.root, ran_stages(project.first.stdout), "fashion_mnist",
                                 (1, 28, 28), N_TRAIN, N_TEST)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_repro_is_one_parent_run_with_the_stage_runs_under_it(project):
    runs = project.runs()
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in children} == ran_stages(project.first.stdout)
    assert len(children) == len(runs) - 1 == 12
    for run in runs:
        assert run.data.tags["git_commit"] == project.commit
        assert run.data.tags["dvc_exp"] == "workspace"
        assert run.info.status == "FINISHED"
    # settings and accuracy side by side on the parent
    params, metrics = parent.data.params, parent.data.metrics
    assert params["data.name"] == "fashion_mnist" and params["net.width"] == "4"
    assert params["distill.ipc2.syn_steps"] == "2" and params["zca.enabled"] == "True"
    assert params["buffers.num_experts"] == "2" and params["augment.strategy"]
    assert {"acc.distilled.ipc1", "acc.distilled.ipc2", "acc.random_real.ipc1",
            "acc.random_real.ipc2", "acc.full_dataset"} <= set(metrics)
    evaluate = next(r for r in children if r.info.run_name == "evaluate@2")
    assert evaluate.data.params["distill.syn_steps"] == "2"
    assert evaluate.data.params["net.width"] == "4"
    stages = {r.data.tags.get("stage") for r in children}
    assert stages == {"download", "zca", "buffers", "baseline", "distill", "evaluate",
                      "crossarch", "decompose", "summary"}, stages
    # each distillation: its IPC, its settings, its loss per iteration, the torch that ran it
    from importlib import metadata

    distills = {r.data.tags.get("ipc"): r for r in children if r.data.tags.get("stage") == "distill"}
    assert set(distills) == {"1", "2"}
    for run in distills.values():
        assert run.data.params["distill.syn_steps"] == "2"
        assert len(project.client().get_metric_history(run.info.run_id, "loss")) == 3
        assert run.data.tags["torch"] == metadata.version("torch")
    # stable artifact names, inside the project
    distill = next(r for r in children if r.info.run_name == "distill@1")
    folder = project.root / "mlartifacts" / "datm" / distill.info.run_id / "artifacts"
    assert (folder / "grid_init.png").is_file() and (folder / "grid_final.png").is_file()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_report_the_plots_and_mlflow_carry_exactly_the_metrics_files_numbers(project):
    """summary.md, metrics/plots/accuracy.csv and the MLflow parent run are copies of
    metrics/*.json: every accuracy there is the file's, to the digit shown (the report) or
    exactly (the CSV and MLflow)."""
    import csv

    root = project.root
    buffers = json.loads((root / "metrics/buffers.json").read_text())
    evals = {ipc: json.loads((root / f"metrics/evaluate/ipc_{ipc}.json").read_text())
             for ipc in (1, 2)}
    parts = {p.stem: json.loads(p.read_text()) for p in (root / "metrics/decompose").glob("*.json")}
    report = (root / "reports/summary.md").read_text()
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    for ipc, ev in evals.items():
        assert ev["full_dataset"] == buffers["full_dataset"]
        row = next(line for line in report.splitlines() if line.startswith(f"| {ipc} |"))
        for key in ("distilled", "distilled_std", "random_real", "random_real_std",
                    "full_dataset", "full_dataset_std"):
            assert pct(ev[key]) in row, (ipc, key, row)
    table = list(csv.DictReader((root / "metrics/plots/accuracy.csv").open()))
    assert [int(r["ipc"]) for r in table] == sorted(evals)
    for r in table:
        ev = evals[int(r["ipc"])]
        assert (float(r["distilled"]), float(r["random_real"]), float(r["full_dataset"])) == (
            ev["distilled"], ev["random_real"], ev["full_dataset"])
    parent = next(r for r in project.runs() if r.data.tags.get("stage") == "pipeline"
                  and r.data.tags.get("dvc_exp") == "workspace")
    metrics = parent.data.metrics
    assert metrics["acc.full_dataset"] == buffers["full_dataset"]
    for ipc, ev in evals.items():
        assert metrics[f"acc.distilled.ipc{ipc}"] == ev["distilled"]
        assert metrics[f"acc.random_real.ipc{ipc}"] == ev["random_real"]
    assert parts, "the tiny project decomposes an IPC"
    for name, d in parts.items():
        ipc = int(name.removeprefix("ipc_"))
        row = next(line for line in report.split("## Where the gain comes from")[1].splitlines()
                   if line.startswith(f"| {ipc} |"))
        for key in ("distilled_soft", "distilled_hard", "random_soft", "random_hard"):
            assert metrics[f"decompose.ipc{ipc}.{key}"] == d[key]
            assert pct(d[key]) in row


@pytest.mark.slow
def test_exp_run_sets_one_ipcs_iterations_without_rerunning_its_baseline(project):
    """A change to one IPC's settings re-runs that IPC's stages and the summary, nothing else
    (`dvc exp run -S` edits params.yaml and runs `dvc repro`; which stage each setting reaches
    without running: tests/test_dvc_repro.py)."""
    from datm import artifacts

    result = project.dvc("exp", "run", "-S", "distill.ipc.2.iterations=5", "-n", "more-iters")
    assert result.returncode == 0, describe(result)
    assert ran_stages(result.stdout) == {"distill@2", "evaluate@2", "crossarch@2", "summary"}, \
        result.stdout
    meta = artifacts.read_meta(project.root / "artifacts/distilled/ipc_2.safetensors",
                               "distilled")
    assert meta["iteration"] == 5
    ev = json.loads((project.root / "metrics/evaluate/ipc_2.json").read_text())
    base = json.loads((project.root / "metrics/baseline/ipc_2.json").read_text())
    assert ev["random_real"] == base["random_real"]


def _experiments(shown: list) -> dict[str, dict]:
    """name -> data of every experiment in `dvc exp show --json`."""
    found = {}
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                found[rev.get("name") or rev["rev"]] = rev.get("data") or {}
    return found


@pytest.mark.slow
def test_exp_show_lists_the_metrics_of_two_experiments(project):
    project.git("checkout", "HEAD", "--", "params.yaml")  # the second starts from the commit
    result = project.dvc("exp", "run", "-S", "distill.ipc.1.lr_img=20", "-n", "lr-img-20")
    assert result.returncode == 0, describe(result)
    assert "baseline@1" not in ran_stages(result.stdout)

    shown = project.dvc("exp", "show", "--json")
    assert shown.returncode == 0, describe(shown)
    experiments = _experiments(json.loads(shown.stdout))
    assert {"more-iters", "lr-img-20"} <= set(experiments)
    for name in ("more-iters", "lr-img-20"):
        metrics = experiments[name]["metrics"]
        for ipc in (1, 2):
            row = metrics[f"metrics/evaluate/ipc_{ipc}.json"]["data"]
            assert 0 <= row["distilled"] <= 1 and 0 <= row["random_real"] <= 1, (name, row)
    ipc_tables = {name: experiments[name]["params"]["params.yaml"]["data"]["distill"]["ipc"]
                  for name in ("more-iters", "lr-img-20")}
    assert ipc_tables["more-iters"]["2"]["iterations"] == 5
    assert ipc_tables["lr-img-20"]["1"]["lr_img"] == 20

    diff = project.dvc("exp", "diff", "more-iters", "lr-img-20", "--json")
    assert diff.returncode == 0, describe(diff)
    changed = json.loads(diff.stdout)["params"]["params.yaml"]
    assert {"distill.ipc.1.lr_img", "distill.ipc.2.iterations"} <= set(changed)
    plots = project.dvc("plots", "diff", "more-iters", "lr-img-20", "--json")
    assert plots.returncode == 0, describe(plots)
    assert "more-iters" in plots.stdout and "lr-img-20" in plots.stdout


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_each_experiment_is_a_parent_run_with_its_settings_and_accuracy(project):
    runs = project.runs()
    parents = {r.data.tags.get("dvc_exp"): r for r in runs
               if r.data.tags.get("stage") == "pipeline"}
    assert {"workspace", "more-iters", "lr-img-20"} <= set(parents)
    assert parents["more-iters"].data.params["distill.ipc2.iterations"] == "5"
    assert parents["lr-img-20"].data.params["distill.ipc2.iterations"] == "3"
    assert parents["lr-img-20"].data.params["distill.ipc1.lr_img"] == "20.0"
    for name in ("more-iters", "lr-img-20"):
        parent = parents[name]
        assert parent.info.run_name == name and parent.info.status == "FINISHED"
        # every IPC's accuracy, also where DVC took evaluate@N from its cache (summary logs all)
        assert {"acc.distilled.ipc1", "acc.distilled.ipc2", "acc.random_real.ipc1",
                "acc.random_real.ipc2"} <= set(parent.data.metrics), name
        children = [r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert children and all(r.info.run_name.endswith(f" [{name}]") for r in children)
        assert all(r.data.tags["dvc_exp"] == name for r in children)


@pytest.mark.slow
def test_datm_status_agrees_with_dvc_status(project):
    project.restore()
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["distill"]["ipc"]["2"]["lr_img"] = 30
    helpers.write_params(project.root, params)
    try:
        dvc_status = json.loads(project.dvc("status", "--json").stdout or "{}")
        assert set(dvc_status) == {"distill@2"}  # not baseline@2: no distill setting reaches it
        result = datm("status", cwd=project.root, env=project.env)
        assert result.returncode == 0, describe(result)
        rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
                for line in result.stdout.splitlines() if line.count("│") == 4}
        assert rows["distilled ipc 2"] == "stale (dvc status)", result.stdout
        assert rows["distilled ipc 1"] == "done" and rows["baseline ipc 2"] == "ok"
        assert "distill@2 would re-run" in result.stdout
    finally:
        project.restore()


@pytest.mark.slow
def test_a_stage_run_by_hand_warns_about_its_dvc_tracked_output(project):
    project.restore()
    env = {**project.env, "DATM_TRACKING": "off"}  # the warning is DVC's business, not MLflow's
    same = datm("distill", "--ipc", "1", cwd=project.root, env=env)
    assert same.returncode == 0, describe(same)
    assert "warning" not in same.stderr  # resumed at its end: the bytes dvc.lock records
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["distill"]["ipc"]["1"]["iterations"] = 4
    helpers.write_params(project.root, params)
    try:
        result = datm("distill", "--ipc", "1", cwd=project.root, env=env)
        assert result.returncode == 0, describe(result)
        text = " ".join(result.stderr.split())
        assert "warning: artifacts/distilled/ipc_1.safetensors is tracked by DVC" in text
        assert "dvc commit distill@1" in text and "dvc repro" in text
    finally:
        project.restore()


@pytest.mark.slow
def test_forced_rerun_of_unchanged_stages_leaves_everything_downstream_fresh(project):
    """Artifacts are deterministic: re-running download, zca (ZCA on) and buffers by force on
    the same data writes the same bytes, so DVC sees nothing downstream as changed (it once
    marked 2 of 3 tries). Tracking off: no new MLflow runs for the tests above to count."""
    project.restore()
    env = {**project.env, "DATM_TRACKING": "off"}

    def status() -> dict:
        result = helpers.run([DVC, "status", "--json"], cwd=project.root, env=env)
        assert result.returncode == 0, describe(result)
        return json.loads(result.stdout.strip() or "{}")

    assert status() == {}
    for stage in ("download", "zca", "buffers"):
        result = helpers.run([DVC, "repro", "-f", "-s", stage], cwd=project.root, env=env,
                             timeout=600)
        assert result.returncode == 0, describe(result)
        assert status() == {}, f"forced {stage} made downstream stages stale"


# --- 6. `datm plots`: titled, labelled, rendered without a network ------------------------------

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_datm_plots_renders_offline(project, tmp_path):
    if not (REPO / ".plots" / "node_modules" / "vega-embed").is_dir():
        pytest.skip("vega is not installed in .plots/ (scripts/setup.sh does it with npm)")
    out = tmp_path / "dvc_plots"
    result = datm("plots", "more-iters", "lr-img-20", "--out", str(out), cwd=project.root,
                  env=project.env)
    assert result.returncode == 0, describe(result)
    page = (out / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src=" not in page
    for text in ("test accuracy vs images per class", "test accuracy (%)", "images per class",
                 "matching loss per IPC", "matching loss", "'IPC ' + datum.ipc",
                 "more-iters", "lr-img-20"):
        assert text in page, text
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium to render the page")
    shot = tmp_path / "plots.png"
    offline = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
               "--window-size=1200,900", "--virtual-time-budget=10000"]
    dom = subprocess.run([*offline, "--dump-dom", (out / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.stdout.count("<canvas") >= 2, dom.stderr[-2000:]  # vega drew both plots
    subprocess.run([*offline, f"--screenshot={shot}", (out / "index.html").as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(1 << 20) or []
    assert len(colours) > 50, "the rendered page is blank"
