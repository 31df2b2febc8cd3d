"""The DVC pipeline: static checks of dvc.yaml / params.yaml, then `dvc repro` end to end.

The end-to-end tests copy the working tree into a fresh git + DVC project, put a tiny
CIFAR-10-shaped stand-in dataset beside it (pickled batches, 3x32x32), write a tiny params.yaml
and run the real `dvc repro` with tracking off, then the CLI on the result. The pipeline runs
once (a module-scoped fixture); later tests change settings and check what DVC re-runs. The
Fashion-MNIST-shaped stand-in with ZCA and MLflow tracking on goes through `dvc repro` in
tests/test_experiments.py (the same artifact checks, helpers.check_every_artifact).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import helpers
import pytest
import torch
import yaml
from helpers import DVC, REPO, datm, describe, ran_stages

CROSSARCH = {"crossarch@2"}  # tiny_params' evaluate.cross_ipcs: the recipe of IPC 2, cross_archs
DECOMPOSE = {"decompose@1"}  # tiny_params' evaluate.decompose_ipcs


# --- static checks (fast) ------------------------------------------------------------------------

def _flow_lists(text: str, key: str) -> list[list[str]]:
    """Every `key: [a, b, ...]` list in dvc.yaml, read textually (works even if YAML breaks)."""
    lists = []
    for m in re.finditer(rf"^\s*{key}:\s*\[([^\]]*)\]", text, flags=re.M | re.S):
        lists.append([item.strip().strip("'\"") for item in m.group(1).split(",")
                      if item.strip()])
    return lists


def test_dvc_yaml_is_valid_yaml():
    yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_param_dvc_yaml_names_is_in_params_yaml():
    text = (REPO / "dvc.yaml").read_text()
    params = helpers.shipped_params()
    missing = []
    for names in _flow_lists(text, "params"):
        for name in names:
            for ipc in (params["distill"]["ipcs"] if "${item}" in name else [None]):
                resolved = name.replace("${item}", str(ipc))
                node = params
                for part in resolved.split("."):
                    if isinstance(node, dict) and (part in node or
                                                   (part.isdigit() and int(part) in node)):
                        node = node[part] if part in node else node[int(part)]
                    else:
                        missing.append(resolved)
                        break
    assert not missing, f"dvc.yaml tracks params that params.yaml lacks: {sorted(set(missing))}"


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "presets").glob("*.yaml"))])
def test_every_profile_has_every_param_a_stage_depends_on(profile):
    """The shipped profile and every preset: DVC would stop at the first stage whose param is
    missing (a new setting added to dvc.yaml and params.yaml but not to a preset)."""
    raw = yaml.safe_load((REPO / profile).read_text())
    assert helpers.dvc_params_missing(raw) == []


@pytest.mark.parametrize("drop", ["seed", "evaluate.compile", "evaluate.cross_ipcs"])
def test_datm_repro_refuses_params_without_a_param_a_stage_needs(tmp_path, drop):
    """Before DVC starts (which would stop at that stage after the ones before it ran): one
    line. A project whose own dvc.yaml does not name the param (one `datm init` wrote before
    the setting existed) runs without it."""
    from cli.main import _check_repro
    from datm.errors import UserError

    helpers.copy_project(tmp_path)
    raw = helpers.tiny_params()
    *path, leaf = drop.split(".")
    node = raw
    for part in path:
        node = node[part]
    del node[leaf]
    helpers.write_params(tmp_path, raw)
    assert helpers.dvc_params_missing(raw) == [drop]  # what DVC would stop at
    with pytest.raises(UserError, match=rf"lacks {re.escape(drop)}, which dvc.yaml"):
        _check_repro(tmp_path)
    dvc = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        body["params"] = [n for n in body.get("params") or [] if n != drop]
        if stage.get("foreach") == "${" + drop + "}":
            stage["foreach"] = [2]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    _check_repro(tmp_path)  # an older project's dvc.yaml: nothing lacking


def test_the_baseline_stage_lists_every_setting_of_its_protocol():
    """baseline@N's file is kept while DVC thinks its params unchanged: a setting the protocol
    reads but DVC does not track leaves a stale file that evaluate@N then ignores (retraining
    the baseline unwritten each time)."""
    from datm.pipeline.evaluate import BASELINE_KEYS

    listed = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["baseline"]["do"]
                 ["params"])
    assert "seed" in listed  # evaluate.seed is the top-level seed
    assert {f"evaluate.{k}" for k in BASELINE_KEYS if k != "seed"} <= listed


def test_every_code_dependency_exists():
    text = (REPO / "dvc.yaml").read_text()
    code = [d for names in _flow_lists(text, "deps") for d in names if d.endswith(".py")]
    assert code, "no code dependencies found in dvc.yaml"
    assert [d for d in code if not (REPO / d).is_file()] == []


def test_shipped_params_are_consistent():
    from datm.config import load_params

    params = load_params(REPO / "params.yaml")
    assert params.ipcs
    for ipc in params.ipcs:
        cfg = params.distill(ipc)
        assert cfg.last_epoch_needed <= params.buffers.epochs, (
            f"IPC {ipc} reads expert epoch {cfg.last_epoch_needed} > buffers.epochs")


def test_dvc_accepts_the_pipeline(tmp_path):
    helpers.copy_project(tmp_path)
    result = helpers.run([DVC, "stage", "list"], cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    shipped = helpers.shipped_params()["distill"]["ipcs"]
    expected = {"download", "zca", "buffers", "summary"}
    expected |= {f"{s}@{ipc}" for s in ("baseline", "distill", "evaluate") for ipc in shipped}
    evaluate = helpers.shipped_params()["evaluate"]
    expected |= {f"crossarch@{ipc}" for ipc in evaluate["cross_ipcs"]}
    expected |= {f"decompose@{ipc}" for ipc in evaluate["decompose_ipcs"]}
    assert listed == expected


# --- end to end (slow) ---------------------------------------------------------------------------

@dataclass
class Project:
    name: str
    root: Path
    env: dict
    commit: str
    first: object  # the first `dvc repro`
    shape: tuple[int, int, int]
    n_train: int
    n_test: int

    def repro(self, *args: str):
        return helpers.run([DVC, "repro", *args], cwd=self.root, env=self.env, timeout=600)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, params: dict) -> None:
        helpers.write_params(self.root, params)


# CIFAR-shaped without ZCA (a 3072^2 eigh takes ~15 s on this CPU; ZCA's determinism under
# `dvc repro -f` is checked on the Fashion-MNIST project of tests/test_experiments.py). Every
# stage runs in one process here (torchrun's start-up is ~8 s a stage); stages under torchrun
# inside `dvc repro`, with MLflow tracking: tests/test_experiments.py, tests/test_orphans.py.
NAME, SHAPE, N_TRAIN, N_TEST = "cifar10", (3, 32, 32), 150, 40


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> Project:
    root = helpers.copy_project(tmp_path_factory.mktemp("e2e"))
    helpers.make_cifar10(root / "standin", per_batch=N_TRAIN // 5, n_test=N_TEST)
    params = helpers.tiny_params(NAME, "standin", zca=False)
    params["launch"] = {stage: 1 for stage in params["launch"]}
    helpers.write_params(root, params)
    commit = helpers.git_commit_all(root)
    env = helpers.base_env()  # DATM_TRACKING=off
    first = helpers.run([DVC, "repro"], cwd=root, env=env, timeout=600)
    project = Project(NAME, root, env, commit, first, SHAPE, N_TRAIN, N_TEST)
    if first.returncode != 0:
        pytest.fail(f"`dvc repro` failed for the {NAME} stand-in:\n{describe(first)}")
    return project


@pytest.mark.slow
def test_repro_builds_every_artifact(e2e):
    helpers.check_every_artifact(e2e.root, ran_stages(e2e.first.stdout), e2e.name, e2e.shape,
                                 e2e.n_train, e2e.n_test)
    assert not (e2e.root / "mlflow.db").exists() and not (e2e.root / "mlruns").exists()


@pytest.mark.slow
def test_second_repro_runs_nothing(e2e):
    result = e2e.repro()
    assert result.returncode == 0, describe(result)
    assert ran_stages(result.stdout) == set(), result.stdout
    assert "up to date" in result.stdout


@pytest.mark.slow
def test_dvc_metrics_show_one_narrow_row_per_ipc(e2e):
    result = helpers.run([DVC, "metrics", "show", "--json"], cwd=e2e.root, env=e2e.env)
    assert result.returncode == 0, describe(result)
    files = next(iter(json.loads(result.stdout).values()))["data"]
    rows = {path: body["data"] for path, body in files.items()}
    per_ipc = {row["ipc"]: row for path, row in rows.items() if "evaluate" in path}
    assert set(per_ipc) == {1, 2}
    for row in per_ipc.values():
        assert {"distilled", "distilled_std", "random_real", "random_real_std",
                "full_dataset"} <= set(row)
    # every scalar is a column of the table: exactly these, where lossless stands included (the
    # gap to the full set and the share of the training set); per-model details stay in lists
    columns = {k for row in rows.values() for k, v in row.items() if not isinstance(v, list)}
    assert columns == {"ipc", "distilled", "distilled_std", "random_real", "random_real_std",
                       "full_dataset", "full_dataset_std", "gap_to_full", "train_fraction",
                       "matching_loss", "experts", "epochs", "env", "init", "init_std",
                       "matching_gain"}, sorted(columns)
    # the versions that computed the numbers: DVC shows them as env.torch, env.torchvision ...
    assert {"torch", "torchvision", "device", "threads"} == set(rows["metrics/buffers.json"]["env"])
    for row in per_ipc.values():
        assert row["gap_to_full"] == pytest.approx(row["distilled"] - row["full_dataset"])
        assert row["train_fraction"] == pytest.approx(10 * row["ipc"] / e2e.n_train)


def _status(project: Project) -> dict:
    result = helpers.run([DVC, "status", "--json"], cwd=project.root, env=project.env)
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout.strip() or "{}")


@pytest.mark.slow
def test_dvc_status_sees_exactly_the_changed_stage(e2e):
    """Which stage a settings change touches (params restored)."""
    original = e2e.params()
    assert _status(e2e) == {}
    try:
        for change, stage in ((("distill", "ipc", 2, "lr_img"), "distill@2"),
                              # decompose@1 labels random real images the way distill@1 does
                              (("distill", "ipc", 1, "syn_steps"), {"distill@1", *DECOMPOSE}),
                              (("buffers", "lr"), "buffers"),
                              (("zca", "eps"), "zca"),
                              # summary's report states the evaluation epochs; the random real
                              # baselines train by the same recipe
                              (("evaluate", "epochs"), {"baseline@1", "baseline@2", "evaluate@1",
                                                        "evaluate@2", "summary", *CROSSARCH,
                                                        *DECOMPOSE}),
                              # the sets' batch (distill@N: the recipe of its optional
                              # validation selection)
                              (("evaluate", "batch"), {"baseline@1", "baseline@2", "distill@1",
                                                       "distill@2", "evaluate@1", "evaluate@2",
                                                       *CROSSARCH, *DECOMPOSE}),
                              # the experts' schedule: they are the full-set reference too
                              (("buffers", "epochs"), "buffers"),
                              # one IPC's evaluation recipe: that IPC's stages only
                              (("evaluate", "ipc", 2, "epochs"),
                               {"baseline@2", "distill@2", "evaluate@2",
                                *(c for c in CROSSARCH if c.endswith("@2"))})):
            params = e2e.params()
            node = params
            for key in change[:-1]:
                node = node[key]
            node[change[-1]] = node.get(change[-1], 3) * 2
            e2e.set_params(params)
            expected = stage if isinstance(stage, set) else {stage}
            assert set(_status(e2e)) == expected, change
            e2e.set_params(original)
    finally:
        e2e.set_params(original)
    assert _status(e2e) == {}


@pytest.mark.slow
def test_changing_buffers_lr_reruns_buffers_and_what_follows(e2e):
    from datm import artifacts

    params = e2e.params()
    params["buffers"]["lr"] = 0.07
    e2e.set_params(params)
    result = e2e.repro()
    assert result.returncode == 0, describe(result)
    assert ran_stages(result.stdout) == {"buffers", "distill@1", "distill@2", "evaluate@1",
                                         "evaluate@2", "summary", *CROSSARCH, *DECOMPOSE}, \
        result.stdout
    experts = sorted((e2e.root / "artifacts/buffers").glob("expert_*.safetensors"))
    assert len(experts) == 2
    for path in experts:
        assert artifacts.read_meta(path, "expert")["config"]["lr"] == 0.07
    again = e2e.repro()
    assert again.returncode == 0 and ran_stages(again.stdout) == set(), describe(again)


@pytest.mark.slow
def test_dvc_metrics_show(e2e):
    result = helpers.run([DVC, "metrics", "show"], cwd=e2e.root, env=e2e.env)
    assert result.returncode == 0, describe(result)
    assert "ipc" in result.stdout
    assert "metrics/evaluate/ipc_1.json" in result.stdout


# --- export and friends on the finished pipeline ---------------------------------------------------

FORMATS = ("safetensors", "pt", "npz", "png")


@pytest.fixture(scope="module")
def exports(e2e) -> dict[str, Path]:
    """`datm export --ipc 2` in every format."""
    out = {}
    for fmt in FORMATS:
        folder = e2e.root / "exports" / fmt
        result = datm("export", "--ipc", "2", "--format", fmt, "--out", str(folder),
                      cwd=e2e.root, env=e2e.env)
        assert result.returncode == 0, describe(result)
        out[fmt] = folder
    # What they were made from, for test_export_every_format: later tests re-distill ipc 2.
    source = e2e.root / "exports" / "source"
    source.mkdir()
    for rel in ("artifacts/distilled/ipc_2.safetensors", "artifacts/zca.safetensors"):
        shutil.copy2(e2e.root / rel, source)
    return out


def _expected_pixels(root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The distilled set as network inputs and as pixels de-whitened and de-normalized (not
    clipped), computed here from the artifacts the exports were made from."""
    from datm import artifacts, data
    from datm.zca import ZCA

    tensors, meta = artifacts.load(root / "exports/source/ipc_2.safetensors", "distilled")
    zca = ZCA.load(root / "exports/source/zca.safetensors")
    pixels = data.to_pixels(tensors["images"], meta["mean"], meta["std"], zca, clip=False)
    return tensors["images"], pixels, tensors["labels"], float(tensors["lr"][0])


