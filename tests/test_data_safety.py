"""Nothing lost, nothing stale, nothing cryptic: validation before any artifact is touched,
byte-reproducible artifacts, identities by content, and loud errors instead of fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest
import torch
from test_pipeline import tiny_raw, write_splits

from datm import artifacts, data, pipeline
from datm.config import ConfigError, Params, Paths
from datm.data import DataConfig, DataError
from datm.errors import UserError
from datm.export import ExportError
from stages import common


def _files(root: Path) -> dict[str, bytes]:
    """Every artifact and metrics file under a project, by relative path."""
    found = {}
    for folder in ("data", "artifacts", "metrics"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


def _run_all(paths: Paths, raw: dict) -> None:
    params = Params.from_dict(raw)
    pipeline.fit_zca(params, paths)
    summary, _ = pipeline.train_experts(params, paths)
    pipeline.write_json(paths.metrics / "buffers.json", summary)  # what the stage writes
    for ipc in params.ipcs:
        pipeline.distill_ipc(params, paths, ipc)
        pipeline.evaluate_ipc(params, paths, ipc)


# --- 1. a bad parameter never costs finished work -----------------------------------------------

def _project_with_experts(tmp_path: Path, monkeypatch) -> tuple[Paths, dict, dict[str, bytes]]:
    """A tiny project whose experts are trained, with the experts' bytes to compare against."""
    monkeypatch.setenv("DATM_TRACKING", "off")
    paths = Paths(tmp_path)
    write_splits(paths)
    raw = tiny_raw()
    pipeline.fit_zca(Params.from_dict(raw), paths)
    pipeline.train_experts(Params.from_dict(raw), paths)
    return paths, raw, {p.name: p.read_bytes() for p in paths.buffers.iterdir()}


def _buffers_stage(root: Path) -> int:
    """The buffers stage on the project's params.yaml, as DVC runs it: its exit code."""
    from stages import buffers as stage

    return common.guarded(lambda: stage.run(str(root / "params.yaml"), str(root)))


@pytest.mark.parametrize("key, value, fragment", [
    ("width", 0, "net: width and depth must be >= 1"),
    ("width", "x", "net.width must be int"),
    ("depth", 9, "net: depth 9 pools"),
    # valid, but no machine holds it: the first network's weights fail to allocate
    pytest.param("width", 10**6, "out of memory: ", marks=pytest.mark.skipif(
        Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1"
        if Path("/proc/sys/vm/overcommit_memory").exists() else False,
        reason="memory overcommit 'always': the allocation would succeed, then be killed")),
])
def test_a_bad_net_setting_keeps_every_finished_expert(tmp_path, key, value, fragment, capsys,
                                                       monkeypatch):
    paths, raw, before = _project_with_experts(tmp_path, monkeypatch)
    raw["net"][key] = value
    helpers.write_params(tmp_path, raw)
    code = _buffers_stage(tmp_path)
    assert code == 2
    assert fragment in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in paths.buffers.iterdir()} == before


