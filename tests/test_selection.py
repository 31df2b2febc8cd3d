"""Selection among a run's sets on a validation split of the TRAINING images (never the test split).

docs/METHOD.md, "Selection on a validation split": the reference keeps the best test set, which makes
its numbers optimistic; datm keeps the final set unless `select_every` asks for a choice.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import TINY_AUG, TINY_SPEC
from test_pipeline import tiny_raw, write_splits

from datm import artifacts, evaluate, pipeline
from datm.config import Params, Paths
from datm.distill import CHECKPOINT, RESULT, SELECT_SEED, DistillConfig, Distiller, DistillError, Selection

CFG = DistillConfig(ipc=2, syn_steps=2, expert_epochs=1, min_start_epoch=0, sg_start=1,
                    max_start_epoch=3, sg_end=3, batch_syn=4, lr_img=10.0, lr_y=2.0,
                    lr_lr=1e-3, iterations=6, threshold=10.0, checkpoint_every=3, seed=0)
SEL_CFG = replace(CFG, select_every=2, select_epochs=2, select_models=1, select_val_per_class=4)
EVAL = evaluate.EvalConfig(models=1, epochs=2, batch=8, seed=0)


def _selection(tiny_data) -> Selection:
    x, y, _, _ = tiny_data
    val = evaluate.validation_subset(y, SEL_CFG.select_val_per_class, 3, seed=0)
    return Selection(TINY_SPEC, EVAL, TINY_AUG, x[val], y[val])


def _final(d: Distiller) -> dict[str, torch.Tensor]:
    return {"images": d.images, "labels": d.labels, "lr": d.lr.reshape(1)}


def _saved(d: Distiller, path) -> tuple[dict[str, torch.Tensor], dict]:
    d.save_result(path, {"classes": ["a", "b", "c"]})
    return artifacts.load(path, RESULT)


def test_validation_subset_is_seeded_training_images_per_class(tiny_data):
    _, y, _, _ = tiny_data
    idx = evaluate.validation_subset(y, 5, 3, seed=0)
    assert idx.unique().numel() == 15 and int(idx.max()) < len(y)
    assert torch.bincount(y[idx], minlength=3).tolist() == [5, 5, 5]
    assert torch.equal(idx, evaluate.validation_subset(y, 5, 3, seed=0))
    assert not torch.equal(idx, evaluate.validation_subset(y, 5, 3, seed=1))
    # a class smaller than asked gives all of it
    assert len(evaluate.validation_subset(y, 1000, 3)) == len(y)


def test_selection_off_keeps_the_final_set(tmp_path, tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    off = Distiller.create(CFG, tiny_buffer, x, y, TINY_AUG)
    off.run()
    tensors, meta = _saved(off, tmp_path / "off.safetensors")
    for key, value in _final(off).items():
        assert torch.equal(tensors[key], value), key
    assert "selection" not in meta and off.best is None and off.selections == []
    # selection on judges the sets but does not change the run itself
    on = Distiller.create(SEL_CFG, tiny_buffer, x, y, TINY_AUG, _selection(tiny_data))
    on.run()
    for key, value in _final(off).items():
        assert torch.equal(_final(on)[key], value), key
    assert on.history == off.history


def test_selection_settings_matter_to_the_digest_only_when_on():
    assert CFG.digest("x") == replace(CFG, select_epochs=7, select_models=3).digest("x")
    assert SEL_CFG.digest("x") != replace(SEL_CFG, select_epochs=7).digest("x")
    assert SEL_CFG.digest("x") != CFG.digest("x")


def test_select_every_needs_a_validation_split(tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    with pytest.raises(DistillError, match="validation"):
        Distiller.create(SEL_CFG, tiny_buffer, x, y, TINY_AUG)


def test_the_saved_set_is_the_one_of_the_best_iteration(tmp_path, tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    sel = _selection(tiny_data)
    d = Distiller.create(SEL_CFG, tiny_buffer, x, y, TINY_AUG, sel)
    infos: list[dict] = []
    d.run(callback=infos.append)
    assert [row[0] for row in d.selections] == [2, 4, 6]  # every 2 iterations, and the end
    assert [i["iteration"] for i in infos if "val_acc" in i] == [2, 4, 6]
    tensors, meta = _saved(d, tmp_path / "sel.safetensors")
    chosen = meta["selection"]
    accs = [acc for _, acc in d.selections]
    assert chosen["val_acc"] == max(accs)
    assert chosen["iteration"] == d.selections[accs.index(max(accs))][0]  # first of ties
    assert meta["iteration"] == 6  # the iterations run; the selection names the one kept
    # the saved set is the state at that iteration: a run stopped there ends with it
    short = Distiller.create(replace(CFG, iterations=chosen["iteration"]), tiny_buffer, x, y,
                             TINY_AUG)
    short.run()
    for key, value in _final(short).items():
        assert torch.equal(tensors[key], value), key
    # and its recorded accuracy is that set's validation accuracy
    lr = evaluate.distilled_lr(EVAL, float(tensors["lr"][0]))
    again = evaluate.evaluate_set(TINY_SPEC, tensors["images"], tensors["labels"], lr,
                                  SEL_CFG.select_epochs, SEL_CFG.select_models, EVAL, TINY_AUG,
                                  sel.x_val, sel.y_val, EVAL.seed + SELECT_SEED)
    assert again["mean"] == chosen["val_acc"]


def test_an_earlier_better_set_is_kept(monkeypatch, tmp_path, tiny_buffer, tiny_data):
    """Scripted accuracies: NaN (never chosen), best at 4, a tie at 6 keeps 4."""
    x, y, _, _ = tiny_data
    accs = iter([float("nan"), 0.9, 0.9])
    monkeypatch.setattr(evaluate, "evaluate_set", lambda *a, **k: {"mean": next(accs)})
    d = Distiller.create(SEL_CFG, tiny_buffer, x, y, TINY_AUG, _selection(tiny_data))
    d.run()
    tensors, meta = _saved(d, tmp_path / "sel.safetensors")
    assert meta["selection"]["iteration"] == 4 and meta["selection"]["val_acc"] == 0.9
    assert math.isnan(meta["selection"]["history"][0][1])
    four = Distiller.create(replace(CFG, iterations=4), tiny_buffer, x, y, TINY_AUG)
    four.run()
    for key, value in _final(four).items():
        assert torch.equal(tensors[key], value), key
    assert not torch.equal(tensors["images"], d.images)  # not the final set


def test_resume_with_selection_equals_uninterrupted(tmp_path, tiny_buffer, tiny_data):
    x, y, _, _ = tiny_data
    sel = _selection(tiny_data)
    full = Distiller.create(SEL_CFG, tiny_buffer, x, y, TINY_AUG, sel)
    full.run()

    def kill_at_3(info: dict) -> None:
        if info["iteration"] == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt.safetensors"
    killed = Distiller.create(SEL_CFG, tiny_buffer, x, y, TINY_AUG, sel)
    with pytest.raises(KeyboardInterrupt):
        killed.run(callback=kill_at_3, checkpoint=ckpt)
    assert artifacts.read_meta(ckpt, CHECKPOINT)["selection"]["history"] == killed.selections
    resumed = Distiller.resume(ckpt, SEL_CFG, tiny_buffer, TINY_AUG, selection=sel)
    assert resumed.iteration == 3 and resumed.selections == full.selections[:1]
    assert resumed.best is not None and resumed.best.iteration == 2  # the best so far came back
    resumed.run(checkpoint=ckpt)
    assert resumed.selections == full.selections
    for name in ("images", "labels", "lr"):
        assert torch.equal(getattr(resumed.best, name), getattr(full.best, name)), name
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    a = full.save_result(tmp_path / "full.safetensors", {"x": 1})
    b = resumed.save_result(tmp_path / "resumed.safetensors", {"x": 1})
    assert a.read_bytes() == b.read_bytes()


def test_a_judgment_is_checkpointed_at_once(tmp_path, tiny_buffer, tiny_data):
    """Judging trains networks (slow): a kill right after one must not lose it, whatever
    checkpoint_every says (3 here; the judgment is at 2)."""
    x, y, _, _ = tiny_data

    def kill_at_2(info: dict) -> None:
        if info["iteration"] == 2:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt.safetensors"
    d = Distiller.create(SEL_CFG, tiny_buffer, x, y, TINY_AUG, _selection(tiny_data))
    with pytest.raises(KeyboardInterrupt):
        d.run(callback=kill_at_2, checkpoint=ckpt)
    meta = artifacts.read_meta(ckpt, CHECKPOINT)
    assert meta["iteration"] == 2 and meta["selection"]["iteration"] == 2


def test_the_selection_only_ever_sees_the_validation_images(monkeypatch, tiny_buffer,
                                                            tiny_data):
    x, y, _, _ = tiny_data
    sel = _selection(tiny_data)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = evaluate.train_and_test

    def spy(spec, xs, targets, lr, epochs, cfg, aug, x_test, y_test, seed, callback=None,
            test_every=0):
        seen.append((x_test, y_test))
        return real(spec, xs, targets, lr, epochs, cfg, aug, x_test, y_test, seed, callback)

    monkeypatch.setattr(evaluate, "train_and_test", spy)
    Distiller.create(SEL_CFG, tiny_buffer, x, y, TINY_AUG, sel).run()
    assert len(seen) == 3
    assert all(torch.equal(a, sel.x_val) and torch.equal(b, sel.y_val) for a, b in seen)


def test_pipeline_selects_on_training_images_never_the_test_split(monkeypatch, tmp_path):
    """The test split is replaced by NaN images of class -1: any look at it would show."""
    project = Paths(tmp_path)
    write_splits(project)
    raw = tiny_raw()
    raw["distill"]["defaults"].update(select_every=2, select_epochs=1, select_val_per_class=5)
    params = Params.from_dict(raw)
    pipeline.fit_zca(params, project)
    pipeline.train_experts(params, project)

    from datm.pipeline import distill as distill_step

    real_model_data = distill_step.model_data
    train_x: list[torch.Tensor] = []

    def poisoned(paths, device):
        md = real_model_data(paths, device)
        train_x.append(md.x)
        return replace(md, x_test=torch.full_like(md.x_test, float("nan")),
                       y_test=torch.full_like(md.y_test, -1))

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_train = evaluate.train_and_test

    def spy(spec, xs, targets, lr, epochs, cfg, aug, x_test, y_test, seed, callback=None,
            test_every=0):
        seen.append((x_test, y_test))
        return real_train(spec, xs, targets, lr, epochs, cfg, aug, x_test, y_test, seed, callback)

    monkeypatch.setattr(distill_step, "model_data", poisoned)
    monkeypatch.setattr(evaluate, "train_and_test", spy)
    summary = pipeline.distill_ipc(params, project, 2)
    assert len(seen) == 2  # iterations 2 and 3 (the end)
    for x_val, y_val in seen:
        assert torch.isfinite(x_val).all() and (y_val >= 0).all()
        assert torch.bincount(y_val, minlength=3).tolist() == [5, 5, 5]
        # every validation image is a training image
        rows = (x_val.flatten(1)[:, None] == train_x[0].flatten(1)[None]).all(-1)
        assert rows.any(1).all()
    meta = artifacts.read_meta(project.distilled(2), RESULT)
    assert meta["selection"]["iteration"] == summary["selected_iteration"] in (2, 3)
    assert meta["selection"]["val_acc"] == summary["selected_val_acc"] > 0
    assert meta["init"]["label_epoch"] == params.buffers.epochs
    assert summary["init_fallback_classes"] == len(meta["init"]["fallback_classes"])
