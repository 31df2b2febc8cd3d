"""Non-finite and diverged numbers never enter or leave as a result: experts checked when
read, a diverging distillation refused before it replaces a finished set, step sizes bounded,
and settings with nothing to run refused before any stage."""

from __future__ import annotations

from dataclasses import replace

import helpers
import pytest
import torch
from test_pipeline import tiny_raw

from datm import artifacts, pipeline
from datm.config import ConfigError, DistillConfig, Params
from datm.distill import Distiller, DistillError, set_problem
from datm.experts import KIND, ExpertBuffer


def _project(tmp_path):
    raw = tiny_raw()
    raw["distill"]["ipcs"] = [1]
    raw["evaluate"]["cross_ipcs"] = []
    raw["distill"]["ipc"] = {1: {"syn_steps": 2, "expert_epochs": 1, "min_start_epoch": 0,
                                 "max_start_epoch": 1, "batch_syn": 3, "iterations": 4,
                                 "checkpoint_every": 2}}
    paths = helpers.tiny_project(tmp_path, raw)
    return Params.from_dict(raw), paths


def _poison_last_row(path):
    """The expert file with its last snapshot NaN, its header (kind, meta) intact."""
    tensors, meta = artifacts.load(path, KIND)
    traj = tensors["trajectory"].clone()
    traj[-1] = float("nan")
    artifacts.save(path, {"trajectory": traj}, KIND, meta)


def test_a_nan_expert_is_named_and_the_finished_set_is_kept(tmp_path):
    params, paths = _project(tmp_path)
    pipeline.distill_ipc(params, paths, 1)
    finished = paths.distilled(1).read_bytes()
    for expert in sorted(paths.buffers.glob("expert_*.safetensors")):
        _poison_last_row(expert)
    with pytest.raises(artifacts.ArtifactError, match="snapshot 2 holds NaN/inf"):
        pipeline.distill_ipc(params, paths, 1, fresh=True)
    assert paths.distilled(1).read_bytes() == finished


def test_a_diverging_distillation_names_its_lr_and_replaces_nothing(tmp_path):
    params, paths = _project(tmp_path)
    pipeline.distill_ipc(params, paths, 1)
    finished = paths.distilled(1).read_bytes()
    wild = replace(params, distills={1: replace(params.distill(1), lr_img=1e5)})
    with pytest.raises(DistillError, match="diverged by iteration 2: its images reach .* lower "
                                           "lr_img"):
        pipeline.distill_ipc(wild, paths, 1, fresh=True)
    assert paths.distilled(1).read_bytes() == finished


def test_set_problem_names_the_setting_to_lower():
    images, labels, lr = torch.ones(4, 1, 2, 2), torch.ones(4, 3), torch.tensor(0.01)
    start = (images, labels, lr)
    assert set_problem(images, labels, lr, start) is None
    assert set_problem(images * float("nan"), labels, lr, start)[0] == "lr_img"
    assert set_problem(images * 1001, labels, lr, start)[0] == "lr_img"
    assert set_problem(images * 999, labels, lr, start) is None
    assert set_problem(images, labels * 10001, lr, start)[0] == "lr_y"
    assert set_problem(images, labels * float("inf"), lr, start)[0] == "lr_y"
    assert set_problem(images, labels, torch.tensor(-1e-3), start)[0] == "lr_lr"
    assert set_problem(images, labels, torch.tensor(11.0), start)[0] == "lr_lr"


@pytest.mark.parametrize("key, value", [("lr_img", 1e9), ("lr_y", 1e9), ("lr_lr", 10.0)])
def test_step_sizes_beyond_any_published_scale_are_refused(key, value):
    raw = tiny_raw()
    raw["distill"]["ipc"][1][key] = value
    with pytest.raises(ConfigError, match="a larger step diverges"):
        Params.from_dict(raw)


def test_an_empty_list_of_ipcs_is_refused_in_one_line():
    raw = tiny_raw()
    raw["distill"]["ipcs"] = []
    raw["evaluate"]["cross_ipcs"] = raw["evaluate"]["decompose_ipcs"] = []
    with pytest.raises(ConfigError, match="distill.ipcs is empty"):
        Params.from_dict(raw)


def test_a_buffer_read_refuses_a_diverged_row(tmp_path, tiny_data):
    from datm.experts import ExpertConfig, train_experts
    x, y, xt, yt = tiny_data
    train_experts(tmp_path, helpers.TINY_SPEC, x, y, xt, yt,
                  ExpertConfig(num_experts=1, epochs=2, lr=0.05, batch=16), helpers.TINY_AUG)
    path = next(tmp_path.glob("expert_*.safetensors"))
    tensors, meta = artifacts.load(path, KIND)
    traj = tensors["trajectory"].clone()
    traj[1, 0] = 1e5
    artifacts.save(path, {"trajectory": traj}, KIND, meta)
    buffer = ExpertBuffer.open(tmp_path)
    assert buffer.snapshots_of(0, [0, 2]).shape[0] == 2
    with pytest.raises(artifacts.ArtifactError, match="snapshot 1 holds NaN/inf or weights"):
        buffer.snapshots_of(0, [1])
    cfg = DistillConfig(ipc=1, max_start_epoch=1, expert_epochs=1)
    with pytest.raises(artifacts.ArtifactError):
        Distiller.create(cfg, buffer, x, y, helpers.TINY_AUG).step()


@pytest.mark.slow
def test_datm_repro_runs_a_fresh_project_without_crossarch_or_decompose_stages(tmp_path):
    """evaluate.cross_ipcs: [] and decompose_ipcs: [] are valid settings: on a fresh project
    (no metrics/ folders yet) `datm repro` runs through the summary."""
    root = helpers.copy_project(tmp_path / "p")
    helpers.make_fashion_mnist(root / "standin", n_train=120, n_test=40)
    params = helpers.tiny_params("fashion_mnist", "standin")
    params["distill"]["ipcs"] = [1]
    params["evaluate"]["cross_ipcs"] = params["evaluate"]["decompose_ipcs"] = []
    params["launch"] = {stage: 1 for stage in params["launch"]}
    helpers.write_params(root, params)
    helpers.git_commit_all(root)
    assert not (root / "metrics").exists()
    result = helpers.datm("repro", cwd=root, timeout=600)
    assert result.returncode == 0, helpers.describe(result)
    assert "crossarch" not in helpers.ran_stages(result.stdout)
    assert (root / "reports" / "summary.md").is_file()
