"""An export carries its whole recipe: someone without datm can train on it and get its number.

A tiny project made in-process (the steps that the DVC stages run) is distilled and evaluated
once; its exports must hold the ZCA and a card with `preprocessing` and `recipe`, and their
reproduce.py (datm/export_snippet.py, copied) must run where datm cannot be imported, whiten exactly
as the pipeline does, build the same network, augment the same way and reach the same accuracy
as `datm evaluate --from`. The png export must load as a Hugging Face `imagefolder` (soft labels
included) and as a torchvision ImageFolder.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import sysconfig
import types
from dataclasses import replace
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from test_pipeline import tiny_raw

from datm import artifacts, augment, data, networks, pipeline, sets
from datm.config import AugConfig, Params, Paths
from datm.export import SCRIPT, SNIPPET
from datm.zca import ZCA

IPC = 2


def recipe_raw() -> dict:
    """test_pipeline's tiny params with a network (width 16) and an evaluation (20 one-batch epochs
    at 2x the learned lr, 2 networks) under which every detail of the recipe (augmentation,
    seeds, lr, schedule) moves the accuracy on 300 test images."""
    raw = tiny_raw()
    raw["net"]["width"] = 16
    raw["evaluate"].update(epochs=20, models=2, lr_scale=2.0)
    return raw


def write_learnable_splits(paths: Paths, n_train: int = 60, n_test: int = 300) -> None:
    """Like test_pipeline.write_splits, but train and test from ONE draw (the same class patterns),
    so that networks score above chance and a wrong recipe shows in the number."""
    images, labels = helpers.learnable_uint8(n_train + n_test, 3, 1, 8, seed=0)
    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    mean, std = data.channel_stats(x[:n_train])
    for path, part, name in ((paths.train, slice(0, n_train), "train"),
                             (paths.test, slice(n_train, None), "test")):
        data.Split(x[part].clone(), y[part].clone(), ["a", "b", "c"], "tiny-standin", mean,
                   std).save(path, name)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A distilled and evaluated tiny project (1x8x8, 3 classes) and its exports."""
    root = tmp_path_factory.mktemp("project")
    paths, params = Paths(root), Params.from_dict(recipe_raw())
    write_learnable_splits(paths)
    pipeline.fit_zca(params, paths)
    pipeline.train_experts(params, paths)
    pipeline.distill_ipc(params, paths, IPC)
    pipeline.evaluate_ipc(params, paths, IPC)
    exports = {fmt: pipeline.export_ipc(params, paths, IPC, fmt, root / "exports" / fmt)
               for fmt in ("safetensors", "png")}
    test = data.Split.load(paths.test)
    test_file = root / "test.npz"  # what a user outside datm holds: uint8 images and labels
    np.savez(test_file, images=test.images.numpy(), labels=test.labels.numpy())
    return paths, params, exports, test_file


def card_of(folder: Path) -> dict:
    return json.loads((folder / "dataset_card.json").read_text())


def snippet_of(folder: Path):
    """The export's script as a module (it imports nothing from datm). Executed from its text:
    an import would leave a __pycache__ folder in the export, a class to ImageFolder."""
    module = types.ModuleType(f"reproduce_{folder.name}")
    module.__file__ = str(folder / SCRIPT)
    exec(compile((folder / SCRIPT).read_text(), module.__file__, "exec"), module.__dict__)
    return module


# --- (a) the card -----------------------------------------------------------------------------