@pytest.mark.parametrize("change, fragment", [
    ({"buffers": {"epochs": 1}}, "reads expert snapshots up to T+ - 1 + M = 2"),
    ({"distill": {"defaults": {"label_epoch": 5}}}, "label_epoch 5 is past the experts' last"),
])
def test_a_setting_a_later_stage_refuses_never_replaces_the_experts(tmp_path, change, fragment,
                                                                    capsys, monkeypatch):
    """The check that experts cover every window used to run inside distill only: buffers
    first retrained (deleted) the experts for a buffers.epochs that distill then refused.
    Cross-setting rules are config validation now, before any stage touches an artifact."""
    paths, raw, before = _project_with_experts(tmp_path, monkeypatch)
    helpers.write_params(tmp_path, helpers._overlay(raw, change))
    code = _buffers_stage(tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("error:") == 1
    assert {p.name: p.read_bytes() for p in paths.buffers.iterdir()} == before


def test_settings_that_diverge_are_refused_before_the_experts_are_replaced(tmp_path, capsys,
                                                                          monkeypatch):
    """A setting that passes validation but cannot train (its first steps go NaN) is found by
    a few probe steps, before the experts of the old settings are dropped."""
    paths, raw, before = _project_with_experts(tmp_path, monkeypatch)
    raw["buffers"]["lr"] = 9.5
    helpers.write_params(tmp_path, raw)
    from datm import experts

    real = experts.train_group
    monkeypatch.setattr(experts, "train_group", lambda *a, **k: (
        lambda t, h: (t * float("nan"), h))(*real(*a, **k)))
    code = _buffers_stage(tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "diverge" in err and err.count("error:") == 1
    assert {p.name: p.read_bytes() for p in paths.buffers.iterdir()} == before


@pytest.mark.parametrize("section, key, value, fragment", [
    (None, "seed", 2**64, "seed must lie in"),
    ("augment", "crop", -1, "crop must lie in"),
    ("augment", "scale", 0, "scale must be >= 1"),
    ("buffers", "lr", 1e30, "lr must lie in"),
    ("buffers", "momentum", -1, "momentum must lie in"),
    ("evaluate", "momentum", -1, "momentum must lie in"),
    ("evaluate", "weight_decay", -1, "weight_decay must be >= 0"),
    ("evaluate", "lr", 1e30, "lr must lie in"),
    ("evaluate", "random_lr", -0.01, "random_lr must lie in"),
    ("distill.ipc.1", "batch_syn", -1, "batch_syn must be >= 0"),
    ("distill.defaults", "grid_every", 0, "grid_every and max_nonfinite"),
    ("distill.ipc.2", "lr_img", -1, "lr_img, lr_y"),
])
def test_values_out_of_range_are_config_errors(section, key, value, fragment):
    raw = tiny_raw()
    node = raw
    for part in (section.split(".") if section else []):
        node = node[int(part) if part.isdigit() else part]
    node[key] = value
    with pytest.raises(ConfigError, match=fragment):
        Params.from_dict(raw)


def test_a_device_this_machine_lacks_is_a_config_error():
    raw = tiny_raw()
    raw["device"] = "mps"
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ConfigError, match="no Apple GPU"):
        Params.from_dict(raw).torch_device()


def test_a_missing_launch_count_is_a_config_error_not_a_dvc_failure_later():
    raw = tiny_raw()
    del raw["launch"]["decompose"]
    with pytest.raises(ConfigError, match="launch.decompose"):
        Params.from_dict(raw)


def test_buffers_json_is_a_function_of_the_experts_alone(tmp_path, monkeypatch):
    """No wall time in the file DVC tracks: a re-run that finds every expert finished writes
    the very same bytes (it used to write the timings as null, and DVC saw a change)."""
    monkeypatch.setenv("DATM_TRACKING", "off")
    paths = Paths(tmp_path)
    write_splits(paths)
    raw = tiny_raw()
    helpers.write_params(tmp_path, raw)
    pipeline.fit_zca(Params.from_dict(raw), paths)
    from stages import buffers as stage

    stage.run(str(tmp_path / "params.yaml"), str(tmp_path))
    first = (paths.metrics / "buffers.json").read_bytes()
    stage.run(str(tmp_path / "params.yaml"), str(tmp_path))  # all found finished
    assert (paths.metrics / "buffers.json").read_bytes() == first
    text = first.decode()
    for volatile in ("seconds", "images_per_second", "time", "host"):
        assert volatile not in text, volatile
    summary = json.loads(text)
    assert summary["full_dataset"] == pytest.approx(
        sum(r["acc"] for r in summary["runs"]) / len(summary["runs"]))


@pytest.mark.parametrize("section, key, value, fragment", [
    ("zca", "eps", "x", "zca.eps must be float"),
    ("evaluate", "models", 1.5, "evaluate.models must be int"),
    ("buffers", "lr", None, "buffers.lr must be set"),
    ("augment", "enabled", "yes", "augment.enabled must be bool"),
])
def test_wrong_types_are_config_errors_that_name_the_key(section, key, value, fragment):
    raw = tiny_raw()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        Params.from_dict(raw)


def test_wrong_types_in_an_ipc_table_name_the_ipc():
    raw = tiny_raw()
    raw["distill"]["ipc"][2]["lr_img"] = "x"
    with pytest.raises(ConfigError, match=r"distill\.ipc\.2\.lr_img must be float"):
        Params.from_dict(raw)
    raw["distill"]["ipc"][2]["lr_img"] = "1e3"  # YAML reads 1e3 (no dot) as a string
    assert Params.from_dict(raw).distill(2).lr_img == 1000.0


def test_numbers_are_accepted_where_floats_are_expected():
    raw = tiny_raw()
    raw["buffers"]["lr"] = 1  # an int where a float is meant is fine
    assert Params.from_dict(raw).buffers.lr == 1.0


@pytest.mark.parametrize("device, fragment", [
    ("gpu", "device must be auto, cpu, cuda or cuda:N"),
    ("cuda:", "device must be auto"),
])
def test_a_device_that_does_not_exist_is_a_config_error(device, fragment):
    raw = tiny_raw()
    raw["device"] = device
    with pytest.raises(ConfigError, match=fragment):
        Params.from_dict(raw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_a_gpu_is_a_config_error():
    raw = tiny_raw()
    raw["device"] = "cuda"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        Params.from_dict(raw).torch_device()


# --- 2. byte-reproducible artifacts, identities by content --------------------------------------

def test_safetensors_header_is_the_same_bytes_every_time(tmp_path):
    # safetensors writes its metadata map in no fixed order: datm keeps one key.
    blobs = set()
    for i in range(6):
        path = artifacts.save(tmp_path / f"a{i}.safetensors", {"x": torch.arange(3.0)}, "k",
                              {"b": 1, "a": [1, 2], "c": {"z": 0, "y": 1}})
        blobs.add(path.read_bytes())
    assert len(blobs) == 1


def test_every_stage_writes_the_same_bytes_twice(tmp_path):
    raw = tiny_raw()
    raw["evaluate"]["models"] = 2
    runs = []
    for name in ("one", "two"):
        paths = Paths(tmp_path / name)
        write_splits(paths)
        _run_all(paths, raw)
        runs.append(_files(paths.root))
    assert sorted(runs[0]) == sorted(runs[1])
    assert any(k.startswith("artifacts/buffers/") for k in runs[0])
    differ = [k for k in runs[0] if runs[0][k] != runs[1][k]]
    assert not differ, f"not byte-reproducible: {differ}"


def test_download_stage_is_byte_reproducible(tmp_path):
    helpers.make_fashion_mnist(tmp_path / "standin")
    raw = tiny_raw()
    raw["data"]["root"] = str(tmp_path / "standin")
    params = Params.from_dict(raw)
    blobs = []
    for name in ("one", "two"):
        paths = Paths(tmp_path / name)
        pipeline.download_data(params, paths)
        blobs.append((paths.train.read_bytes(), paths.test.read_bytes()))
    assert blobs[0] == blobs[1]


def test_the_same_images_from_another_folder_give_the_same_bytes(tmp_path, monkeypatch):
    """Where Fashion-MNIST was found (Debian's package, torchvision's layout under
    data.root) is no input of the artifact: the data/ files, which DVC tracks and every later
    stage depends on, hold the dataset's name, not a path of this machine."""
    debian = helpers.make_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(data, "DEBIAN_FMNIST", debian)
    monkeypatch.chdir(tmp_path)
    found = []
    for name, root in (("one", "datasets"), ("two", "elsewhere")):
        if root != "datasets":  # torchvision's layout under a root of the user's
            import shutil

            shutil.copytree(debian, tmp_path / root / "FashionMNIST" / "raw")
        raw = tiny_raw()
        raw["data"]["root"] = root
        paths = Paths(tmp_path / name)
        summary = pipeline.download_data(Params.from_dict(raw), paths)
        found.append((paths.train.read_bytes(), summary["source"]))
    assert found[0][0] == found[1][0]
    assert found[0][1] != found[1][1]  # the console still says where each came from
    assert data.Split.load(tmp_path / "one" / "data" / "train.safetensors").source == \
        "fashion_mnist"


def test_rewriting_unchanged_inputs_invalidates_nothing_downstream(tmp_path):
    paths = Paths(tmp_path)
    write_splits(paths)
    raw = tiny_raw()
    _run_all(paths, raw)
    before = _files(tmp_path)
    params = Params.from_dict(raw)
    # the same data saved again (another source folder recorded) and the ZCA fitted again
    train = data.Split.load(paths.train)
    train.source = "/somewhere/else"
    train.save(paths.train, "train")
    pipeline.fit_zca(params, paths)
    events: list[dict] = []
    pipeline.train_experts(params, paths, events.append)
    assert [e for e in events if e["event"] == "expert"] == [], "experts were retrained"
    summary = pipeline.distill_ipc(params, paths, 2)
    assert summary["resumed_at"] == summary["iterations"], "the distillation started over"
    after = _files(tmp_path)
    assert after["artifacts/distilled/ipc_2.safetensors"] == \
        before["artifacts/distilled/ipc_2.safetensors"]


def test_content_digest_ignores_bookkeeping_metadata_but_not_values(tmp_path):
    a = artifacts.save(tmp_path / "a.safetensors", {"x": torch.ones(3)}, "k", {"source": "/a"})
    b = artifacts.save(tmp_path / "b.safetensors", {"x": torch.ones(3)}, "k", {"source": "/b"})
    c = artifacts.save(tmp_path / "c.safetensors", {"x": torch.ones(3) * 2}, "k")
    assert artifacts.content_digest(a) == artifacts.content_digest(b)
    assert artifacts.content_digest(a) != artifacts.content_digest(c)
    assert artifacts.content_digest(a, ("source",)) != artifacts.content_digest(b, ("source",))


# --- 4. no silent fallbacks ---------------------------------------------------------------------

@pytest.mark.parametrize("section", ["buffers", "net", "evaluate", "distill"])
def test_a_missing_section_is_an_error_not_code_defaults(section):
    raw = tiny_raw()
    del raw[section]
    with pytest.raises(ConfigError, match=f"lack the '{section}' section"):
        Params.from_dict(raw)


def test_fashion_mnist_root_typo_is_an_error_not_debians_copy(tmp_path):
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path / "datsets"))
    with pytest.raises(DataError, match="datsets"):
        data.load(cfg)


