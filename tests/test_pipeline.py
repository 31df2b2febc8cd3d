"""datm.pipeline steps in-process on a tiny project: the glue between artifacts, fast.

The DVC stages and the CLI call exactly these functions; test_dvc_repro.py runs them for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch

from datm import artifacts, data, pipeline
from datm.config import ConfigError, Params, Paths
from datm.distill import DistillError
from datm.export import ExportError


def tiny_raw(eps: float = 0.1, **buffers) -> dict:
    raw = helpers.tiny_params()
    raw["zca"]["eps"] = eps
    raw["buffers"].update({"num_experts": 2, "epochs": 2, "batch": 16, "decay_epochs": 0,
                           **buffers})
    raw["evaluate"].update({"epochs": 1})
    for table in raw["distill"]["ipc"].values():
        table["batch_syn"] = 3
    return raw


def write_splits(paths: Paths, seed: int = 0, n_train: int = 60, n_test: int = 30) -> None:
    """Tiny 1x8x8 uint8 splits of 3 classes, saved the way the download stage saves them."""
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 100)):
        images, labels = helpers.learnable_uint8(n, 3, 1, 8, seed=seed + offset)
        images_t = torch.from_numpy(images)
        s = data.Split(images_t, torch.from_numpy(labels.astype(np.int64)), ["a", "b", "c"],
                       "tiny-standin")
        if split == "train":
            mean, std = data.channel_stats(images_t)
        s.mean, s.std = mean, std
        s.save(paths.train if split == "train" else paths.test, split)


@pytest.fixture
def project(tmp_path) -> Paths:
    paths = Paths(tmp_path)
    write_splits(paths)
    return paths


def trained(events: list[dict]) -> list[int]:
    return [e["index"] for e in events if e["event"] == "expert"]


def experts_of(paths: Paths) -> list[torch.Tensor]:
    return [artifacts.load(p, "expert")[0]["trajectory"].clone()
            for p in sorted(paths.buffers.glob("expert_*.safetensors"))]


def test_zca_step_writes_an_enabled_or_identity_transform(project):
    summary = pipeline.fit_zca(Params.from_dict(tiny_raw()), project)
    assert summary["enabled"] is True
    assert artifacts.read_meta(project.zca, "zca")["eps"] == 0.1
    raw = tiny_raw()
    raw["zca"]["enabled"] = False
    assert pipeline.fit_zca(Params.from_dict(raw), project) == {"enabled": False}
    assert artifacts.read_meta(project.zca, "zca")["enabled"] is False


def test_model_data_is_normalized_and_whitened(project):
    pipeline.fit_zca(Params.from_dict(tiny_raw(eps=1e-3)), project)
    md = pipeline.model_data(project, torch.device("cpu"))
    assert md.x.shape == (60, 1, 8, 8) and md.x.dtype == torch.float32
    assert md.x.mean().abs() < 1e-3
    # back to pixels gives the stored uint8 images
    train = data.Split.load(project.train)
    assert torch.allclose(md.pixels(md.x) * 255, train.images.float(), atol=0.05)


def test_buffers_step_resumes_and_keeps_matching_experts(project):
    params = Params.from_dict(tiny_raw())
    pipeline.fit_zca(params, project)
    events: list[dict] = []
    summary, timing = pipeline.train_experts(params, project, events.append)
    assert trained(events) == [0, 1] and [r["expert"] for r in summary["runs"]] == [0, 1]
    assert sorted(timing) == [0, 1] and all(t["seconds"] > 0 for t in timing.values())
    accs = [r["acc"] for r in summary["runs"]]
    assert 0 <= min(accs) <= summary["full_dataset"] == sum(accs) / 2 <= 1
    assert summary["full_dataset_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    events.clear()
    pipeline.train_experts(params, project, events.append)
    assert trained(events) == []  # nothing changed: nothing retrained


def test_experts_are_retrained_when_the_whitening_changes(project):
    """A new zca.eps re-runs the buffers stage (DVC sees a new zca artifact); experts trained
    on the old whitening must not be kept (the stage's output is `persist: true`)."""
    pipeline.fit_zca(Params.from_dict(tiny_raw(eps=0.1)), project)
    pipeline.train_experts(Params.from_dict(tiny_raw(eps=0.1)), project)
    old = experts_of(project)
    pipeline.fit_zca(Params.from_dict(tiny_raw(eps=1.0)), project)
    events: list[dict] = []
    pipeline.train_experts(Params.from_dict(tiny_raw(eps=1.0)), project, events.append)
    assert trained(events) == [0, 1], "experts trained on other inputs were kept"
    assert not torch.equal(old[0][-1], experts_of(project)[0][-1])


def test_experts_are_retrained_when_the_training_images_change(project):
    """Same source, same shape, other pixels (e.g. a re-exported image folder)."""
    params = Params.from_dict(tiny_raw())
    pipeline.fit_zca(params, project)
    pipeline.train_experts(params, project)
    write_splits(project, seed=7)
    pipeline.fit_zca(params, project)
    events: list[dict] = []
    pipeline.train_experts(params, project, events.append)
    assert trained(events) == [0, 1], "experts trained on other images were kept"


def test_distill_evaluate_export_in_process(project, tmp_path):
    params = Params.from_dict(tiny_raw())
    pipeline.fit_zca(params, project)
    pipeline.train_experts(params, project)
    events: list[dict] = []
    summary = pipeline.distill_ipc(params, project, 2, events.append)
    assert summary["iterations"] == 3 and summary["resumed_at"] == 0
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    tensors, meta = pipeline.load_distilled(project.distilled(2))
    assert tensors["images"].shape == (6, 1, 8, 8) and meta["classes"] == ["a", "b", "c"]
    assert project.checkpoint(2).is_file()

    # running it again resumes at the end: nothing more is computed, the result is the same
    again = pipeline.distill_ipc(params, project, 2)
    assert again["resumed_at"] == 3
    assert torch.equal(pipeline.load_distilled(project.distilled(2))[0]["images"],
                       tensors["images"])

    # more iterations continue the same run from its checkpoint
    raw = tiny_raw()
    raw["distill"]["defaults"]["iterations"] = 5
    more = pipeline.distill_ipc(Params.from_dict(raw), project, 2)
    assert more["resumed_at"] == 3 and more["iterations"] == 5

    ev = pipeline.evaluate_ipc(params, project, 2)
    # the metrics file is the summary without wall time (evaluate's file must not vary by run)
    assert "seconds" in ev
    assert json.loads(project.evaluation(2).read_text()) == pipeline.settled(ev)
    assert 0 <= ev["distilled"] <= 1 and 0 <= ev["random_real"] <= 1

    out = pipeline.export_ipc(params, project, 2, "safetensors", tmp_path / "export")
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["ipc"] == 2 and card["accuracy"]  # the evaluation is on the card
    result = pipeline.evaluate_from(params, project, out)
    assert 0 <= result["acc_mean"] <= 1 and result["recipe"]["ipc"] == 2


def test_distill_refuses_experts_of_another_dataset(project):
    params = Params.from_dict(tiny_raw())
    pipeline.fit_zca(params, project)
    pipeline.train_experts(params, project)
    # the data now has 4 classes; the experts were trained for 3
    images, labels = helpers.learnable_uint8(40, 4, 1, 8, seed=3)
    split = data.Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                       list("abcd"), "other", *data.channel_stats(torch.from_numpy(images)))
    split.save(project.train, "train")
    with pytest.raises(DistillError, match="number of classes"):
        pipeline.distill_ipc(params, project, 1)


