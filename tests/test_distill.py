"""datm.distill: the SG window, buffer checks, initialization, exact resume, NaN handling."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import TINY_AUG, TINY_SPEC

import datm.distill as distill_module
import datm.initialization as initialization
from datm import artifacts
from datm.distill import (
    CHECKPOINT,
    HISTORY_COLUMNS,
    RESULT,
    DistillConfig,
    Distiller,
    DistillError,
    check_buffer,
    upper_bound,
)
from datm.experts import ExpertBuffer
from datm.initialization import InitError, initialize
from datm.matching import MatchResult
from datm.networks import FlatModel

CFG = DistillConfig(ipc=2, syn_steps=2, expert_epochs=1, min_start_epoch=0, sg_start=1,
                    max_start_epoch=3, sg_end=3, batch_syn=4, lr_img=10.0, lr_y=2.0,
                    lr_lr=1e-3, iterations=6, threshold=10.0, checkpoint_every=2, seed=0)


# --- the sampling window ------------------------------------------------------------------------

@pytest.mark.parametrize("t_min,t_sg,t_max,sg_end", [(0, 10, 20, 1000), (0, 2, 3, 100),
                                                     (1, 2, 9, 7), (0, 4, 4, 5)])
def test_upper_bound_follows_sequential_generation(t_min, t_sg, t_max, sg_end):
    cfg = DistillConfig(ipc=1, min_start_epoch=t_min, sg_start=t_sg, max_start_epoch=t_max,
                        sg_end=sg_end)
    bounds = [upper_bound(cfg, it) for it in range(3 * sg_end)]
    for it, u in enumerate(bounds):
        # docs/METHOD.md, "Difficulty alignment": U = min(T+, T + (T+ - T) * it / sg_end), as a whole epoch
        assert u == min(t_max, t_sg + int((t_max - t_sg) * it / sg_end)), it
    assert bounds[0] == t_sg
    assert all(u == t_max for u in bounds[sg_end:])
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))  # never shrinks
    assert all(t_min < u <= t_max for u in bounds)  # [T-, U) is never empty


def test_upper_bound_without_sg_is_t_plus():
    cfg = DistillConfig(ipc=1, min_start_epoch=2, max_start_epoch=7)
    assert {upper_bound(cfg, it) for it in range(0, 5000, 37)} == {7}


def _recording_match(calls: list):
    def fake(mode, fm, images, labels, lr, start, target, plan, aug, skip_above=None):
        calls.append({"mode": mode, "start": start.clone(), "target": target.clone(),
                      "plan": plan, "n": images.shape[0]})
        return MatchResult(0.5)
    return fake


def test_start_epochs_stay_in_the_window(monkeypatch, tiny_buffer, tiny_data):
    calls: list[dict] = []
    monkeypatch.setattr(distill_module, "match", _recording_match(calls))
    cfg = DistillConfig(ipc=1, syn_steps=1, expert_epochs=2, min_start_epoch=1, sg_start=2,
                        max_start_epoch=4, sg_end=20, iterations=150, seed=3)
    x, y, _, _ = tiny_data
    d = Distiller.create(cfg, tiny_buffer, x, y, TINY_AUG)
    infos: list[dict] = []
    d.run(callback=infos.append)
    assert len(infos) == len(calls) == 150 == d.iteration
    starts = set()
    for it, (info, call) in enumerate(zip(infos, calls)):
        u = info["upper_bound"]
        assert u == upper_bound(cfg, it)
        assert cfg.min_start_epoch <= info["start_epoch"] < u
        starts.add(info["start_epoch"])
        # the matched pair is (theta*_t, theta*_{t+M}) of the drawn expert
        rows = tiny_buffer.snapshots_of(info["expert"], [info["start_epoch"],
                                                      info["start_epoch"] + cfg.expert_epochs])
        assert torch.equal(call["start"], rows[0]) and torch.equal(call["target"], rows[1])
        assert call["mode"] == cfg.mode
    assert starts == {1, 2, 3}  # every epoch of [T-, T+) is used
    assert {i["expert"] for i in infos} == {0, 1, 2}
    # the history records what happened
    assert [row[2] for row in d.history] == [i["start_epoch"] for i in infos]
    assert [row[3] for row in d.history] == [i["upper_bound"] for i in infos]


# --- buffer and data checks ---------------------------------------------------------------------

def test_check_buffer_needs_epoch_t_plus_minus_one_plus_m(tiny_buffer, tiny_data):
    assert tiny_buffer.epochs == 5
    ok = DistillConfig(ipc=1, max_start_epoch=4, expert_epochs=2)  # reads up to epoch 5
    check_buffer(ok, tiny_buffer)
    x, y, _, _ = tiny_data
    for bad in (DistillConfig(ipc=1, max_start_epoch=5, expert_epochs=2),
                DistillConfig(ipc=1, max_start_epoch=3, expert_epochs=4)):
        with pytest.raises(DistillError, match="raise buffers.epochs"):
            check_buffer(bad, tiny_buffer)
        with pytest.raises(DistillError):
            Distiller.create(bad, tiny_buffer, x, y, TINY_AUG)


def test_the_deepest_epoch_read_exists(monkeypatch, tiny_buffer, tiny_data):
    """At the limit T+ - 1 + M == epochs every sampled target row is inside the trajectory."""
    calls: list[dict] = []
    monkeypatch.setattr(distill_module, "match", _recording_match(calls))
    cfg = DistillConfig(ipc=1, syn_steps=1, expert_epochs=2, min_start_epoch=2,
                        max_start_epoch=4, iterations=40)
    x, y, _, _ = tiny_data
    Distiller.create(cfg, tiny_buffer, x, y, TINY_AUG).run()
    assert len(calls) == 40


def _short_class(tiny_data, keep: int = 3):
    """Training data where class 2 has only `keep` images."""
    x, y, _, _ = tiny_data
    idx2 = torch.nonzero(y == 2).flatten()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[idx2[keep:]] = False
    return x[mask], y[mask]


@pytest.mark.parametrize("init", ["real_correct", "real_hard", "real"])
def test_ipc_larger_than_a_class_is_refused(tiny_buffer, tiny_data, init):
    x, y = _short_class(tiny_data, keep=3)
    cfg = DistillConfig(ipc=4, init=init, max_start_epoch=2)
    with pytest.raises(InitError, match="class 2 has 3"):
        initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(0))
    with pytest.raises(InitError):
        Distiller.create(cfg, tiny_buffer, x, y, TINY_AUG)
    # exactly as many as the class has is fine
    images, labels, _ = initialize(replace(cfg, ipc=3), tiny_buffer, x, y,
                                   torch.Generator().manual_seed(0))
    assert images.shape[0] == labels.shape[0] == 9


def test_noise_init_gives_ipc_images_per_class_even_for_a_short_class(tiny_buffer, tiny_data):
    """The error above suggests `init: noise` for such data: it must still give C x IPC images."""
    x, y = _short_class(tiny_data, keep=3)
    cfg = DistillConfig(ipc=4, init="noise", max_start_epoch=2)
    images, labels, report = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(0))
    assert report == {"init": "noise"}
    assert images.shape == (3 * 4, 1, 8, 8)
    assert labels.shape == (3 * 4, 3)


# --- initialization -----------------------------------------------------------------------------

def _expert_logits_at(buffer, epoch: int, images: torch.Tensor, y: torch.Tensor):
    """docs/METHOD.md, "Initialization and soft labels": mean logits of the experts right on each."""
    fm = FlatModel(buffer.spec)
    logits = torch.stack([fm(buffer.snapshots_of(k, [epoch])[0], images)
                          for k in range(len(buffer))])
    right = logits.argmax(-1) == y
    out = torch.empty(images.shape[0], logits.shape[-1])
    for i in range(images.shape[0]):
        who = right[:, i] if right[:, i].any() else torch.ones_like(right[:, i])
        out[i] = logits[who, i].mean(0)
    return out


@pytest.mark.parametrize("init", ["real_correct", "real_hard", "real"])
def test_initialize_is_class_major_real_images_with_expert_labels(tiny_buffer, tiny_data, init):
    x, y, _, _ = tiny_data
    cfg = DistillConfig(ipc=3, init=init, max_start_epoch=3)
    with torch.no_grad():
        images, labels, report = initialize(cfg, tiny_buffer, x, y,
                                            torch.Generator().manual_seed(1))
    assert images.shape == (9, 1, 8, 8) and labels.shape == (9, 3)
    assert images.dtype == labels.dtype == torch.float32
    classes = torch.arange(3).repeat_interleave(3)
    used = []
    for img, c in zip(images, classes):
        match = torch.nonzero((x == img).flatten(1).all(1)).flatten()
        assert match.numel() >= 1, "not a real image"
        assert int(y[match[0]]) == int(c), "not class-major"
        used.append(int(match[0]))
    assert len(set(used)) == 9  # no image chosen twice
    # FINAL-epoch soft labels (docs/METHOD.md, "Initialization and soft labels"): for real_correct the mean
    # logits of the experts that are right, for real the logits of one (seeded) expert
    last = tiny_buffer.epochs
    assert report["label_epoch"] == last
    if init in ("real_correct", "real_hard"):
        expected = _expert_logits_at(tiny_buffer, last, images, classes)
    else:
        theta = tiny_buffer.snapshots_of(report["expert"], [last])[0]
        expected = FlatModel(tiny_buffer.spec)(theta, images)
    torch.testing.assert_close(labels, expected, rtol=1e-6, atol=1e-6)
    # the images are copies: changing them does not change the real data
    before = x.clone()
    images += 1
    assert torch.equal(x, before)


@pytest.mark.parametrize("label_epoch", [-1, 2, 3])
def test_real_correct_images_are_right_for_the_recorded_expert(tiny_buffer, tiny_data,
                                                               label_epoch):
    x, y, _, _ = tiny_data
    cfg = DistillConfig(ipc=4, init="real_correct", max_start_epoch=3, label_epoch=label_epoch)
    with torch.no_grad():
        images, _, report = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(0))
        fm = FlatModel(tiny_buffer.spec)
        epoch = tiny_buffer.epochs if label_epoch == -1 else label_epoch
        assert report["label_epoch"] == epoch
        assert sorted(report["expert_order"]) == list(range(len(tiny_buffer)))
        assert [r["class"] for r in report["classes"]] == [0, 1, 2]
        assert report["fallback_classes"] == []
        for c, record in enumerate(report["classes"]):
            theta = tiny_buffer.snapshots_of(record["expert"], [epoch])[0]
            chosen = images[c * cfg.ipc:(c + 1) * cfg.ipc]
            assert (fm(theta, chosen).argmax(1) == c).all(), (c, record)
            assert record["found"] >= cfg.ipc and not record["fallback"]


def test_hard_labels_are_one_hot(tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    cfg = DistillConfig(ipc=2, labels="hard", max_start_epoch=3)
    _, labels, _ = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(0))
    probs = labels.softmax(1)
    assert torch.equal(labels.argmax(1), torch.arange(3).repeat_interleave(2))
    assert (probs.max(1).values > 0.999).all()


def test_initialize_is_seeded(tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    cfg = DistillConfig(ipc=2, max_start_epoch=3)
    a = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(5))
    b = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(5))
    c = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0])


def _constant_experts(tmp_path, buffer, constant: dict[int, int]) -> ExpertBuffer:
    """A copy of `buffer` whose expert k, at its final epoch only, always predicts class
    constant[k] (classifier weights 0, bias 5 on that class): its logits are that bias."""
    out = tmp_path / "constant_buffer"
    out.mkdir()
    fm = FlatModel(buffer.spec)
    for k, path in enumerate(buffer.paths):
        tensors, meta = artifacts.load(path, "expert")
        trajectory = tensors["trajectory"].clone()
        if k in constant:
            params = fm.unflatten(trajectory[-1])  # views: edits land in the trajectory
            params["classifier.weight"].zero_()
            params["classifier.bias"].copy_(_bias(constant[k], buffer.spec.num_classes))
        artifacts.save(out / path.name, {"trajectory": trajectory}, "expert", meta)
    return ExpertBuffer.open(out)


def _bias(c: int, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(c), num_classes).float() * 5


def _class_of_real_image(x: torch.Tensor, y: torch.Tensor, img: torch.Tensor) -> tuple[int, int]:
    match = torch.nonzero((x == img).flatten(1).all(1)).flatten()
    assert match.numel() >= 1, "not a real image"
    return int(match[0]), int(y[match[0]])


def _judged_by_hand(buffer, x: torch.Tensor, c: int,
                    epoch: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of x (all of class c): how many experts get it wrong at `epoch` (-1: the
    last), and their mean cross-entropy loss on it, one expert and one image at a time."""
    fm = FlatModel(buffer.spec)
    wrong, loss = torch.zeros(len(x)), torch.zeros(len(x))
    with torch.no_grad():
        for k in range(len(buffer)):
            theta = buffer.snapshots_of(k, [buffer.epochs if epoch < 0 else epoch])[0]
            for i in range(len(x)):
                logits = fm(theta, x[i:i + 1])[0]
                wrong[i] += float(logits.argmax() != c)
                loss[i] += float(-logits.log_softmax(0)[c]) / len(buffer)
    return wrong, loss