def test_fashion_mnist_default_root_may_use_debians_copy(tmp_path, monkeypatch):
    debian = helpers.make_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(data, "DEBIAN_FMNIST", debian)
    monkeypatch.chdir(tmp_path)
    train, _ = data.load(DataConfig(name="fashion_mnist"))
    assert train.source == str(debian)


def _image(path: Path, value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)


def test_imagefolder_with_one_class_is_refused(tmp_path):
    for i in range(4):
        _image(tmp_path / "only" / f"{i}.png")
    with pytest.raises(DataError, match="1 class folder"):
        data.load(DataConfig(name="imagefolder", root=str(tmp_path), channels=1, im_size=8))


def test_imagefolder_with_an_empty_class_is_refused(tmp_path):
    for i in range(4):
        _image(tmp_path / "a" / f"{i}.png")
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        data.load(DataConfig(name="imagefolder", root=str(tmp_path), channels=1, im_size=8))


def test_a_corrupt_image_is_named(tmp_path):
    for c in "ab":
        for i in range(4):
            _image(tmp_path / c / f"{i}.png")
    (tmp_path / "b" / "9.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*9\.png"):
        data.load(DataConfig(name="imagefolder", root=str(tmp_path), channels=1, im_size=8))


def test_a_distilled_set_with_nan_is_not_evaluated(tmp_path):
    raw = tiny_raw()
    paths = helpers.tiny_project(tmp_path, raw)
    params = Params.from_dict(raw)
    pipeline.distill_ipc(params, paths, 1)
    tensors, meta = pipeline.load_distilled(paths.distilled(1))
    tensors["images"][0, 0, 0, 0] = float("nan")
    artifacts.save(paths.distilled(1), tensors, "distilled", meta)
    with pytest.raises(UserError, match="NaN"):
        pipeline.evaluate_ipc(params, paths, 1)
    assert not paths.evaluation(1).exists()