def test_export_of_a_missing_ipc_lists_the_distilled_ones(project, tmp_path):
    params = Params.from_dict(tiny_raw())
    with pytest.raises(ExportError, match="none yet"):
        pipeline.export_ipc(params, project, 5, "png", tmp_path / "x")
    project.distilled(3).parent.mkdir(parents=True)
    for ipc in (10, 3):
        project.distilled(ipc).write_bytes(b"")
    with pytest.raises(ExportError, match=r"distilled IPCs: 3, 10\)"):
        pipeline.export_ipc(params, project, 5, "png", tmp_path / "x")


def test_params_errors_name_the_key():
    raw = tiny_raw()
    raw["distill"]["ipc"][2]["lr_imgg"] = 1
    with pytest.raises(ConfigError, match="distill.ipc.2.lr_imgg"):
        Params.from_dict(raw)
    raw = tiny_raw()
    raw["distill"]["ipc"][1]["max_start_epoch"] = 0
    with pytest.raises(ConfigError, match="distill.ipc.1"):
        Params.from_dict(raw)
    raw = tiny_raw()
    raw["data"]["name"] = "mnist"
    with pytest.raises(ConfigError, match="data"):
        Params.from_dict(raw)


def test_status_helpers_never_raise(tmp_path):
    paths = Paths(Path(tmp_path))
    assert pipeline.buffer_status(paths) == {"experts": 0, "readable": 0, "mean_test_acc": None}
    paths.buffers.mkdir(parents=True)
    (paths.buffers / "expert_000.safetensors").write_bytes(b"junk")
    assert pipeline.buffer_status(paths)["readable"] == 0
    assert pipeline.distilled_ipcs(paths) == []