def test_real_hard_takes_the_hardest_images_every_expert_gets_right(tiny_buffer, tiny_data):
    """init: real_hard (docs/METHOD.md, "Initialization and soft labels"): per class, the
    images all experts classify correctly with the highest mean loss; DATM's soft labels.
    Judged at epoch 2, where the tiny experts' highest losses in classes 0 and 1 are on images
    one of them gets wrong: a choice by loss alone would take those."""
    x, y, _, _ = tiny_data
    cfg = DistillConfig(ipc=3, init="real_hard", max_start_epoch=2, label_epoch=2)
    images, labels, report = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(0))
    assert report["fallback_classes"] == []
    classes = torch.arange(3).repeat_interleave(3)
    hardest_wrong, left_out = 0, 0
    for c in range(3):
        idx = torch.nonzero(y == c).flatten()
        wrong, loss = _judged_by_hand(tiny_buffer, x[idx], c, epoch=2)
        picked = [_class_of_real_image(x, y, img)[0] for img in images[c * 3:(c + 1) * 3]]
        mine = torch.isin(idx, torch.tensor(picked))
        assert (wrong[mine] == 0).all(), "an image some expert gets wrong"
        others = (~mine) & (wrong == 0)
        if others.any():
            assert loss[mine].min() >= loss[others].max() - 1e-6, (c, loss[mine], loss[others])
            left_out += 1
        assert report["classes"][c]["all_right"] == int((wrong == 0).sum())
        hardest_wrong += int(wrong[loss.argmax()] > 0)
    assert hardest_wrong and left_out, "the tiny experts no longer make this a check"
    torch.testing.assert_close(labels, _expert_logits_at(tiny_buffer, 2, images, classes),
                               rtol=1e-6, atol=1e-6)