def test_the_card_holds_the_recipe_the_preprocessing_and_the_dataset_name(made):
    paths, params, exports, _ = made
    tensors, _ = pipeline.load_distilled(paths.distilled(IPC))
    for folder in exports.values():
        card = card_of(folder)
        assert card["dataset"] == "fashion_mnist"  # params' data.name, never a path
        pre = card["preprocessing"]
        assert pre["zca"] is True and pre["eps"] == params.zca.eps
        assert "no per-channel normalization" in pre["formula"]
        shipped, pipeline_zca = artifacts.load(folder / pre["file"], "zca")[0], ZCA.load(paths.zca)
        for key in ("mean", "matrix", "inverse"):
            assert torch.equal(shipped[key], getattr(pipeline_zca, key)), key

        recipe, ev = card["recipe"], params.evaluate
        assert recipe["lr"] == pytest.approx(float(tensors["lr"][0]) * ev.lr_scale)
        assert recipe["learned_lr"] == pytest.approx(float(tensors["lr"][0]))
        assert (recipe["momentum"], recipe["weight_decay"], recipe["epochs"], recipe["batch"]) == (
            ev.momentum, ev.weight_decay, ev.epochs, ev.batch)
        assert recipe["schedule"]["milestones"] == [ev.epochs // 2]
        assert recipe["schedule"]["gamma"] == 0.1
        assert recipe["models"] == ev.models and recipe["model_seeds"][0] == ev.seed * 1009
        assert recipe["loss"] == "soft cross-entropy against softmax(label_logits)"
        aug = recipe["augmentation"]
        assert aug["enabled"] and aug["families"] == list(params.augment.families)
        for key in aug["parameters"]:
            assert aug[key] == getattr(params.augment, key), key
        assert recipe["network"] == {"model": "convnet", "channels": 1, "num_classes": 3,
                                     "im_size": 8, "width": params.net.width,
                                     "depth": params.net.depth, "norm": params.net.norm,
                                     "first_conv_padding": 1,
                                     "description": recipe["network"]["description"]}
        # the evaluation's own number, under this very recipe, where the export is lossless;
        # the png set's own number is measured apart (datm export measures it)
        number = r"\d+\.\d\d ± \d+\.\d\d % \(2 models\)"
        if card["lossless"]:
            assert re.fullmatch(number, card["accuracy"]["distilled"])
        else:
            assert card["accuracy"]["distilled"] == "not measured"
            assert re.fullmatch(number, card["accuracy"]["lossless_set"])
        assert "note" not in card["accuracy"]
        readme = (folder / "README.md").read_text()
        assert "zca.safetensors" in readme and "soft cross-entropy" in readme
        assert f"lr {recipe['lr']:.6g}" in readme


def test_the_script_is_the_one_snippet_and_the_readme_quotes_it(made):
    snippet = SNIPPET.read_text()
    for folder in made[2].values():
        assert (folder / SCRIPT).read_text() == snippet
        assert snippet.rstrip("\n") in (folder / "README.md").read_text()


def test_a_changed_evaluation_recipe_is_flagged_on_the_card(made, tmp_path):
    paths, params, _, _ = made
    changed = replace(params, evaluate=replace(params.evaluate, epochs=params.evaluate.epochs + 4))
    card = card_of(pipeline.export_ipc(changed, paths, IPC, "npz", tmp_path / "x"))
    assert card["recipe"]["epochs"] == params.evaluate.epochs + 4
    assert "datm evaluate --ipc 2" in card["accuracy"]["note"]


def test_without_zca_the_export_has_no_transform_and_says_normalize(made, tmp_path):
    paths = _copy_project(made[0], tmp_path)
    raw = recipe_raw()
    raw["zca"]["enabled"] = False
    params = Params.from_dict(raw)
    md = _model_space_artifact(params, paths)
    out = pipeline.export_ipc(params, paths, IPC, "safetensors", tmp_path / "export")
    card = card_of(out)
    assert not (out / "zca.safetensors").exists()
    assert card["preprocessing"]["zca"] is False
    assert card["preprocessing"]["mean"] == md.mean and card["preprocessing"]["std"] == md.std
    assert "Per-channel normalization" in (out / "README.md").read_text()


# --- (b) the script where datm is not importable ---------------------------------------------

def _without_datm(code: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run Python isolated (-I: no PYTHONPATH, no cwd or script folder on the path; -S: no .pth
    files, which is how the editable datm install is found) with only site-packages added."""
    site = sysconfig.get_paths()["purelib"]
    boot = f"import sys; sys.path.append({site!r}); " + "; ".join(code)
    env = {k: v for k, v in helpers.base_env().items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-I", "-S", "-c", boot], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fmt", ["safetensors", "png"])
def test_the_script_runs_without_datm_and_reproduces_the_pipelines_number(made, tmp_path, fmt):
    paths, params, exports, test_file = made
    folder = shutil.copytree(exports[fmt], tmp_path / "elsewhere" / fmt)  # away from the repo
    probe = _without_datm(["import torch, safetensors", "import datm"], tmp_path)
    assert "No module named 'datm'" in probe.stderr, helpers.describe(probe)

    run = ["import runpy", f"sys.argv = [{SCRIPT!r}, '--test', {str(test_file)!r}]",
           f"runpy.run_path({str(folder / SCRIPT)!r}, run_name='__main__')"]
    result = _without_datm(run, tmp_path)
    assert result.returncode == 0, helpers.describe(result)
    accs = [float(a) for a in re.findall(r"model \d+/\d+: test accuracy (\d\.\d+)", result.stdout)]
    assert len(accs) == params.evaluate.models and "test accuracy" in result.stdout.splitlines()[-1]
    # `datm evaluate --from` on the same folder: the same recipe, seeds and data, the same number
    ours = pipeline.evaluate_from(params, paths, folder)
    assert accs == pytest.approx(ours["accs"], abs=1e-6)
    assert len(set(accs)) > 1 or accs[0] > 0.5, accs  # networks that learned something


# --- (c) the snippet's preprocessing is the pipeline's model space ---------------------------

def test_the_snippets_preprocessing_gives_the_pipelines_model_space(made, tmp_path):
    paths, params, exports, _ = made
    md = pipeline.model_data(paths, torch.device("cpu"))
    tensors = pipeline.load_distilled(paths.distilled(IPC))[0]
    for fmt, folder in exports.items():
        snippet, card = snippet_of(folder), card_of(folder)
        x, logits = snippet.load_set(folder, card)
        ours = sets.read_set(folder, md.classes, tuple(md.x.shape[1:]))
        if fmt == "png":  # decoded and whitened as datm does it, op for op
            assert torch.equal(x, data.pixels_to_model_space(ours.pixels, md.mean, md.std, md.zca))
        else:  # the network inputs themselves
            assert torch.equal(x, tensors["images"])
        test = data.Split.load(paths.test)  # the real test images, as a user would hold them
        x_test = snippet.preprocess(snippet.as_pixels(test.images), card, folder)
        assert torch.equal(x_test, md.x_test)
        assert torch.allclose(logits, tensors["labels"])


@pytest.mark.parametrize("zca", [True, False])
def test_exported_pixels_preprocess_back_to_the_distilled_tensor(made, tmp_path, zca):
    """The `images` of a lossless export are the set as pixels, unclipped: preprocessed as the
    card says, they give the distilled tensor back up to float rounding, even far outside
    [0, 1]."""
    paths = _copy_project(made[0], tmp_path)
    raw = recipe_raw()
    raw["zca"]["enabled"] = zca
    params = Params.from_dict(raw)
    _model_space_artifact(params, paths, scale=5.0)
    distilled = pipeline.load_distilled(paths.distilled(IPC))[0]["images"]
    out = pipeline.export_ipc(params, paths, IPC, "safetensors", tmp_path / "export")
    snippet, card = snippet_of(out), card_of(out)
    pixels = snippet.read_tensors(out / "images.safetensors")["images"]
    assert card["pixels"]["outside_0_1"] > 0.2 and pixels.min() < -0.5 and pixels.max() > 1.5
    back = snippet.preprocess(pixels, card, out)
    assert (back - distilled).abs().max() < 1e-4 * distilled.abs().max()


# --- the network and the augmentation of the snippet are datm's ----------------------------

@pytest.mark.parametrize("shape, norm", [((1, 8, 8), "instance"), ((1, 28, 28), "instance"),
                                         ((3, 32, 32), "batch"), ((3, 32, 32), "none")])
def test_the_snippets_network_is_datms(made, shape, norm):
    from datm.pipeline.export import _recipe

    raw = tiny_raw()
    raw["net"].update(norm=norm, depth=3)
    net = _recipe(Params.from_dict(raw), 2, shape, 10, 0.01)["network"]
    if shape == (1, 28, 28):
        assert net["first_conv_padding"] == 3 and "first padded 3" in net["description"]
    snippet = snippet_of(made[2]["safetensors"])
    torch.manual_seed(5)
    theirs = snippet.build(net)
    torch.manual_seed(5)
    ours = networks.build(networks.NetSpec(**{k: net[k] for k in (
        "channels", "num_classes", "im_size", "model", "width", "depth", "norm")}))
    assert [p.shape for p in theirs.parameters()] == [p.shape for p in ours.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(theirs.parameters(), ours.parameters()))
    x = torch.randn(4, *shape)
    assert torch.allclose(theirs(x), ours(x), atol=1e-6)


def test_the_snippets_augmentation_is_datms(made):
    snippet = snippet_of(made[2]["safetensors"])
    x = torch.rand(6, 3, 16, 16)
    for family in ("color", "crop", "cutout", "flip", "scale", "rotate"):
        cfg = AugConfig(strategy=family)
        card_aug = {"enabled": True, "families": [family],
                    **{k: getattr(cfg, k) for k in ("scale", "rotate", "crop", "cutout",
                                                    "brightness", "saturation", "contrast")}}
        ours = augment.augment(x, cfg, torch.Generator().manual_seed(3))
        theirs = snippet.dsa(x, card_aug, torch.Generator().manual_seed(3))
        assert torch.allclose(theirs, ours, atol=1e-6), family
    off = {"enabled": False, "families": ["color"]}
    assert torch.equal(snippet.dsa(x, off, torch.Generator()), x)


# --- (d, e) the png export as Hugging Face and torchvision image folders ---------------------

def test_png_export_loads_with_hugging_face_imagefolder_offline(made, tmp_path):
    if importlib.util.find_spec("datasets") is None:  # a dev extra (pyproject.toml)
        pytest.skip("Hugging Face datasets is not installed")
    paths, _, exports, _ = made
    folder = exports["png"]
    code = ("import json, sys\n"
            "from datasets import load_dataset\n"
            f"ds = load_dataset('imagefolder', data_dir={str(folder)!r}, split='train', "
            f"cache_dir={str(tmp_path / 'hf-cache')!r})\n"
            "rows = [{k: v for k, v in r.items() if k != 'image'} | {'size': r['image'].size} "
            "for r in ds]\n"
            "print(json.dumps({'columns': ds.column_names, 'rows': rows}))\n")
    env = helpers.base_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                           HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, helpers.describe(result)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"image", "class_id", "label_probs", "label_logits"} <= set(got["columns"])
    rows = got["rows"]
    assert len(rows) == IPC * 3 == card_of(folder)["num_images"]
    assert all(tuple(r["size"]) == (8, 8) for r in rows)
    # the soft labels are the distilled set's, each with its image's class
    logits = pipeline.load_distilled(paths.distilled(IPC))[0]["labels"]
    want = sorted(zip(torch.arange(3).repeat_interleave(IPC).tolist(), logits.tolist()))
    have = sorted((r["class_id"], r["label_logits"]) for r in rows)
    assert [c for c, _ in have] == [c for c, _ in want]
    assert np.allclose([v for _, v in have], [v for _, v in want], atol=1e-6)
    probs = torch.tensor([r["label_probs"] for r in rows])
    assert torch.allclose(probs, torch.tensor([r["label_logits"] for r in rows]).softmax(1),
                          atol=1e-6)


def test_png_export_is_still_a_torchvision_image_folder(made):
    from torchvision.datasets import ImageFolder

    folder = made[2]["png"]
    ds = ImageFolder(str(folder))
    assert len(ds) == IPC * 3 and len(ds.classes) == 3
    assert ds.targets == torch.arange(3).repeat_interleave(IPC).tolist()
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [str(Path(p).relative_to(folder)) for p, _ in ds.samples] == [r["file_name"] for r in rows]
    assert [r["class_id"] for r in rows] == ds.targets


# --- helpers ---------------------------------------------------------------------------------

def _copy_project(paths: Paths, tmp_path: Path) -> Paths:
    root = tmp_path / "project"
    for part in ("data", "artifacts"):
        shutil.copytree(paths.root / part, root / part)
    return Paths(root)


def _model_space_artifact(params: Params, paths: Paths, scale: float = 1.0) -> pipeline.ModelData:
    """Refit the ZCA by `params` and make the distilled set real training images in model
    space, times `scale` (> 1: pixels far outside [0, 1], as distilled sets have them)."""
    pipeline.fit_zca(params, paths)
    md = pipeline.model_data(paths, torch.device("cpu"))
    tensors, meta = pipeline.load_distilled(paths.distilled(IPC))
    tensors["images"] = md.x[: tensors["images"].shape[0]].clone() * scale
    meta.update(zca=md.zca.enabled, mean=md.mean, std=md.std)
    artifacts.save(paths.distilled(IPC), tensors, "distilled", meta)
    return md


def test_the_cards_threads_are_those_the_evaluation_runs_with(tmp_path, monkeypatch):
    """launch.evaluate processes each take OMP_NUM_THREADS if set, else a share of the cores;
    one process keeps its own: the card states what `datm evaluate` will run with (the card
    once said cores / launch.evaluate while evaluate@N ran with OMP_NUM_THREADS=1)."""
    from datm.distributed import cores
    from stages import export as stage

    raw = recipe_raw()
    raw["launch"]["evaluate"] = 2
    path = helpers.write_params(tmp_path, raw)
    p = Params.from_dict(raw)
    monkeypatch.delenv("DATM_RANKS", raising=False)
    share = max(1, cores() // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", str(share + 3))  # not the share, whatever the cores
    assert stage.evaluation_threads(p, str(path), models=2) == share + 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert stage.evaluation_threads(p, str(path), models=2) == share
    assert stage.evaluation_threads(p, str(path), models=1) == torch.get_num_threads()


def _one_hot(logits: torch.Tensor, class_ids: torch.Tensor) -> bool:
    """Whether the logits are exactly the hard labels a distillation starts from (a softmax of
    1 - 1e-4 on the class): learned ones move from them by ~1e-4 here."""
    classes = logits.shape[1]
    hard = torch.nn.functional.one_hot(class_ids.long(), classes).float()
    return torch.equal(logits, hard * math.log(1e4 * (classes - 1)))


@pytest.mark.parametrize("settings, words, one_hot", [
    ({"labels": "hard", "learn_labels": False}, "hard labels (one-hot logits", True),
    ({"labels": "expert", "learn_labels": False},
     "the experts' soft labels (logits), not learned", False),
    # learn_labels is on by default: hard labels then learn away from one-hot
    ({"labels": "hard"}, "learned soft labels (logits), started one-hot", False),
    ({"init": "noise", "labels": "expert", "learn_labels": False}, "hard labels (one-hot", True),
])
def test_the_card_says_which_labels_the_set_has(made, tmp_path, settings, words, one_hot):
    """The card names the kind of labels the exported tensors hold: checked on the tensors
    (the `made` exports, distilled from the experts' labels learned, are a fifth case)."""
    paths, params, exports, _ = made
    for folder in exports.values():
        card = card_of(folder)
        kind = card["contents"]["label_logits"]
        assert kind.startswith("learned soft labels (logits)") and "one-hot" not in kind
        assert "- labels: learned soft labels (logits)," in (folder / "README.md").read_text()
    root = tmp_path / "project"
    shutil.copytree(paths.root, root, ignore=shutil.ignore_patterns("exports", "distilled",
                                                                    "checkpoints", "metrics"))
    raw = recipe_raw()
    raw["distill"]["defaults"].update(settings)
    mine = Params.from_dict(raw)
    pipeline.distill_ipc(mine, Paths(root), IPC)
    out = pipeline.export_ipc(mine, Paths(root), IPC, "safetensors", root / "export")
    card = card_of(out)
    assert card["contents"]["label_logits"].startswith(words)
    assert f"- labels: {words}" in (out / "README.md").read_text()
    exported, _ = artifacts.load(out / "images.safetensors")
    assert _one_hot(exported["label_logits"], exported["class_ids"]) == one_hot
    seen: list[dict] = []  # `datm evaluate --from` names the same kind before it trains
    pipeline.evaluate_from(mine, Paths(root), out, callback=seen.append)
    recipes = [e["recipe"] for e in seen if e["event"] == "recipe"]
    assert len(recipes) == 1 and recipes[0]["label_kind"].startswith(words), recipes