@pytest.mark.slow
def test_export_every_format(e2e, exports):
    from datm.export import read

    inputs, pixels, logits, lr = _expected_pixels(e2e.root)
    class_ids = torch.arange(10).repeat_interleave(2)
    for fmt, folder in exports.items():
        got = read(folder)
        card = got.card
        assert card["format"] == fmt and card["ipc"] == 2 and card["num_images"] == 20
        assert len(card["classes"]) == 10 and card["shape"] == list(e2e.shape)
        assert got.pixels.shape == (20, *e2e.shape)
        assert torch.equal(got.targets, logits) and torch.equal(got.class_ids, class_ids)
        assert got.lr == pytest.approx(lr)
        if fmt == "png":  # 8 bits over each image's own range
            span = (pixels.amax((1, 2, 3)) - pixels.amin((1, 2, 3))).view(-1, 1, 1, 1)
            assert bool(((got.pixels - pixels).abs() <= 0.5 * span / 255 + 1e-5).all())
            assert got.inputs is None
        else:  # lossless: the network inputs bit for bit, the pixels unclipped
            assert torch.equal(got.inputs, inputs), fmt
            assert torch.allclose(got.pixels, pixels, atol=1e-5), fmt  # threads: rounding
        assert (folder / "README.md").is_file()
        if fmt != "png":
            payload = _payload(folder, fmt)
            assert torch.equal(torch.as_tensor(payload["class_ids"]), class_ids)
            probs = torch.as_tensor(payload["label_probs"])
            assert torch.allclose(probs, logits.softmax(1), atol=1e-6)