def test_real_hard_falls_back_to_the_images_most_experts_get_right(tmp_path, tiny_buffer,
                                                                    tiny_data):
    """Expert 0 always answers class 0 and expert 1 class 1: no image of class 2 is right
    for all three experts. Class 2 then takes the images expert 2 gets right, hardest first,
    and the report says so."""
    x, y, _, _ = tiny_data
    buffer = _constant_experts(tmp_path, tiny_buffer, {0: 0, 1: 1})
    cfg = DistillConfig(ipc=3, init="real_hard", max_start_epoch=3)
    images, _, report = initialize(cfg, buffer, x, y, torch.Generator().manual_seed(0))
    assert report["fallback_classes"] == [0, 1, 2]
    idx = torch.nonzero(y == 2).flatten()
    wrong, loss = _judged_by_hand(buffer, x[idx], 2)
    assert int(wrong.min()) == 2  # the two constant experts are wrong on every class 2 image
    picked = [_class_of_real_image(x, y, img)[0] for img in images[6:9]]
    mine = torch.isin(idx, torch.tensor(picked))
    right_for_expert_2 = wrong == 2
    assert right_for_expert_2.sum() > 3, "the check needs more candidates than picks"
    assert right_for_expert_2[mine].all()
    assert loss[mine].min() >= loss[right_for_expert_2 & ~mine].max() - 1e-6


