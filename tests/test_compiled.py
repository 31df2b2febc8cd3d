"""torch.compile in the plain training loops (datm/compiled.py): the same training as eager,
the same bytes run to run, what the export's reproduce.py trains too, part of what an expert
and an evaluation are, and a one-line fallback where no C++ compiler can build the kernels."""

from __future__ import annotations

from dataclasses import replace

import helpers
import pytest
import torch
from test_export_recipe import made, snippet_of  # noqa: F401 (a fixture)

from datm import evaluate, experts
from datm.config import ConfigError, EvalConfig, ExpertConfig, Params
from datm.networks import NetSpec
from datm.pipeline.evaluate import measured_recipe
from datm.pipeline.export import _recipe

SPEC = NetSpec(channels=1, num_classes=3, im_size=28, width=8, depth=3)


def _spy_on_compile(monkeypatch) -> list:
    """Record every torch.compile call (and still compile)."""
    calls, real = [], torch.compile

    def spy(fn, **kwargs):
        calls.append(fn)
        return real(fn, **kwargs)
    monkeypatch.setattr(torch, "compile", spy)
    return calls


@pytest.mark.slow
def test_compiled_experts_train_as_eager_and_give_the_same_bytes_twice(monkeypatch):
    x, y = helpers.blobs(64, 3, size=28, seed=1)
    cfg = ExpertConfig(num_experts=1, epochs=2, lr=0.05, batch=16, compile=True)
    calls = _spy_on_compile(monkeypatch)
    fm = experts.FlatModel(SPEC)
    first, _ = experts.train_group(fm, [3], x, y, x[:8], y[:8], cfg, helpers.TINY_AUG)
    again, _ = experts.train_group(fm, [3], x, y, x[:8], y[:8], cfg, helpers.TINY_AUG)
    assert calls, "compile: true never reached torch.compile"
    assert torch.equal(first, again)  # deterministic: the same settings, the same bytes
    eager, _ = experts.train_group(fm, [3], x, y, x[:8], y[:8], replace(cfg, compile=False),
                                   helpers.TINY_AUG)
    # the same training (8 steps moved the weights far more than rounding apart)
    moved = (eager[0, -1] - eager[0, 0]).abs().max()
    assert moved > 0.01
    assert torch.allclose(first, eager, atol=1e-4 * float(moved) + 1e-6)


@pytest.mark.slow
def test_a_compiled_evaluation_trains_the_network_reproduce_py_trains(made, monkeypatch):  # noqa: F811
    """datm's compiled evaluation and the export script's, on a 1x28x28 set (the profile's
    shape, first conv padded by 3): the same weights bit for bit, close to eager's."""
    snippet = snippet_of(made[2]["safetensors"])
    x, y = helpers.blobs(40, 3, size=28, seed=2)
    x_test, y_test = helpers.blobs(30, 3, size=28, seed=3)
    logits = torch.nn.functional.one_hot(y, 3).float() * 3
    cfg = EvalConfig(models=1, epochs=3, batch=20, lr=0.02, compile=True)
    raw = helpers.tiny_params()
    raw["net"].update(width=SPEC.width, depth=SPEC.depth)  # the card's network is SPEC
    params = Params.from_dict(raw)
    card = {"recipe": _recipe(replace(params, evaluate=cfg, evaluate_ipc={}), None,
                              (1, 28, 28), 3, 0.02)}
    assert card["recipe"]["compile"] is True and card["recipe"]["batch"] == 20

    def capture(module, into):
        build = module.build

        def keep(*args):
            into.append(build(*args))
            return into[-1]
        monkeypatch.setattr(module, "build", keep)

    ours, theirs, eager = [], [], []
    calls = _spy_on_compile(monkeypatch)
    capture(evaluate, ours)
    evaluate.train_and_test(SPEC, x, logits, 0.02, 3, cfg, params.augment, x_test, y_test, 7)
    capture(snippet, theirs)
    snippet.train_and_test(card, x, logits, x_test, y_test, 3, 7)
    assert calls == [ours[0], theirs[0]]  # both compiled their network (eager = eager too)
    capture(evaluate, eager)
    evaluate.train_and_test(SPEC, x, logits, 0.02, 3, replace(cfg, compile=False),
                            params.augment, x_test, y_test, 7)
    mine, script, plain = (list(m[0].parameters()) for m in (ours, theirs, eager))
    assert all(torch.equal(a, b) for a, b in zip(mine, script))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(mine, plain))


