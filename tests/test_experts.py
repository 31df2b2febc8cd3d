"""datm.experts: trajectories on disk, resume after a kill, stale files, SAM, batched groups."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import TINY_AUG, TINY_SPEC

from datm import artifacts
from datm.experts import KIND, ExpertBuffer, ExpertConfig, config_hash, expert_path, train_experts
from datm.networks import FlatModel

CFG = ExpertConfig(num_experts=2, epochs=2, lr=0.05, batch=16, seed=0)


def train(out: Path, data, cfg: ExpertConfig = CFG, events: list | None = None, **kw):
    x, y, xt, yt = data
    callback = events.append if events is not None else None
    return train_experts(out, TINY_SPEC, x, y, xt, yt, cfg, TINY_AUG, data_id="tiny",
                         callback=callback, **kw)


def trajectory(path: Path) -> torch.Tensor:
    # safetensors maps the file: clone so that a later in-place overwrite cannot change it
    return artifacts.load(path, KIND)[0]["trajectory"].clone()


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.glob("expert_*.safetensors"))}


def trained_indices(events: list[dict]) -> list[int]:
    return [e["index"] for e in events if e["event"] == "expert"]


def test_writes_one_file_per_expert_with_trajectory_and_metadata(tmp_path, tiny_data):
    events: list[dict] = []
    paths = train(tmp_path, tiny_data, events=events)
    assert paths == [expert_path(tmp_path, 0), expert_path(tmp_path, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "expert_000.safetensors", "expert_001.safetensors"]
    num_params = FlatModel(TINY_SPEC).num_params
    trajs = []
    for k, path in enumerate(paths):
        tensors, meta = artifacts.load(path, KIND)
        traj = tensors["trajectory"]
        assert traj.shape == (CFG.epochs + 1, num_params) and traj.dtype == torch.float32
        assert torch.isfinite(traj).all()
        assert all(not torch.equal(traj[e], traj[e + 1]) for e in range(CFG.epochs))
        assert meta["index"] == k and meta["epochs"] == CFG.epochs
        assert meta["spec"] == TINY_SPEC.to_dict()
        assert meta["config"]["lr"] == CFG.lr and meta["config"]["batch"] == CFG.batch
        assert meta["hash"] == config_hash(TINY_SPEC, CFG, TINY_AUG, "tiny")
        assert len(meta["train_acc"]) == len(meta["test_acc"]) == CFG.epochs
        assert all(0 <= a <= 1 for a in meta["train_acc"] + meta["test_acc"])
        assert meta["images_seen"] == CFG.epochs * tiny_data[0].shape[0]
        trajs.append(traj)
    assert not torch.equal(trajs[0][0], trajs[1][0])  # different random inits
    assert trained_indices(events) == [0, 1]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 1, 2]


def test_training_improves_the_fit(tmp_path, tiny_data):
    path = train(tmp_path, tiny_data, replace(CFG, num_experts=1, epochs=4, lr=0.1))[0]
    traj = trajectory(path)
    fm = FlatModel(TINY_SPEC)
    x, y, _, _ = tiny_data
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(fm(traj[0], x), y)
        last = torch.nn.functional.cross_entropy(fm(traj[-1], x), y)
    assert last < first


def test_resume_trains_only_missing_experts(tmp_path, tiny_data):
    train(tmp_path, tiny_data)
    before = snapshot(tmp_path)
    events: list[dict] = []
    paths = train(tmp_path, tiny_data, replace(CFG, num_experts=3), events=events)
    assert len(paths) == 3 and all(p.is_file() for p in paths)
    after = snapshot(tmp_path)
    for name in before:
        assert after[name] == before[name], f"{name} was rewritten"
    assert trained_indices(events) == [2]
    start = next(e for e in events if e["event"] == "start")
    assert start["done"] == 2 and start["total"] == 3


def test_deleted_expert_is_recreated_identically(tmp_path, tiny_data):
    cfg = replace(CFG, num_experts=3)
    train(tmp_path, tiny_data, cfg)
    original = trajectory(expert_path(tmp_path, 1))
    keep = snapshot(tmp_path)
    expert_path(tmp_path, 1).unlink()
    events: list[dict] = []
    train(tmp_path, tiny_data, cfg, events=events)
    assert trained_indices(events) == [1]
    assert torch.equal(trajectory(expert_path(tmp_path, 1)), original)
    after = snapshot(tmp_path)
    for name in ("expert_000.safetensors", "expert_002.safetensors"):
        assert after[name] == keep[name]


def test_kill_after_an_expert_then_resume(tmp_path, tiny_data):
    """A KeyboardInterrupt mid-run keeps finished experts; the re-run finishes the rest."""
    cfg = replace(CFG, num_experts=3)

    def killer(event: dict) -> None:
        if event["event"] == "expert" and event["index"] == 1:
            raise KeyboardInterrupt

    x, y, xt, yt = tiny_data
    with pytest.raises(KeyboardInterrupt):
        train_experts(tmp_path, TINY_SPEC, x, y, xt, yt, cfg, TINY_AUG, "tiny", killer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "expert_000.safetensors", "expert_001.safetensors"]
    kept = snapshot(tmp_path)
    events: list[dict] = []
    train(tmp_path, tiny_data, cfg, events=events)
    assert trained_indices(events) == [2]
    assert {k: v for k, v in snapshot(tmp_path).items() if k in kept} == kept
    # the interrupted run produced the same experts an uninterrupted one does
    clean = tmp_path.parent / (tmp_path.name + "_clean")
    train(clean, tiny_data, cfg)
    for k in range(3):
        assert torch.equal(trajectory(expert_path(tmp_path, k)),
                           trajectory(expert_path(clean, k)))


def test_leftover_temp_files_and_damaged_experts_are_dropped(tmp_path, tiny_data):
    train(tmp_path, tiny_data)
    original = trajectory(expert_path(tmp_path, 1))
    expert_path(tmp_path, 1).write_bytes(b"\x00" * 40)  # killed mid-copy, say
    (tmp_path / ".expert_002.safetensors.abc.tmp").write_bytes(b"partial")
    events: list[dict] = []
    train(tmp_path, tiny_data, events=events)
    assert trained_indices(events) == [1]
    assert torch.equal(trajectory(expert_path(tmp_path, 1)), original)
    assert not list(tmp_path.glob(".*.tmp"))


def test_changed_setting_drops_stale_experts(tmp_path, tiny_data):
    train(tmp_path, tiny_data)
    old = [trajectory(expert_path(tmp_path, k)) for k in range(2)]
    events: list[dict] = []
    new_cfg = replace(CFG, lr=0.02)
    train(tmp_path, tiny_data, new_cfg, events=events)
    assert trained_indices(events) == [0, 1]
    for k in range(2):
        meta = artifacts.read_meta(expert_path(tmp_path, k), KIND)
        assert meta["config"]["lr"] == 0.02
        assert meta["hash"] == config_hash(TINY_SPEC, new_cfg, TINY_AUG, "tiny")
        new = trajectory(expert_path(tmp_path, k))
        assert torch.equal(new[0], old[k][0])  # same init ...
        assert not torch.equal(new[-1], old[k][-1])  # ... other training


def test_other_data_or_augmentation_drops_stale_experts(tmp_path, tiny_data):
    train(tmp_path, tiny_data)
    x, y, xt, yt = tiny_data
    events: list[dict] = []
    train_experts(tmp_path, TINY_SPEC, x, y, xt, yt, CFG, TINY_AUG, data_id="other data",
                  callback=events.append)
    assert trained_indices(events) == [0, 1]
    events.clear()
    train_experts(tmp_path, TINY_SPEC, x, y, xt, yt, CFG, replace(TINY_AUG, enabled=False),
                  data_id="other data", callback=events.append)
    assert trained_indices(events) == [0, 1]


def test_fewer_experts_drops_the_extra_files(tmp_path, tiny_data):
    train(tmp_path, tiny_data, replace(CFG, num_experts=3))
    kept = snapshot(tmp_path)
    events: list[dict] = []
    paths = train(tmp_path, tiny_data, replace(CFG, num_experts=2), events=events)
    assert trained_indices(events) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]
    assert snapshot(tmp_path) == {k: v for k, v in kept.items() if k != "expert_002.safetensors"}


def test_num_experts_and_group_do_not_change_the_hash():
    base = config_hash(TINY_SPEC, CFG, TINY_AUG, "d")
    assert config_hash(TINY_SPEC, replace(CFG, num_experts=9, group=4), TINY_AUG, "d") == base
    for changed in (replace(CFG, lr=0.2), replace(CFG, epochs=3), replace(CFG, rho=0.01),
                    replace(CFG, momentum=0.9), replace(CFG, seed=1), replace(CFG, batch=8)):
        assert config_hash(TINY_SPEC, changed, TINY_AUG, "d") != base
    assert config_hash(replace(TINY_SPEC, width=8), CFG, TINY_AUG, "d") != base


def test_expert_buffer_reads_the_right_rows(tiny_buffer):
    assert len(tiny_buffer) == 3
    assert tiny_buffer.epochs == 5
    assert tiny_buffer.lr == pytest.approx(0.05)
    assert tiny_buffer.spec == TINY_SPEC
    for k in range(3):
        full = trajectory(tiny_buffer.paths[k])
        for rows in ([0], [5], [3, 1], [2, 2, 4]):
            got = tiny_buffer.snapshots_of(k, rows)
            assert got.shape == (len(rows), full.shape[1])
            assert torch.equal(got, full[rows])


def test_expert_buffer_open_errors(tmp_path):
    with pytest.raises(artifacts.ArtifactError, match="no experts"):
        ExpertBuffer.open(tmp_path)
    (tmp_path / "expert_000.safetensors").write_bytes(b"junk")
    with pytest.raises(artifacts.ArtifactError):
        ExpertBuffer.open(tmp_path)


def test_sharpness_aware_experts_differ_from_plain_sgd(tmp_path, tiny_data):
    cfg = replace(CFG, num_experts=1)
    plain = trajectory(train(tmp_path / "sgd", tiny_data, cfg)[0])
    sam = trajectory(train(tmp_path / "sam", tiny_data, replace(cfg, rho=0.05))[0])
    assert torch.isfinite(sam).all()
    assert torch.equal(sam[0], plain[0])  # same init
    assert not torch.allclose(sam[1:], plain[1:])
    meta = artifacts.read_meta(expert_path(tmp_path / "sam", 0), KIND)
    assert meta["config"]["rho"] == 0.05


@pytest.mark.parametrize("extra", [{}, {"momentum": 0.9, "weight_decay": 5e-4},
                                   {"rho": 0.05}])
def test_batched_group_equals_one_at_a_time(tmp_path, tiny_data, extra):
    cfg = replace(CFG, num_experts=3, **extra)
    train(tmp_path / "single", tiny_data, replace(cfg, group=1))
    events: list[dict] = []
    train(tmp_path / "grouped", tiny_data, replace(cfg, group=2), events=events)
    groups = [e["experts"] for e in events if e["event"] == "group"]
    assert groups == [[0, 1], [2]]
    for k in range(3):
        a = trajectory(expert_path(tmp_path / "single", k))
        b = trajectory(expert_path(tmp_path / "grouped", k))
        assert torch.allclose(a, b, atol=1e-5), (k, float((a - b).abs().max()))
        ma = artifacts.read_meta(expert_path(tmp_path / "single", k), KIND)
        mb = artifacts.read_meta(expert_path(tmp_path / "grouped", k), KIND)
        assert ma["test_acc"] == pytest.approx(mb["test_acc"], abs=1e-6)


def test_invalid_settings_are_refused():
    for bad in ({"num_experts": 0}, {"epochs": 0}, {"batch": 0}, {"group": 0}, {"lr": 0},
                {"rho": -0.1}):
        with pytest.raises(ValueError):
            ExpertConfig(**bad)