def test_real_hard_fills_a_class_short_of_all_right_images_hardest_first(tiny_buffer,
                                                                         tiny_data):
    """At epoch 2 classes 0 and 1 hold 4 and 3 images right for all three tiny experts, the
    rest wrong for one: IPC 6 takes every all-right image, then the hardest of those one
    expert gets wrong; class 2 (all 21 right) is no fallback."""
    x, y, _, _ = tiny_data
    cfg = DistillConfig(ipc=6, init="real_hard", max_start_epoch=2, label_epoch=2)
    images, _, report = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(0))
    short = []
    for c in range(3):
        idx = torch.nonzero(y == c).flatten()
        wrong, loss = _judged_by_hand(tiny_buffer, x[idx], c, epoch=2)
        picked = [_class_of_real_image(x, y, img)[0] for img in images[c * 6:(c + 1) * 6]]
        mine = torch.isin(idx, torch.tensor(picked))
        if not 0 < int((wrong == 0).sum()) < 6:
            continue
        short.append(c)
        assert mine[wrong == 0].all(), "an all-right image left out"
        fill = mine & (wrong > 0)
        assert (wrong[fill] == 1).all()
        assert loss[fill].min() >= loss[~mine & (wrong == 1)].max() - 1e-6
    assert short == report["fallback_classes"] == [0, 1], (short, report["fallback_classes"])


def test_soft_labels_are_the_final_epoch_experts_that_are_right(tiny_buffer, tiny_data):
    """docs/METHOD.md, "Initialization and soft labels": label_epoch -1 is the experts' last epoch,
    whatever T+ is; the labels are the mean logits of the experts right on each image."""
    x, y, _, _ = tiny_data
    cfg = DistillConfig(ipc=3, max_start_epoch=2)  # T+ far below the last epoch (5)
    images, labels, report = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(2))
    classes = torch.arange(3).repeat_interleave(3)
    last = tiny_buffer.epochs
    fm = FlatModel(tiny_buffer.spec)
    with torch.no_grad():
        logits = torch.stack([fm(tiny_buffer.snapshots_of(k, [last])[0], images)
                              for k in range(len(tiny_buffer))])   # [K, n, C], by hand
        right = logits.argmax(-1) == classes
        assert right.any(0).all(), "every chosen image has an expert that is right"
        expected = torch.stack([logits[right[:, i], i].mean(0) for i in range(len(images))])
    assert report["label_epoch"] == last
    torch.testing.assert_close(labels, expected, rtol=1e-6, atol=1e-6)
    # and not the logits of any other epoch (T+ was the old choice)
    for epoch in range(last):
        other = _expert_logits_at(tiny_buffer, epoch, images, classes)
        assert not torch.allclose(labels, other, atol=1e-3), epoch


