"""`window: auto` (datm/windows.py): windows from the experts' training curve and the IPC's share
of the training set, following DATM's principle (small sets early, large sets late)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_pipeline import tiny_raw

from datm import windows
from datm.config import ConfigError, DistillConfig, Params
from datm.distill import upper_bound

# The default profile's experts (Fashion-MNIST, batch 64, cosine over 8 epochs): mean training
# accuracy per epoch, measured
FMNIST = [0.787, 0.848, 0.869, 0.878, 0.889, 0.894, 0.898, 0.901]


def test_progress_runs_from_0_to_1_and_never_falls_back():
    p = windows.progress([0.5, 0.7, 0.65, 0.8, 0.9], num_classes=10)
    assert p[0] == 0 and p[-1] == pytest.approx(1)
    assert all(a <= b for a, b in zip(p, p[1:]))
    assert p[3] == p[2]  # the dip at epoch 3 keeps epoch 2's progress


def test_the_target_rises_with_the_share_and_is_bounded():
    shares = [1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0]
    targets = [windows.target(s) for s in shares]
    assert targets == sorted(targets)
    assert targets[0] == windows.T_LOW and targets[-1] == windows.T_HIGH


def _auto(ipc: int, classes: int = 10, images: int = 60000, m: int = 1,
          curve: list[float] = FMNIST) -> DistillConfig:
    cfg = DistillConfig(ipc=ipc, window="auto", expert_epochs=m)
    return windows.auto_window(cfg, curve, classes, images)


def test_small_sets_match_early_and_large_sets_late():
    w = {ipc: _auto(ipc) for ipc in (1, 10, 50, 1000)}
    ends = [w[i].max_start_epoch for i in (1, 10, 50, 1000)]
    assert ends == sorted(ends) and ends[0] < ends[-1]
    assert all(w[i].min_start_epoch == 0 for i in (1, 10, 50))  # small shares start at 0
    assert w[1000].min_start_epoch > 0  # a sixth of the training set: a late window
    for cfg in w.values():
        assert cfg.window == "auto"
        assert 0 <= cfg.min_start_epoch < cfg.max_start_epoch
        assert cfg.last_epoch_needed <= len(FMNIST)  # it fits the experts
    assert w[1000].sg_start is None and w[1000].sg_end == 0  # a late window: no SG
    for ipc in (1, 10, 50):  # small sets: sequential generation from half the window
        cfg = w[ipc]
        if cfg.max_start_epoch >= 2:
            assert cfg.sg_start == (cfg.max_start_epoch + 1) // 2
            assert cfg.sg_end == cfg.iterations // 2
        off = windows.auto_window(replace(cfg, sequential=False), FMNIST, 10, 60000)
        assert off.sg_start is None and off.max_start_epoch == cfg.max_start_epoch


def test_sequential_generation_grows_the_bound_from_t_to_t_plus():
    curve = [0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.91, 0.92] * 2  # 16 snapshots, still learning
    cfg = windows.auto_window(DistillConfig(ipc=10, window="auto", expert_epochs=1, sg_end=10),
                              curve, 10, 60000)
    assert cfg.max_start_epoch >= 2 and cfg.sg_start == (cfg.max_start_epoch + 1) // 2
    bounds = [upper_bound(cfg, it) for it in range(12)]
    assert bounds[0] == cfg.sg_start and bounds[-1] == cfg.max_start_epoch
    assert bounds == sorted(bounds)


def test_a_window_never_reads_past_the_experts():
    cfg = _auto(1000, m=3, curve=[0.2, 0.3, 0.4, 0.5])  # experts still learning at the end
    assert cfg.last_epoch_needed <= 4 and cfg.min_start_epoch < cfg.max_start_epoch


def test_experts_at_chance_give_a_window_too():
    cfg = _auto(1, curve=[0.1, 0.1, 0.1])
    assert cfg.max_start_epoch >= 1


def test_auto_windows_are_not_checked_against_buffers_epochs_but_m_is():
    raw = tiny_raw()
    raw["distill"]["ipc"][2] = {"window": "auto", "expert_epochs": 1, "batch_syn": 3}
    assert Params.from_dict(raw).distill(2).window == "auto"
    raw["distill"]["ipc"][2]["expert_epochs"] = raw["buffers"]["epochs"] + 1
    with pytest.raises(ConfigError, match="expert_epochs .* is more than the .* expert snapshots"):
        Params.from_dict(raw)
    raw["distill"]["ipc"][2] = {"window": "sometimes"}
    with pytest.raises(ConfigError, match="window must be one of"):
        Params.from_dict(raw)


def test_a_distillation_with_an_auto_window_records_the_window_it_chose(tmp_path):
    import helpers

    from datm import pipeline

    raw = tiny_raw()
    raw["distill"]["ipc"][2] = {"window": "auto", "expert_epochs": 1, "batch_syn": 3,
                                "syn_steps": 2}
    paths = helpers.tiny_project(tmp_path, raw)
    events: list[dict] = []
    pipeline.distill_ipc(Params.from_dict(raw), paths, 2, events.append)
    _, meta = pipeline.load_distilled(paths.distilled(2))
    chosen = meta["settings"]
    assert chosen["window"] == "auto"
    assert (chosen["min_start_epoch"], None, chosen["max_start_epoch"]) == events[0]["window"]
    assert chosen["max_start_epoch"] - 1 + 1 <= raw["buffers"]["epochs"]
