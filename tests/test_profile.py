"""The default profile (params.yaml) pinned by a hand-written table: the README's and
bench/RESULTS.md's numbers were measured with exactly these values, so a change to any of them
must be a deliberate one that updates this table (and re-measures), never a slip."""

from __future__ import annotations

import helpers
import pytest

from datm.config import load_params

# IPC: (window, N syn_steps, M expert_epochs, batch_syn, lr_img, lr_y, iterations)
DISTILL = {
    1: ("auto", 10, 2, 10, 1000, 5, 300),
    10: ("auto", 20, 2, 50, 100, 2, 200),
    50: ("auto", 20, 2, 100, 100, 2, 150),
    1000: ("auto", 10, 2, 200, 50, 10, 20),
}
# IPC: (init, labels, learn_labels, label_epoch)
INIT = {
    1: ("real_correct", "expert", True, -1),
    10: ("real_correct", "expert", True, -1),
    50: ("real_correct", "expert", True, -1),
    1000: ("real_hard", "hard", False, -1),
}
# IPC: (models, epochs, batch, lr (0: learned x lr_scale), lr_scale, compile, random_lr)
EVALUATE = {
    1: (2, 300, 25, 0.0, 0.2, False, 0.01),
    10: (2, 300, 25, 0.0, 0.2, False, 0.01),
    50: (2, 300, 25, 0.0, 0.2, False, 0.01),
    1000: (2, 60, 128, 0.02, 0.2, True, 0.02),
}


@pytest.fixture(scope="module")
def profile():
    """params.yaml with IPC 50 listed too: tuned there, left out of the default list (time)."""
    return load_params(helpers.REPO / "params.yaml", {"distill": {"ipcs": sorted(DISTILL)}})


def test_data_network_and_experts(profile):
    p = profile
    assert (p.data.name, p.zca.enabled, p.zca.eps) == ("fashion_mnist", True, 0.1)
    assert (p.net.width, p.net.depth, p.net.norm) == (32, 3, "instance")
    b = p.buffers
    assert (b.num_experts, b.epochs, b.lr, b.schedule, b.batch, b.momentum, b.rho, b.group,
            b.compile) == (3, 8, 0.1, "constant", 64, 0.0, 0.0, 1, True)
    assert (b.decay_epochs, b.save_every) == (3, 100)
    # the windows, M and the soft labels are read in these snapshots (tests/test_snapshots.py)
    assert b.snapshot_steps(937)[:3] == [0, 100, 200] and b.matchable(937) == 46
    for d in (p.distill(i) for i in (1, 10, 50, 1000)):
        assert (d.segment_lr, d.sequential) == (True, True)


@pytest.mark.parametrize("ipc", sorted(DISTILL))
def test_each_ipcs_distillation(profile, ipc):
    d = profile.distill(ipc)
    got = (d.window, d.syn_steps, d.expert_epochs, d.batch_syn, d.lr_img, d.lr_y, d.iterations)
    assert got == DISTILL[ipc]
    assert (d.init, d.labels, d.learn_labels, d.label_epoch) == INIT[ipc]


@pytest.mark.parametrize("ipc", sorted(EVALUATE))
def test_each_ipcs_evaluation_recipe(profile, ipc):
    e = profile.evaluation(ipc)
    assert (e.models, e.epochs, e.batch, e.lr, e.lr_scale, e.compile,
            e.random_lr) == EVALUATE[ipc]
    assert (e.momentum, e.weight_decay, e.arch) == (0.9, 5e-4, "convnet")


def test_the_ipcs_stage_lists_and_launch(profile):
    p = profile
    assert load_params(helpers.REPO / "params.yaml").ipcs == [1, 10, 1000]
    assert [list(p.evaluate.cross_archs), list(p.cross_ipcs), list(p.decompose_ipcs)] == \
        [["convnet_bn"], [10], [1, 10]]
    assert vars(p.launch) == {"buffers": 1, "baseline": 2, "distill": 2, "evaluate": 2,
                              "crossarch": 2, "decompose": 2}