@pytest.mark.parametrize("epoch", [1, 2, 4])
def test_label_epoch_chooses_the_experts_epoch(tiny_buffer, tiny_data, epoch):
    """Epochs 1 and 2 are where the tiny experts still get images wrong: the weighting counts."""
    x, y, _, _ = tiny_data
    cfg = DistillConfig(ipc=2, max_start_epoch=2, label_epoch=epoch)
    images, labels, report = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(0))
    classes = torch.arange(3).repeat_interleave(2)
    assert report["label_epoch"] == epoch
    with torch.no_grad():
        expected = _expert_logits_at(tiny_buffer, epoch, images, classes)
        final = _expert_logits_at(tiny_buffer, tiny_buffer.epochs, images, classes)
    torch.testing.assert_close(labels, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(labels, final, atol=1e-3)


def test_label_epoch_past_the_buffer_is_refused(tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    bad = DistillConfig(ipc=1, max_start_epoch=2, label_epoch=tiny_buffer.epochs + 1)
    with pytest.raises(DistillError, match="label_epoch"):
        Distiller.create(bad, tiny_buffer, x, y, TINY_AUG)
    # the last epoch itself, and 0, are fine
    for ok in (tiny_buffer.epochs, 0):
        Distiller.create(replace(bad, label_epoch=ok), tiny_buffer, x, y, TINY_AUG)


def test_a_wrong_expert_hands_the_class_to_the_next(tmp_path, tiny_buffer, tiny_data):
    """Expert k always predicts class k: for class c every expert but c finds nothing, so the
    scan must walk the (seeded) expert order until it reaches expert c."""
    x, y, _, _ = tiny_data
    buffer = _constant_experts(tmp_path, tiny_buffer, {0: 0, 1: 1, 2: 2})
    cfg = DistillConfig(ipc=3, max_start_epoch=2)
    images, labels, report = initialize(cfg, buffer, x, y, torch.Generator().manual_seed(0))
    order = report["expert_order"]
    assert sorted(order) == [0, 1, 2]
    for c, record in enumerate(report["classes"]):
        assert record["expert"] == c and not record["fallback"]
        assert record["tried"] == order[: order.index(c) + 1]
        assert record["found"] >= cfg.ipc
        for img in images[c * 3:(c + 1) * 3]:
            assert _class_of_real_image(x, y, img)[1] == c
        # only expert c is right on these images: the label is its logits, the bias
        assert torch.equal(labels[c * 3:(c + 1) * 3], _bias(c, 3).expand(3, 3))
    assert sum(len(r["tried"]) > 1 for r in report["classes"]) == 2  # two classes moved on
    assert report["fallback_classes"] == []


def test_fallback_when_no_expert_finds_enough(tmp_path, tiny_buffer, tiny_data):
    """All experts predict class 0: classes 1 and 2 fall back to unjudged real images."""
    x, y, _, _ = tiny_data
    buffer = _constant_experts(tmp_path, tiny_buffer, {0: 0, 1: 0, 2: 0})
    cfg = DistillConfig(ipc=3, max_start_epoch=2)
    images, labels, report = initialize(cfg, buffer, x, y, torch.Generator().manual_seed(0))
    order = report["expert_order"]
    assert report["fallback_classes"] == [1, 2]
    first = report["classes"][0]
    assert first["expert"] == order[0] and first["tried"] == order[:1] and not first["fallback"]
    for c in (1, 2):
        record = report["classes"][c]
        assert record == {"class": c, "expert": order[0], "tried": order, "found": 0,
                          "scanned": int((y == c).sum()), "fallback": True}
    used = [_class_of_real_image(x, y, img) for img in images]
    assert [c for _, c in used] == [0] * 3 + [1] * 3 + [2] * 3  # still real, class-major
    assert len({i for i, _ in used}) == 9
    # no expert is right on a fallback image: its label is the mean of all experts
    assert torch.equal(labels, _bias(0, 3).expand(9, 3))


def test_fallback_keeps_the_images_the_best_expert_got_right(tiny_buffer, tiny_data):
    """At epoch 1 the tiny experts get at most 3 of class 0 right: with ipc 4 that class falls
    back, starting with the 3 images of the expert that found most."""
    x, y, _, _ = tiny_data
    cfg = DistillConfig(ipc=4, max_start_epoch=2, label_epoch=1)
    images, labels, report = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(0))
    fm = FlatModel(tiny_buffer.spec)
    with torch.no_grad():
        thetas = [tiny_buffer.snapshots_of(k, [1])[0] for k in range(len(tiny_buffer))]
        right = [int(((fm(t, x).argmax(1) == y) & (y == 0)).sum()) for t in thetas]
        assert max(right) < cfg.ipc, "the tiny experts changed: pick another epoch"
        record = report["classes"][0]
        assert record["fallback"] and record["found"] == max(right) > 0
        assert record["tried"] == report["expert_order"]
        assert right[record["expert"]] == max(right)
        hits = fm(thetas[record["expert"]], images[:4]).argmax(1) == 0
    assert hits.tolist() == [True] * max(right) + [False] * (4 - max(right))
    assert report["fallback_classes"] == [0]
    torch.testing.assert_close(
        labels, _expert_logits_at(tiny_buffer, 1, images, torch.arange(3).repeat_interleave(4)),
        rtol=1e-6, atol=1e-6)


def test_the_scan_runs_in_chunks_and_stops_when_it_has_enough(monkeypatch, tiny_buffer,
                                                              tiny_data):
    x, y, _, _ = tiny_data
    sizes: list[int] = []

    class Spy(FlatModel):
        def __call__(self, theta, images):
            sizes.append(images.shape[0])
            return super().__call__(theta, images)

    cfg = DistillConfig(ipc=2, max_start_epoch=2)
    whole = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(3))
    monkeypatch.setattr(initialization, "FlatModel", Spy)
    small = initialize(cfg, tiny_buffer, x, y, torch.Generator().manual_seed(3), chunk=2)
    assert sizes and max(sizes) <= 2
    assert torch.equal(whole[0], small[0])  # same images, judged in pieces
    torch.testing.assert_close(whole[1], small[1], rtol=1e-6, atol=1e-6)
    # the final-epoch experts are right on everything: one chunk of 2 per class suffices
    assert [r["scanned"] for r in small[2]["classes"]] == [2, 2, 2]
    assert [r["scanned"] for r in whole[2]["classes"]] == [int((y == c).sum()) for c in range(3)]


