"""`datm evaluate --from` for anyone's set (datm/sets.py): an image folder (hard labels from
folder names), the DATM / MTT authors' `.pt` files (images already network inputs, soft or hard
labels, a learned lr), and what it refuses. The numbers must be the pipeline's own: a random
real subset saved as an image folder evaluates exactly as baseline@N, a distilled set saved as
DATM's files exactly as evaluate@N."""

from __future__ import annotations

from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import EvalSpy as Spy  # the one spy on evaluate_set

from datm import evaluate, pipeline, sets
from datm.config import Params
from datm.pipeline.export import FromOptions

IPC = 2


def raw_params() -> dict:
    raw = helpers.tiny_params()
    raw["buffers"].update({"num_experts": 2, "epochs": 2, "batch": 16})
    raw["evaluate"].update({"models": 2, "epochs": 8, "lr_scale": 1.0})
    raw["distill"]["ipc"][IPC].update({"batch_syn": 3})
    return raw


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    raw = raw_params()
    paths = helpers.tiny_project(root / "project", raw)
    return root, paths, Params.from_dict(raw)


def write_folder(folder: Path, images: torch.Tensor, labels: torch.Tensor, names: list[str]) -> Path:
    """uint8 images [N, 1, H, W] as PNGs, one subfolder per class named `names[c]`."""
    for i, (img, c) in enumerate(zip(images, labels.tolist())):
        sub = folder / names[c]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(sub / f"{i:04d}.png")
    return folder


def test_a_random_real_subset_as_an_image_folder_evaluates_exactly_as_baseline(project,
                                                                              monkeypatch):
    root, paths, params = project
    spy = Spy(monkeypatch)
    base = pipeline.baseline_ipc(params, paths, IPC)
    train = pipeline.model_data(paths, torch.device("cpu"))
    from datm import data

    raw = data.Split.load(paths.train)
    cfg = params.evaluation(IPC)
    idx = evaluate.random_subset(train.y, IPC, 3, cfg.seed + IPC)  # the baseline's own draw
    folder = write_folder(root / "subset", raw.images[idx], raw.labels[idx], ["A", "b", "C!"])
    result = pipeline.evaluate_from(params, paths, folder)
    baseline_call, ours = spy.calls
    assert torch.equal(ours["x"], baseline_call["x"]) and torch.equal(ours["targets"],
                                                                      baseline_call["targets"])
    assert (ours["lr"], ours["seed"]) == (cfg.random_lr, baseline_call["seed"])
    assert result["accs"] == [r["acc"] for r in base["runs"]]
    recipe = result["recipe"]
    assert recipe["kind"] == "image folder" and recipe["labels"] == "hard"
    assert recipe["ipc"] == IPC and recipe["recipe_of"] == f"evaluate.ipc.{IPC}"
    assert "by name" in recipe["notes"][0] and "C! -> c" in recipe["notes"][0]


def test_a_distilled_set_in_datms_files_evaluates_exactly_as_evaluate(project, monkeypatch):
    root, paths, params = project
    pipeline.distill_ipc(params, paths, IPC)
    spy = Spy(monkeypatch)
    ev = pipeline.evaluate_ipc(params, paths, IPC)
    tensors, _ = pipeline.load_distilled(paths.distilled(IPC))
    folder = root / "datm-pt"
    folder.mkdir()
    torch.save(tensors["images"].clone(), folder / "images_best.pt")
    torch.save(tensors["labels"].clone(), folder / "labels_best.pt")
    torch.save(tensors["lr"][0].clone(), folder / "lr_best.pt")
    result = pipeline.evaluate_from(params, paths, folder)
    assert torch.equal(spy.calls[-1]["x"], tensors["images"])
    assert result["accs"] == [r["acc"] for r in ev["runs"] if r["set"] == "distilled"]
    assert result["recipe"]["kind"] == "DATM .pt" and result["recipe"]["labels"] == "soft"
    assert any("lr_best.pt" in n for n in result["recipe"]["notes"])

    # hard labels (MTT saves class ids): the random real baseline's lr and seeds
    torch.save(tensors["labels"].argmax(1), folder / "labels_best.pt")
    result = pipeline.evaluate_from(params, paths, folder)
    assert spy.calls[-1]["lr"] == params.evaluation(IPC).random_lr
    assert result["recipe"]["labels"] == "hard"
    # --lr fixes the lr; --no-zca normalizes the test split instead of whitening it
    pipeline.evaluate_from(params, paths, folder, FromOptions(zca=False, lr=0.003))
    assert spy.calls[-1]["lr"] == 0.003
    md = pipeline.model_data(paths, torch.device("cpu"))
    assert not torch.allclose(spy.calls[-1]["x_test"], md.x_test)
    assert spy.calls[-1]["x_test"].flatten(1).mean(0).abs().max() < 5  # normalized, finite