# --- 5. errors a person can act on --------------------------------------------------------------

def test_a_dataset_card_that_is_not_json_is_named(tmp_path):
    from datm.export import CARD, read

    (tmp_path / CARD).write_text("{not json")
    with pytest.raises(ExportError, match=CARD):
        read(tmp_path)


def test_user_errors_share_one_base_and_bugs_are_not_hidden(capsys):
    def bug() -> None:
        raise ValueError("a real bug")

    with pytest.raises(ValueError):
        common.guarded(bug)

    def mistake() -> None:
        raise ConfigError("bad key")

    assert common.guarded(mistake) == 2
    assert "error: bad key" in capsys.readouterr().err


def test_metrics_files_other_stages_read_hold_no_wall_time(tmp_path):
    paths = Paths(tmp_path)
    write_splits(paths)
    _run_all(paths, tiny_raw())
    for path in (paths.metrics / "buffers.json", paths.evaluation(1)):
        assert "seconds" not in json.dumps(json.loads(path.read_text()))


def test_an_unusable_mlflow_store_is_a_user_error(tmp_path, monkeypatch):
    from datm.tracking import Tracker

    monkeypatch.setenv("DATM_TRACKING", "on")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    with pytest.raises(UserError, match="cannot use the MLflow store"):
        with Tracker("zca", tmp_path):
            pass