def test_real_init_is_labelled_by_one_final_epoch_expert(tiny_buffer, tiny_data):
    """The reference's CIFAR-100 IPC 50 config: random real images, one final-epoch expert."""
    x, y, _, _ = tiny_data
    fm = FlatModel(tiny_buffer.spec)
    last = tiny_buffer.epochs
    chosen_experts = set()
    for seed in range(6):
        cfg = DistillConfig(ipc=3, init="real", max_start_epoch=2, seed=seed)
        d = Distiller.create(cfg, tiny_buffer, x, y, TINY_AUG)
        k = d.init_report["expert"]
        chosen_experts.add(k)
        assert d.init_report == {"init": "real", "label_epoch": last, "expert": k}
        with torch.no_grad():
            one = fm(tiny_buffer.snapshots_of(k, [last])[0], d.images)
            mean = _expert_logits_at(tiny_buffer, last, d.images,
                                     torch.arange(3).repeat_interleave(3))
        torch.testing.assert_close(d.labels, one, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(d.labels, mean, atol=1e-3)  # not the average of experts
    assert len(chosen_experts) > 1, "the expert is a seeded choice, not always the first"


def test_init_report_is_in_the_result_and_survives_resume(tmp_path, tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    full = Distiller.create(CFG, tiny_buffer, x, y, TINY_AUG)
    assert full.init_report["classes"] and full.init_report["label_epoch"] == tiny_buffer.epochs
    full.run()
    part = Distiller.create(replace(CFG, iterations=2), tiny_buffer, x, y, TINY_AUG)
    part.run(checkpoint=tmp_path / "ckpt.safetensors")
    resumed = Distiller.resume(tmp_path / "ckpt.safetensors", CFG, tiny_buffer, TINY_AUG)
    assert resumed.init_report == full.init_report
    resumed.run()
    meta = {"classes": ["a", "b", "c"]}
    a = full.save_result(tmp_path / "full.safetensors", meta)
    b = resumed.save_result(tmp_path / "resumed.safetensors", meta)
    assert artifacts.read_meta(a, RESULT)["init"] == full.init_report
    assert a.read_bytes() == b.read_bytes()  # the whole artifact, metadata included


# --- running, checkpoints, resume ---------------------------------------------------------------

def _state(d: Distiller) -> dict:
    return {"images": d.images, "labels": d.labels, "lr": d.lr,
            "history": torch.tensor(d.history, dtype=torch.float64)}


def _assert_identical(a: Distiller, b: Distiller) -> None:
    sa, sb = _state(a), _state(b)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert (a.iteration, a.skipped, a.nonfinite) == (b.iteration, b.skipped, b.nonfinite)
    for name in ("images", "labels", "lr"):
        assert torch.equal(getattr(a.momenta, name), getattr(b.momenta, name)), name


def test_run_updates_images_labels_and_lr(tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    d = Distiller.create(replace(CFG, iterations=3), tiny_buffer, x, y, TINY_AUG)
    start = {k: v.clone() for k, v in _state(d).items() if k != "history"}
    assert float(d.lr) == pytest.approx(tiny_buffer.lr)  # alpha starts at the experts' lr
    infos: list[dict] = []
    d.run(callback=infos.append)
    assert d.iteration == 3 and len(d.history) == 3
    assert all(len(row) == len(HISTORY_COLUMNS) for row in d.history)
    assert all(i["updated"] for i in infos), "threshold 10 should never skip here"
    assert d.skipped == 0
    assert not torch.equal(d.images, start["images"])
    assert not torch.equal(d.labels, start["labels"])
    assert float(d.lr) != float(start["lr"])
    assert [i["iteration"] for i in infos] == [1, 2, 3]


def test_frozen_labels_and_skipped_iterations(tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    d = Distiller.create(replace(CFG, iterations=2, learn_labels=False), tiny_buffer, x, y,
                         TINY_AUG)
    labels = d.labels.clone()
    d.run()
    assert torch.equal(d.labels, labels)
    skip = Distiller.create(replace(CFG, iterations=2, threshold=1e-9), tiny_buffer, x, y,
                            TINY_AUG)
    images = skip.images.clone()
    skip.run()
    assert skip.skipped == 2 and torch.equal(skip.images, images)
    assert [row[5] for row in skip.history] == [1, 2]


def test_resume_equals_uninterrupted(tmp_path, tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    full = Distiller.create(CFG, tiny_buffer, x, y, TINY_AUG)
    full.run(checkpoint=tmp_path / "full.safetensors", identity="run")
    assert full.iteration == 6 and full.skipped < 6

    first = Distiller.create(replace(CFG, iterations=4), tiny_buffer, x, y, TINY_AUG)
    first.run(checkpoint=tmp_path / "part.safetensors", identity="run")
    meta = artifacts.read_meta(tmp_path / "part.safetensors", CHECKPOINT)
    assert meta["iteration"] == 4
    resumed = Distiller.resume(tmp_path / "part.safetensors", CFG, tiny_buffer, TINY_AUG,
                               identity="run")
    assert resumed is not None and resumed.iteration == 4
    resumed.run(checkpoint=tmp_path / "part.safetensors", identity="run")
    _assert_identical(resumed, full)


def test_resume_after_a_kill_between_checkpoints(tmp_path, tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    full = Distiller.create(CFG, tiny_buffer, x, y, TINY_AUG)
    full.run()

    def kill_at_3(info: dict) -> None:
        if info["iteration"] == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt.safetensors"
    killed = Distiller.create(CFG, tiny_buffer, x, y, TINY_AUG)
    with pytest.raises(KeyboardInterrupt):
        killed.run(callback=kill_at_3, checkpoint=ckpt)
    assert artifacts.read_meta(ckpt, CHECKPOINT)["iteration"] == 2  # checkpoint_every = 2
    resumed = Distiller.resume(ckpt, CFG, tiny_buffer, TINY_AUG)
    assert resumed.iteration == 2
    resumed.run(checkpoint=ckpt)
    _assert_identical(resumed, full)
    assert artifacts.read_meta(ckpt, CHECKPOINT)["iteration"] == 6


def test_resume_refuses_other_runs_and_damaged_checkpoints(tmp_path, tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    ckpt = tmp_path / "ckpt.safetensors"
    assert Distiller.resume(ckpt, CFG, tiny_buffer, TINY_AUG) is None  # none yet
    d = Distiller.create(replace(CFG, iterations=2), tiny_buffer, x, y, TINY_AUG)
    d.run(checkpoint=ckpt, identity="a")
    assert Distiller.resume(ckpt, CFG, tiny_buffer, TINY_AUG, identity="b") is None
    assert Distiller.resume(ckpt, CFG, tiny_buffer, TINY_AUG, identity="a") is not None
    # a checkpoint already past the asked end cannot be rewound: start over
    assert Distiller.resume(ckpt, replace(CFG, iterations=1), tiny_buffer, TINY_AUG,
                            identity="a") is None
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert Distiller.resume(ckpt, CFG, tiny_buffer, TINY_AUG, identity="a") is None


def test_digest_ignores_where_a_run_stops_but_not_what_it_does():
    # more iterations continue the same run, so its checkpoint must still be found
    assert CFG.digest("x") == replace(CFG, iterations=CFG.iterations + 50).digest("x")
    assert CFG.digest("x") == replace(CFG, checkpoint_every=7, grid_every=9).digest("x")
    assert CFG.digest("x") != replace(CFG, lr_img=CFG.lr_img * 2).digest("x")
    assert CFG.digest("x") != CFG.digest("y")


def test_unroll_mode_gives_the_same_run(tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    a = Distiller.create(replace(CFG, iterations=3, mode="recompute"), tiny_buffer, x, y,
                         TINY_AUG)
    b = Distiller.create(replace(CFG, iterations=3, mode="unroll"), tiny_buffer, x, y, TINY_AUG)
    a.run()
    b.run()
    assert [r[2] for r in a.history] == [r[2] for r in b.history]  # same sampling
    assert torch.allclose(a.images, b.images, rtol=1e-4, atol=1e-5)
    assert torch.allclose(a.labels, b.labels, rtol=1e-4, atol=1e-5)
    assert float(a.lr) == pytest.approx(float(b.lr), rel=1e-5)


def test_save_result_round_trip(tmp_path, tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    d = Distiller.create(replace(CFG, iterations=2), tiny_buffer, x, y, TINY_AUG)
    d.run()
    d.save_result(tmp_path / "ipc_2.safetensors", {"classes": ["a", "b", "c"]})
    tensors, meta = artifacts.load(tmp_path / "ipc_2.safetensors", RESULT)
    assert torch.equal(tensors["images"], d.images)
    assert torch.equal(tensors["labels"], d.labels)
    assert float(tensors["lr"][0]) == float(d.lr)
    assert tensors["history"].shape == (2, len(HISTORY_COLUMNS))
    assert meta["ipc"] == 2 and meta["iteration"] == 2 and meta["classes"] == ["a", "b", "c"]
    assert meta["settings"]["syn_steps"] == CFG.syn_steps
    assert meta["spec"] == TINY_SPEC.to_dict()
    assert meta["history_columns"] == list(HISTORY_COLUMNS)


# --- non-finite losses ---------------------------------------------------------------------------

def test_consecutive_nan_losses_stop_the_run(monkeypatch, tiny_buffer, tiny_data):
    calls = []

    def nan_match(*args, **kwargs):
        calls.append(1)
        return MatchResult(float("nan"))

    monkeypatch.setattr(distill_module, "match", nan_match)
    x, y, _, _ = tiny_data
    d = Distiller.create(replace(CFG, iterations=50, max_nonfinite=4), tiny_buffer, x, y,
                         TINY_AUG)
    images = d.images.clone()
    with pytest.raises(DistillError, match="NaN"):
        d.run()
    assert len(calls) == 4
    assert d.nonfinite == 4
    assert torch.equal(d.images, images)  # nothing was applied


def test_a_finite_loss_resets_the_nan_count(monkeypatch, tiny_buffer, tiny_data):
    losses = iter([float("nan"), float("inf"), 0.5, float("nan"), float("nan"), 0.4,
                   float("nan"), float("nan"), float("nan")])
    monkeypatch.setattr(distill_module, "match", lambda *a, **k: MatchResult(next(losses)))
    x, y, _, _ = tiny_data
    d = Distiller.create(replace(CFG, iterations=9, max_nonfinite=3), tiny_buffer, x, y,
                         TINY_AUG)
    with pytest.raises(DistillError):
        d.run()
    assert d.iteration == 8  # the ninth iteration (third NaN in a row) raised
    assert d.nonfinite == 7


@pytest.mark.parametrize("bad", [
    {"ipc": 0}, {"min_start_epoch": 3, "max_start_epoch": 3},
    {"sg_start": 0, "min_start_epoch": 0}, {"sg_start": 5, "max_start_epoch": 4},
    {"sg_start": 2, "sg_end": 0}, {"init": "zeros"}, {"labels": "soft"}, {"mode": "fast"},
    {"syn_steps": 0}, {"checkpoint_every": 0}, {"label_epoch": -2}, {"select_every": -1},
    {"select_epochs": 0}, {"select_models": 0}, {"select_val_per_class": 0}])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError):
        DistillConfig(**{"ipc": 1, **bad})