def _payload(folder: Path, fmt: str) -> dict:
    if fmt == "safetensors":
        from datm import artifacts

        return artifacts.load(folder / "images.safetensors", "export")[0]
    if fmt == "pt":
        return torch.load(folder / "images.pt", weights_only=True)
    import numpy as np

    with np.load(folder / "images.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_png_export_is_an_image_folder(e2e, exports):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(exports["png"]))
    assert len(ds.classes) == 10
    assert len(ds) == 20
    counts = torch.bincount(torch.tensor(ds.targets), minlength=10)
    assert torch.equal(counts, torch.full((10,), 2))
    image, target = ds[0]
    assert image.size == (e2e.shape[2], e2e.shape[1]) and target == 0


@pytest.mark.slow
def test_export_refuses_to_overwrite_without_force(e2e, exports):
    folder = e2e.root / "exports" / "npz_force"  # a copy: the shared one stays an ipc 2 export
    shutil.copytree(exports["npz"], folder)
    before = sorted(p.name for p in folder.iterdir())
    result = datm("export", "--ipc", "2", "--format", "npz", "--out", str(folder),
                  cwd=e2e.root, env=e2e.env)
    assert result.returncode == 2, describe(result)
    assert "--force" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == before
    result = datm("export", "--ipc", "1", "--format", "npz", "--out", str(folder), "--force",
                  cwd=e2e.root, env=e2e.env)
    assert result.returncode == 0, describe(result)
    from datm.export import read

    assert read(folder).card["ipc"] == 1


@pytest.mark.slow
def test_export_of_an_ipc_that_was_not_distilled(e2e):
    result = datm("export", "--ipc", "999", "--out", str(e2e.root / "exports" / "none"),
                  cwd=e2e.root, env=e2e.env)
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr
    assert re.search(r"distilled IPCs: 1, 2\b", " ".join(result.stderr.split())), result.stderr


@pytest.mark.slow
def test_evaluate_from_an_export(e2e, exports):
    result = datm("evaluate", "--from", str(exports["png"]), cwd=e2e.root, env=e2e.env)
    assert result.returncode == 0, describe(result)
    text = " ".join((result.stdout + result.stderr).split())
    found = re.search(r"evaluate \S+: (\d+\.\d+) ± (\d+\.\d+) %", text)
    assert found, text
    assert 0 <= float(found.group(1)) <= 100


@pytest.mark.slow
def test_status_of_a_finished_project(e2e):
    result = datm("status", cwd=e2e.root, env=e2e.env)
    assert result.returncode == 0, describe(result)
    text = result.stdout + result.stderr
    assert "2/2" in text
    assert text.count("done") == 2 and "missing" not in text
