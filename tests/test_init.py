"""`datm init DATASET` (cli/init.py): a project for someone's own data that `dvc repro` runs as is,
with every setting chosen from the data and explained."""

from __future__ import annotations

from pathlib import Path

import helpers
import numpy as np
import pytest
import yaml
from PIL import Image

from cli import init
from datm.config import load_params


def image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 20,
                 mode: str = "L", test: bool = False) -> Path:
    """PNG class folders of learnable images (a pattern per class plus noise)."""
    images, labels = helpers.learnable_uint8(classes * per_class, classes,
                                             1 if mode == "L" else 3, size, seed=0)
    for split in ("train", "test") if test else ("",):
        for i, (img, c) in enumerate(zip(images, labels)):
            sub = root / split / f"class_{c}"
            sub.mkdir(parents=True, exist_ok=True)
            arr = img[0] if mode == "L" else img.transpose(1, 2, 0)
            Image.fromarray(arr, mode).save(sub / f"{i:03d}.png")
    return root


def test_init_looks_at_the_data_and_writes_a_project(tmp_path):
    data = image_folder(tmp_path / "images", per_class=30)
    project = tmp_path / "project"
    found, choices = init.create(project, str(data), gpu=False)
    assert found.classes == ["class_0", "class_1", "class_2"] and found.channels == 1
    assert found.side == 20 and found.per_class == [30, 30, 30] and not found.test_split
    params = load_params(project / "params.yaml")  # it loads: every setting is valid
    raw = yaml.safe_load((project / "params.yaml").read_text())
    assert helpers.dvc_params_missing(raw, project / "dvc.yaml") == []  # DVC runs every stage
    assert params.buffers.compile and not params.evaluate.compile  # thousands of steps vs few
    assert params.data.name == "imagefolder" and params.data.channels == 1
    assert params.data.root == str(data.resolve()) and params.data.im_size == 20
    assert params.ipcs == [1, 10]  # up to half of the smallest class
    assert all(params.distill(i).window == "auto" for i in params.ipcs)
    assert set(params.evaluate_ipc) == set(params.ipcs)
    assert (project / ".git").is_dir() and (project / ".dvc").is_dir()
    assert (project / "plots" / "accuracy.json").is_file()
    # the pipeline's code dependencies point at this datm installation
    deps = [d for stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values()
            for d in (stage.get("do", stage).get("deps") or []) if d.endswith(".py")]
    assert deps and all(Path(d).is_absolute() and Path(d).is_file() for d in deps)
    keys = {c.key for c in choices}
    assert {"net.depth", "zca.enabled", "buffers.epochs", "distill.ipcs"} <= keys
    assert all(c.why for c in choices)


def test_init_sizes_colour_and_large_images_and_the_gpu(tmp_path):
    data = image_folder(tmp_path / "rgb", size=80, mode="RGB", test=True)
    _, choices = init.create(tmp_path / "p", str(data), gpu=True)
    got = {c.key: c.value for c in choices}
    assert got["data.channels"] == 3 and got["data.im_size"] == 64 and got["net.depth"] == 4
    assert got["net.width"] == 128 and got["zca.enabled"] is True  # 12288 dims on a GPU
    params = load_params(tmp_path / "p" / "params.yaml")
    raw = yaml.safe_load((tmp_path / "p" / "params.yaml").read_text())
    assert helpers.dvc_params_missing(raw, tmp_path / "p" / "dvc.yaml") == []
    assert not params.wants_compile  # not measured on a GPU
    assert "data.test_fraction" not in got  # a test/ folder is the test split
    assert params.evaluate.models == 5
    _, cpu = init.create(tmp_path / "q", str(data), gpu=False)
    assert {c.key: c.value for c in cpu}["data.im_size"] == 32


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "class folder"),
    (lambda p: (p / "a").mkdir(parents=True) or (p / "b").mkdir(), "holds no images"),
    (lambda p: None, "neither a folder nor one of"),
])
def test_init_refuses_what_is_no_dataset(tmp_path, make, message):
    make(tmp_path / "data")
    with pytest.raises(init.InitError, match=message):
        init.create(tmp_path / "project", str(tmp_path / "data"), gpu=False)
    assert not (tmp_path / "project").exists()


def test_init_refuses_a_folder_that_is_not_empty(tmp_path):
    data = image_folder(tmp_path / "images")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    result = helpers.datm("init", str(data), "--dir", "project", "--cpu", cwd=tmp_path)
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_a_project_made_by_init_runs_with_dvc_repro(tmp_path):
    data = image_folder(tmp_path / "images", per_class=10, size=12)
    made = helpers.datm("init", str(data), "--dir", "project", "--cpu", cwd=tmp_path)
    assert made.returncode == 0, helpers.describe(made)
    assert "buffers.epochs" in made.stderr and "zca.enabled" in made.stderr
    project = tmp_path / "project"
    raw = yaml.safe_load((project / "params.yaml").read_text())
    # the same project, only cheaper to run here: fewer iterations and epochs
    raw["buffers"].update(num_experts=2, epochs=3)
    raw["net"]["width"] = 4
    for table in raw["distill"]["ipc"].values():
        table.update(iterations=3, syn_steps=2)
    raw["evaluate"]["epochs"] = 2
    raw["launch"] = {stage: 1 for stage in raw["launch"]}  # torchrun's start-up: ~8 s a stage
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    repro = helpers.run([helpers.DVC, "repro"], cwd=project, timeout=900)
    assert repro.returncode == 0, helpers.describe(repro)
    assert (project / "reports" / "summary.md").is_file()
    assert np.isfinite(yaml.safe_load((project / "metrics/evaluate/ipc_1.json").read_text())
                       ["distilled"])