def _tiny_export(tmp_path: Path, fmt: str) -> Path:
    from datm.export import export

    pixels = torch.rand(4, 1, 8, 8)
    logits = torch.randn(4, 2)
    return export(pixels, pixels, logits, 0.01, ["a", "b"], tmp_path / f"out_{fmt}", fmt,
                  {"ipc": 2})


def test_export_to_an_unwritable_place_is_a_user_error(tmp_path):
    from datm.export import export

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot write the export"):
        x = torch.rand(2, 1, 8, 8)
        export(x, x, torch.randn(2, 2), 0.01, ["a", "b"], blocker / "x", "png", {})


@pytest.mark.parametrize("fmt, damage, fragment", [
    ("npz", lambda d: (d / "images.npz").write_bytes(b"PK\x03\x04 truncated"), "images.npz"),
    ("safetensors", lambda d: (d / "images.safetensors").unlink(), "is missing"),
    ("png", lambda d: next(d.rglob("*.png")).unlink(), "is missing"),
    ("png", lambda d: next(d.rglob("*.png")).write_bytes(b"not a png"), "cannot read image"),
    ("pt", lambda d: (d / "images.pt").write_bytes(b"garbage"), "images.pt"),
])
def test_a_damaged_export_names_the_file(tmp_path, fmt, damage, fragment):
    from datm.export import read

    out = _tiny_export(tmp_path, fmt)
    assert read(out).images.shape == (4, 1, 8, 8)
    damage(out)
    with pytest.raises(ExportError, match=fragment):
        read(out)


# --- code identity: persisted experts and checkpoints follow the code that made them ------------

def test_source_digest_ignores_comments_docstrings_and_layout():
    from datm.provenance import source_digest

    base = source_digest('def f(x):\n    """Doc."""\n    return x + 1\n')
    assert source_digest("def f(x):  # why\n\n    return (x +\n            1)\n") == base
    assert source_digest('def f(x):\n    """Doc."""\n    return x + 2\n') != base