def test_class_folders_are_matched_by_name_number_or_order():
    classes = ["T-shirt/top", "Trouser", "Ankle boot"]
    assert sets.class_mapping(["ankle-boot", "t_shirt top", "TROUSER"], classes) == (
        [2, 0, 1], "by name")
    assert sets.class_mapping(["000_T-shirt-top", "001_Trouser", "002_Ankle-boot"],
                              classes)[0] == [0, 1, 2]
    assert sets.class_mapping(["000_x", "002_y", "001_z"], classes) == (
        [0, 2, 1], "by the number before '_'")
    assert sets.class_mapping(["c0", "c1", "c2"], classes)[1].startswith("by sorted order")
    with pytest.raises(sets.SetError, match="2 class folders .* for 3 classes"):
        sets.class_mapping(["c0", "c1"], classes)


@pytest.mark.parametrize("make, message", [
    (lambda f: None, "holds no set datm can read"),
    (lambda f: torch.save(torch.zeros(6, 1, 8, 8), f / "images_best.pt"), "no labels_best.pt"),
    (lambda f: (torch.save(torch.zeros(6, 1, 9, 9), f / "images_best.pt"),
                torch.save(torch.zeros(6, dtype=torch.long), f / "labels_best.pt")),
     r"shape \[1, 9, 9\]"),
    (lambda f: (torch.save(torch.zeros(6, 1, 8, 8), f / "images_best.pt"),
                torch.save(torch.full((6, 3), float("nan")), f / "labels_best.pt")),
     "NaN or inf"),
    (lambda f: (torch.save(torch.zeros(6, 1, 8, 8), f / "images_best.pt"),
                torch.save(torch.zeros(6, 3), f / "labels_best.pt")), "no learned lr"),
    (lambda f: (f / "images_best.pt").write_text("not a tensor file"), "cannot read"),
])
def test_sets_that_cannot_be_evaluated_are_refused_with_their_reason(project, tmp_path, make,
                                                                     message):
    _, paths, params = project
    folder = tmp_path / "set"
    folder.mkdir()
    make(folder)
    with pytest.raises(sets.SetError, match=message):
        pipeline.evaluate_from(params, paths, folder)


def test_an_image_folder_of_other_sizes_and_colours_is_read_like_the_pipelines_data(tmp_path):
    for c, name in enumerate(["a", "b", "c"]):
        (tmp_path / name).mkdir()
        rgb = np.full((12, 12, 3), 40 * c, dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / name / "x.jpg")
    found = sets.read_set(tmp_path, ["a", "b", "c"], (1, 8, 8))
    assert found.pixels.shape == (3, 1, 8, 8) and found.targets.tolist() == [0, 1, 2]
    assert "3 images resized to 8x8" in found.notes[1] and "grayscale" in found.notes[1]
    assert found.per_class(3) == 1


@pytest.mark.slow
def test_the_cli_prints_the_recipe_and_errors_in_one_line(project, tmp_path):
    root, paths, _ = project
    folder = tmp_path / "folder"
    from datm import data

    raw = data.Split.load(paths.train)
    write_folder(folder, raw.images[:6], torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"])
    ok = helpers.datm("evaluate", "--from", str(folder), cwd=paths.root)
    assert ok.returncode == 0, helpers.describe(ok)
    out = ok.stdout + ok.stderr
    assert "image folder: 6 images (2 per class), hard labels" in out
    assert "by name" in out and "test accuracy" in out
    missing = helpers.datm("evaluate", "--from", str(tmp_path / "nowhere"), cwd=paths.root)
    assert missing.returncode == 2
    assert helpers.error_lines(missing) == [helpers.error_lines(missing)[0]]
    assert helpers.error_lines(missing)[0].startswith("error:") and "is not a folder" in \
        helpers.error_lines(missing)[0]


def test_random_bytes_for_pt_files_are_refused_in_one_line(project, tmp_path):
    """torch.load's weights_only refusal is paragraphs of advice (one suggests running the
    file's code): the error is one line naming the file."""
    from datm import export

    _, paths, params = project
    folder = tmp_path / "set"
    folder.mkdir()
    noise = np.random.default_rng(0).bytes(300)
    for name in ("images_best.pt", "labels_best.pt"):
        (folder / name).write_bytes(noise)
    with pytest.raises(sets.SetError, match="cannot read .*images_best.pt") as err:
        pipeline.evaluate_from(params, paths, folder)
    assert "\n" not in str(err.value) and "weights_only` set to `False`" not in str(err.value)
    x = torch.rand(3, 1, 8, 8)
    out = export.export(x, x, torch.zeros(3, 3), 0.1, ["a", "b", "c"], tmp_path / "pt", "pt",
                        {"ipc": 1})
    (out / "images.pt").write_bytes(noise)
    with pytest.raises(export.ExportError, match="cannot read .*images.pt") as err:
        export.read(out)
    assert "\n" not in str(err.value)