def test_compile_is_part_of_an_experts_identity_and_an_evaluations_recipe():
    params = Params.from_dict(helpers.tiny_params())
    cfg = params.buffers
    on, off = replace(cfg, compile=True), replace(cfg, compile=False)
    assert experts.config_hash(SPEC, on, params.augment, "d") != \
        experts.config_hash(SPEC, off, params.augment, "d")
    ev = params.evaluation(1)
    recipes = [measured_recipe(params, replace(ev, compile=c), 0.01, "cpu", 1)
               for c in (True, False)]
    assert recipes[0]["compile"] is True and recipes[1]["compile"] is False


def test_the_profile_switches_parse_and_a_batched_group_is_refused():
    raw = helpers.tiny_params()
    raw["buffers"]["compile"] = "yes"
    with pytest.raises(ConfigError, match="buffers.compile must be bool"):
        Params.from_dict(raw)
    raw["buffers"].update(compile=True, group=2)
    with pytest.raises(ConfigError, match="group 1"):
        Params.from_dict(raw)
    raw["buffers"]["group"] = 1
    raw["evaluate"]["ipc"][2] = {"compile": True}
    p = Params.from_dict(raw)
    assert p.wants_compile and p.evaluation(2).compile and not p.evaluation(1).compile
    off = p.without_compile()
    assert not off.wants_compile and not off.evaluation(2).compile and not off.buffers.compile
    assert off.evaluation(2).epochs == p.evaluation(2).epochs  # nothing else changed


def test_without_a_cpp_compiler_a_stage_warns_in_one_line_and_trains_eager(
        tmp_path, monkeypatch, capsys):
    from stages import common, launch

    raw = helpers.tiny_params()
    raw["buffers"]["compile"] = True
    file = helpers.write_params(tmp_path, raw)
    assert common.load(file).buffers.compile  # this machine has one (setup.sh: g++)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert launch.processes("buffers", file) == 1  # a stage's launcher looks first: silent
    p = common.load(file)
    assert not p.wants_compile
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no C++ compiler" in lines[0] and "without it" in lines[0]
    monkeypatch.setenv("RANK", "1")  # the other ranks of a stage stay silent
    assert not common.load(file).wants_compile
    assert capsys.readouterr().err == ""
    monkeypatch.undo()  # a compiler, but no Python.h to build against
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"include": str(tmp_path / "none")})
    assert not common.load(file).wants_compile
    assert "Python.h" in capsys.readouterr().err


def test_the_export_card_says_when_its_recipe_is_compiled():
    from datm.export import _recipe_lines

    params = Params.from_dict(helpers.tiny_params())
    for compiled in (True, False):
        cfg = replace(params.evaluate, compile=compiled)
        recipe = _recipe(replace(params, evaluate=cfg, evaluate_ipc={}), None, (1, 8, 8), 3, 0.02)
        assert recipe["compile"] is compiled
        assert any("torch.compile" in line for line in _recipe_lines(recipe)) is compiled


def test_a_card_from_before_compile_states_an_eager_recipe():
    from datm.export import recipe_differences, stated_recipe

    old_card = {"recipe": {"epochs": 40, "batch": 128}}
    assert recipe_differences({"epochs": 40, "batch": 128, "compile": False},
                              stated_recipe(old_card)) == ""
    assert "compile" in recipe_differences({"epochs": 40, "batch": 128, "compile": True},
                                           stated_recipe(old_card))
