"""Expert snapshots every `save_every` steps, the decay tail no matching reads, resume at a
snapshot, and what a distillation takes from the snapshots (M, windows, the segment's lr)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import TINY_AUG, TINY_SPEC

from datm import artifacts, experts
from datm.config import DistillConfig, ExpertConfig
from datm.distill import Distiller, initial_lr, segment_scale
from datm.experts import KIND, ExpertBuffer, progress_path, train_experts
from datm.networks import FlatModel
from datm.windows import auto_window, mean_curve

# 64 images at batch 16: 4 steps per epoch, 12 in all; a snapshot every 3 steps
CFG = ExpertConfig(num_experts=1, epochs=3, lr=0.05, batch=16, seed=0, save_every=3)


def _train(out, data, cfg=CFG, **kw):
    x, y, xt, yt = data
    return train_experts(out, TINY_SPEC, x, y, xt, yt, cfg, TINY_AUG, data_id="tiny", **kw)


def test_snapshots_every_k_steps_are_the_per_step_trajectory_at_those_steps(tmp_path,
                                                                               tiny_data):
    every_step = artifacts.load(_train(tmp_path / "one", tiny_data,
                                       replace(CFG, save_every=1))[0], KIND)[0]["trajectory"]
    tensors, meta = artifacts.load(_train(tmp_path / "three", tiny_data)[0], KIND)
    assert meta["snapshot_steps"] == [0, 3, 6, 9, 12]
    assert torch.equal(tensors["trajectory"], every_step[[0, 3, 6, 9, 12]])
    assert len(meta["train_acc"]) == len(meta["lrs"]) == 4 and len(meta["test_acc"]) == 3
    # per epoch (save_every 0) is the same run recorded at the epochs' ends
    per_epoch = artifacts.load(_train(tmp_path / "epochs", tiny_data,
                                      replace(CFG, save_every=0))[0], KIND)[0]["trajectory"]
    assert torch.equal(per_epoch, every_step[[0, 4, 8, 12]])


def test_an_uneven_last_segment_still_ends_at_the_last_step(tmp_path, tiny_data):
    meta = artifacts.read_meta(_train(tmp_path, tiny_data, replace(CFG, save_every=5))[0], KIND)
    assert meta["snapshot_steps"] == [0, 5, 10, 12]


def test_a_killed_expert_resumes_at_its_last_snapshot_with_the_same_bytes(tmp_path, tiny_data,
                                                                          monkeypatch):
    whole = _train(tmp_path / "whole", tiny_data)[0].read_bytes()
    monkeypatch.setattr(experts, "PROGRESS_SECONDS", 0.0)  # save at every snapshot
    out = tmp_path / "killed"
    real = experts.train_group
    seen = []

    def killed(*args, **kwargs):
        if "on_snapshot" not in kwargs:  # the settings' probe
            return real(*args, **kwargs)
        save = kwargs["on_snapshot"]

        def save_then_die(state):
            save(state)
            seen.append(state.step)
            if state.step == 6:  # mid-epoch 2 (4 steps per epoch)
                raise KeyboardInterrupt
        kwargs["on_snapshot"] = save_then_die
        return real(*args, **kwargs)

    monkeypatch.setattr(experts, "train_group", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(out, tiny_data)
    assert seen == [3, 6] and progress_path(out, 0).exists()
    assert not experts.expert_path(out, 0).exists()
    resumed = []
    monkeypatch.setattr(experts, "train_group", lambda *a, **k: (
        resumed.append(k["state"].step) if k.get("state") else None, real(*a, **k))[1])
    path = _train(out, tiny_data)[0]
    assert resumed == [6]
    assert path.read_bytes() == whole
    assert not progress_path(out, 0).exists()


def test_a_progress_file_of_other_settings_is_not_resumed(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(experts, "PROGRESS_SECONDS", 0.0)
    out = tmp_path / "x"
    real = experts.train_group

    def die_at_first(*args, **kwargs):
        if "on_snapshot" not in kwargs:
            return real(*args, **kwargs)
        save = kwargs["on_snapshot"]

        def once(state):
            save(state)
            raise KeyboardInterrupt
        kwargs["on_snapshot"] = once
        return real(*args, **kwargs)

    monkeypatch.setattr(experts, "train_group", die_at_first)
    with pytest.raises(KeyboardInterrupt):
        _train(out, tiny_data)
    monkeypatch.setattr(experts, "train_group", real)
    other = replace(CFG, lr=0.04)
    fresh = _train(tmp_path / "fresh", tiny_data, other)[0].read_bytes()
    assert _train(out, tiny_data, other)[0].read_bytes() == fresh


def test_the_decay_tail_lowers_the_lr_to_zero_and_is_not_matchable():
    cfg = ExpertConfig(epochs=4, lr=0.1, batch=16, decay_epochs=1, save_every=2)
    lrs = [cfg.step_lr(s, 4) for s in range(16)]
    assert lrs[:12] == [0.1] * 12
    assert all(a > b for a, b in zip(lrs[11:], lrs[12:])) and 0 < lrs[-1] < 0.01
    assert cfg.snapshot_steps(4) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert cfg.matchable(4) == 6  # the snapshot at step 12, where the tail starts
    with pytest.raises(ValueError, match="decay_epochs needs schedule: constant"):
        replace(cfg, schedule="cosine")
    with pytest.raises(ValueError, match="decay_epochs must lie"):
        replace(cfg, decay_epochs=4)


def _buffer_with(tmp_path, tiny_data, cfg):
    _train(tmp_path, tiny_data, cfg)
    return ExpertBuffer.open(tmp_path)


def test_a_window_never_reads_the_decay_tail(tmp_path, tiny_data):
    cfg = replace(CFG, num_experts=2, epochs=4, decay_epochs=1, save_every=2)  # 8 snapshots
    buffer = _buffer_with(tmp_path, tiny_data, cfg)
    assert (buffer.snapshots, buffer.matchable, buffer.steps_per_snapshot) == (8, 6, 2.0)
    assert len(mean_curve(buffer.metas)) == 6
    x = tiny_data[0]
    for ipc in (1, 10):
        chosen = auto_window(DistillConfig(ipc=ipc, window="auto", expert_epochs=2,
                                           iterations=40),
                             mean_curve(buffer.metas), 3, x.shape[0])
        assert chosen.last_epoch_needed <= buffer.matchable
    deep = DistillConfig(ipc=1, min_start_epoch=0, max_start_epoch=6, expert_epochs=2)
    with pytest.raises(Exception, match="before their decay tail"):
        Distiller.create(deep, buffer, *tiny_data[:2], TINY_AUG)


def test_the_expert_to_student_step_ratio_is_what_the_params_say(tmp_path, tiny_data):
    buffer = _buffer_with(tmp_path, tiny_data, replace(CFG, save_every=2))
    cfg = DistillConfig(ipc=1, min_start_epoch=0, max_start_epoch=3, expert_epochs=2,
                        syn_steps=2, iterations=3)
    d = Distiller.create(cfg, buffer, *tiny_data[:2], TINY_AUG)
    info = d.step()
    steps = buffer.metas[0]["snapshot_steps"]
    start = info["start_epoch"]
    # the target is M snapshots on: M x save_every expert steps for N student steps
    assert steps[start + cfg.expert_epochs] - steps[start] == 4
    rows = buffer.snapshots_of(info["expert"], [start, start + 2])
    full = artifacts.load(buffer.paths[info["expert"]], KIND)[0]["trajectory"]
    assert torch.equal(rows, full[[start, start + 2]])


def _hand_made(tmp_path, tiny_data, lrs):
    """A buffer whose experts record the segment lrs `lrs` (a hand-made schedule)."""
    buffer = _buffer_with(tmp_path, tiny_data, replace(CFG, save_every=2))
    for meta in buffer.metas:
        meta["lrs"] = list(lrs)
    return buffer


def test_the_student_lr_follows_the_segment_it_matches(tmp_path, tiny_data, monkeypatch):
    lrs = [0.08, 0.06, 0.04, 0.02, 0.01, 0.005]
    buffer = _hand_made(tmp_path, tiny_data, lrs)
    cfg = DistillConfig(ipc=1, min_start_epoch=0, max_start_epoch=4, expert_epochs=2,
                        syn_steps=2, iterations=6, lr_lr=0.0)
    window = sum(lrs[0:5]) / 5
    assert initial_lr(cfg, buffer) == pytest.approx(window)
    for start in range(4):
        expect = (lrs[start] + lrs[start + 1]) / 2 / window
        assert segment_scale(cfg, buffer, start) == pytest.approx(expect)
    assert segment_scale(replace(cfg, segment_lr=False), buffer, 3) == 1.0
    from datm import distill
    used = []
    real = distill.match

    def spy(mode, fm, images, labels, lr, *args, **kwargs):
        used.append(float(lr))
        return real(mode, fm, images, labels, lr, *args, **kwargs)

    monkeypatch.setattr(distill, "match", spy)
    d = Distiller.create(cfg, buffer, *tiny_data[:2], TINY_AUG)
    for _ in range(6):
        start = d.step()["start_epoch"]
        seg = (lrs[start] + lrs[start + 1]) / 2
        assert used[-1] == pytest.approx(seg, rel=1e-6)  # lr_lr 0: the lr stays the window's


def test_constant_experts_give_the_student_exactly_the_learned_lr(tmp_path, tiny_data):
    buffer = _buffer_with(tmp_path, tiny_data, replace(CFG, save_every=2))
    cfg = DistillConfig(ipc=1, min_start_epoch=0, max_start_epoch=4, expert_epochs=2)
    assert all(float(torch.tensor(0.05) * segment_scale(cfg, buffer, s)) == float(
        torch.tensor(0.05)) for s in range(4))


def test_init_alone_is_exactly_the_set_the_distillation_started_from(tmp_path, tiny_data):
    buffer = _buffer_with(tmp_path, tiny_data, replace(CFG, num_experts=2, save_every=2))
    cfg = DistillConfig(ipc=2, min_start_epoch=0, max_start_epoch=3, expert_epochs=2,
                        syn_steps=2, iterations=4, checkpoint_every=2, lr_img=10.0)
    fresh = Distiller.create(cfg, buffer, *tiny_data[:2], TINY_AUG)
    images, labels, lr = fresh.images.clone(), fresh.labels.clone(), fresh.lr.clone()
    fresh.run(checkpoint=tmp_path / "ckpt.safetensors")
    assert not torch.equal(fresh.images, images)  # it moved
    # the checkpoint carries the start, so a resumed run's result names the same one
    resumed = Distiller.resume(tmp_path / "ckpt.safetensors", replace(cfg, iterations=6),
                               buffer, TINY_AUG)
    resumed.run()
    resumed.save_result(tmp_path / "result.safetensors", {})
    tensors, _ = artifacts.load(tmp_path / "result.safetensors", "distilled")
    assert torch.equal(tensors["init_images"], images)
    assert torch.equal(tensors["init_labels"], labels)
    assert torch.equal(tensors["init_lr"], lr.reshape(1))
    assert not torch.equal(tensors["images"], images)


def test_the_snapshot_lrs_are_the_mean_lr_of_their_steps(tmp_path, tiny_data):
    cfg = replace(CFG, epochs=4, decay_epochs=2, save_every=3)  # 16 steps, tail from step 8
    meta = artifacts.read_meta(_train(tmp_path, tiny_data, cfg)[0], KIND)
    bounds = meta["snapshot_steps"]
    for i, got in enumerate(meta["lrs"]):
        want = sum(cfg.step_lr(s, 4) for s in range(bounds[i], bounds[i + 1]))
        assert math.isclose(got, want / (bounds[i + 1] - bounds[i]), rel_tol=1e-12)
    assert FlatModel(TINY_SPEC).num_params > 0