def test_experts_made_by_other_code_are_retrained(tmp_path, monkeypatch):
    from datm import provenance

    paths = helpers.tiny_project(tmp_path, tiny_raw())
    params = Params.from_dict(tiny_raw())
    real = provenance._module_digest
    monkeypatch.setattr(provenance, "_module_digest",
                        lambda name: "changed" if name == "datm.flat_minimum" else real(name))
    events: list[dict] = []
    pipeline.train_experts(params, paths, events.append)
    assert [e["index"] for e in events if e["event"] == "expert"] == [0, 1]


def test_a_checkpoint_made_by_other_code_is_not_resumed(tmp_path, monkeypatch):
    from datm import provenance

    paths = helpers.tiny_project(tmp_path, tiny_raw())
    params = Params.from_dict(tiny_raw())
    pipeline.distill_ipc(params, paths, 1)
    assert pipeline.distill_ipc(params, paths, 1)["resumed_at"] == 3
    real = provenance._module_digest
    monkeypatch.setattr(provenance, "_module_digest",
                        lambda name: "changed" if name == "datm.matching" else real(name))
    assert pipeline.distill_ipc(params, paths, 1)["resumed_at"] == 0


def test_a_checkpoint_made_on_other_experts_of_the_same_settings_is_not_resumed(tmp_path):
    """Experts retrained on the same settings by another torch or thread count differ; their
    curves are part of a checkpoint's identity."""
    paths = helpers.tiny_project(tmp_path, tiny_raw())
    params = Params.from_dict(tiny_raw())
    pipeline.distill_ipc(params, paths, 1)
    assert pipeline.distill_ipc(params, paths, 1)["resumed_at"] == 3
    first = sorted(paths.buffers.glob("*.safetensors"))[0]
    tensors, meta = artifacts.load(first, "expert")
    meta["test_acc"] = [a + 0.01 for a in meta["test_acc"]]
    artifacts.save(first, tensors, "expert", meta)
    assert pipeline.distill_ipc(params, paths, 1)["resumed_at"] == 0


def test_a_random_real_baseline_never_comes_out_smaller_than_asked():
    from datm.evaluate import random_subset

    y = torch.tensor([0, 0, 0, 1, 1])
    assert random_subset(y, 2, 2, seed=0).numel() == 4
    with pytest.raises(UserError, match="class 1, which has 2"):
        random_subset(y, 3, 2, seed=0)


def test_evaluation_settings_per_ipc_overlay_the_evaluate_section():
    raw = tiny_raw()
    raw["evaluate"]["ipc"] = {"1": {}, "2": {"epochs": 7, "batch": 5}, "3": {"epochs": 9}}
    params = Params.from_dict(raw)
    assert (params.evaluation(2).epochs, params.evaluation(2).batch) == (7, 5)
    assert params.evaluation(1) == params.evaluate  # an empty entry: the section as it is
    # an IPC not distilled may keep its entry (`dvc exp run -S distill.ipcs=[1,2]`)
    # every distilled IPC needs one: DVC's evaluate@N depends on evaluate.ipc.N
    raw["evaluate"]["ipc"] = {"2": {"epochs": 7}}
    with pytest.raises(ConfigError, match="evaluate.ipc has no entry for IPC 1"):
        Params.from_dict(raw)
    raw["evaluate"]["ipc"] = {"1": {}, "2": {"fullset_epochs": 7}}
    with pytest.raises(ConfigError, match="fullset_epochs is no longer a setting: the experts"):
        Params.from_dict(raw)
    raw["evaluate"]["ipc"] = {"1": {}, "2": {"epochs": "x"}}
    with pytest.raises(ConfigError, match=r"evaluate\.ipc\.2\.epochs must be int"):
        Params.from_dict(raw)
