"""The DVC pipeline: static checks of dvc.yaml / params.yaml, then `dvc repro` end to end.

The end-to-end tests copy the working tree into a fresh git + DVC project, put a tiny stand-in
dataset beside it (Fashion-MNIST-shaped idx files, or CIFAR-10-shaped pickles), write a tiny
params.yaml and run the real `dvc repro`, then the CLI on the result. The pipeline runs once per
dataset (a module-scoped fixture); later tests change settings and check what DVC re-runs.
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
ALL_STAGES = {"download", "zca", "buffers", "baseline@1", "baseline@2", "distill@1",
              "distill@2", "evaluate@1", "evaluate@2", "summary"} | CROSSARCH | DECOMPOSE


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


DATASETS = {
    # Fashion-MNIST-shaped with ZCA (784 dims); CIFAR-shaped without (a 3072^2 eigh takes ~15 s
    # on this CPU). Every stage runs in one process here (torchrun's start-up is ~8 s a stage);
    # stages under torchrun inside `dvc repro`, with MLflow tracking: tests/test_experiments.py,
    # tests/test_orphans.py.
    "fashion_mnist": {"zca": True, "shape": (1, 28, 28), "n_train": 200, "n_test": 50},
    "cifar10": {"zca": False, "shape": (3, 32, 32), "n_train": 150, "n_test": 40},
}


@pytest.fixture(scope="module", params=list(DATASETS))
def e2e(request, tmp_path_factory) -> Project:
    name = request.param
    spec = DATASETS[name]
    root = helpers.copy_project(tmp_path_factory.mktemp(f"e2e_{name}"))
    if name == "fashion_mnist":
        helpers.make_fashion_mnist(root / "standin", spec["n_train"], spec["n_test"])
    else:
        helpers.make_cifar10(root / "standin", per_batch=spec["n_train"] // 5,
                             n_test=spec["n_test"])
    params = helpers.tiny_params(name, "standin", zca=spec["zca"])
    params["launch"] = {stage: 1 for stage in params["launch"]}
    helpers.write_params(root, params)
    commit = helpers.git_commit_all(root)
    env = helpers.base_env()  # DATM_TRACKING=off
    first = helpers.run([DVC, "repro"], cwd=root, env=env, timeout=600)
    project = Project(name, root, env, commit, first, spec["shape"], spec["n_train"],
                      spec["n_test"])
    if first.returncode != 0:
        pytest.fail(f"`dvc repro` failed for the {name} stand-in:\n{describe(first)}")
    return project


@pytest.mark.slow
def test_repro_builds_every_artifact(e2e):
    from datm import artifacts, data

    root = e2e.root
    assert ran_stages(e2e.first.stdout) == ALL_STAGES, e2e.first.stdout
    for rel in ("data/train.safetensors", "data/test.safetensors", "artifacts/zca.safetensors",
                "artifacts/buffers/expert_000.safetensors",
                "artifacts/buffers/expert_001.safetensors",
                "artifacts/distilled/ipc_1.safetensors", "artifacts/distilled/ipc_2.safetensors",
                "metrics/evaluate/ipc_1.json", "metrics/evaluate/ipc_2.json",
                "metrics/buffers.json", "metrics/crossarch/ipc_2.json",
                "metrics/decompose/ipc_1.json",
                "reports/summary.md", "reports/accuracy_vs_ipc.png", "reports/grid_ipc_1.png",
                "metrics/plots/accuracy.csv", "dvc.lock"):
        assert (root / rel).is_file(), rel

    train = data.Split.load(root / "data/train.safetensors")
    test = data.Split.load(root / "data/test.safetensors")
    assert train.images.shape == (e2e.n_train, *e2e.shape)
    assert test.images.shape == (e2e.n_test, *e2e.shape)
    assert train.num_classes == 10 and train.source == e2e.name  # a name, never a path
    assert artifacts.read_meta(root / "artifacts/zca.safetensors", "zca")["enabled"] is (
        e2e.name == "fashion_mnist")

    experts = sorted((root / "artifacts/buffers").glob("expert_*.safetensors"))
    assert len(experts) == 2
    traj = artifacts.load(experts[0], "expert")[0]["trajectory"]
    assert traj.shape[0] == 3 + 1

    for ipc in (1, 2):
        tensors, meta = artifacts.load(root / f"artifacts/distilled/ipc_{ipc}.safetensors",
                                       "distilled")
        assert tensors["images"].shape == (10 * ipc, *e2e.shape)
        assert tensors["labels"].shape == (10 * ipc, 10)
        iterations = _iterations(e2e.params(), ipc)  # test_changing_one_ipc... raises ipc 2's
        assert meta["iteration"] == iterations and tensors["history"].shape[0] == iterations
        ev = json.loads((root / f"metrics/evaluate/ipc_{ipc}.json").read_text())
        assert ev["ipc"] == ipc and 0 <= ev["distilled"] <= 1 and 0 <= ev["random_real"] <= 1
        assert ev["full_dataset"] is not None
        assert [r["set"] for r in ev["runs"]] == ["distilled", "random real"]
        assert {r["batch"] for r in ev["runs"]} == {e2e.params()["evaluate"]["batch"]}
    full = json.loads((root / "metrics/buffers.json").read_text())  # the experts: the full set
    assert full["full_dataset"] == sum(r["acc"] for r in full["runs"]) / 2 == ev["full_dataset"]

    report = (root / "reports/summary.md").read_text()
    assert re.search(r"^\| 1 \|", report, flags=re.M) and re.search(r"^\| 2 \|", report,
                                                                     flags=re.M)
    for png in ("accuracy_vs_ipc.png", "grid_ipc_1.png", "grid_ipc_2.png"):
        assert (root / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()  # tracking off


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
                       "matching_loss", "experts", "epochs", "env"}, sorted(columns)
    # the versions that computed the numbers: DVC shows them as env.torch, env.torchvision ...
    assert {"torch", "torchvision", "device", "threads"} == set(rows["metrics/buffers.json"]["env"])
    for row in per_ipc.values():
        assert row["gap_to_full"] == pytest.approx(row["distilled"] - row["full_dataset"])
        assert row["train_fraction"] == pytest.approx(10 * row["ipc"] / e2e.n_train)


# Checks whose outcome does not depend on the dataset (DVC's re-run logic, CLI refusals) run on
# one stand-in only: those that re-run stages on the CIFAR-shaped one, the others on the
# Fashion-MNIST one (ZCA on: every stage has real work).
RERUN_ON = "fashion_mnist"
RUN_STAGES_ON = "cifar10"


def once(project: Project, on: str = RERUN_ON) -> None:
    if project.name != on:
        pytest.skip(f"dataset-independent: checked on the {on} stand-in")


def _status(project: Project) -> dict:
    result = helpers.run([DVC, "status", "--json"], cwd=project.root, env=project.env)
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout.strip() or "{}")


@pytest.mark.slow
def test_dvc_status_sees_exactly_the_changed_stage(e2e):
    """Which stage a settings change touches (params restored)."""
    once(e2e)
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


def _iterations(params: dict, ipc: int) -> int:
    """The iterations params.yaml asks of `ipc` (its own table first, then the defaults)."""
    return params["distill"]["ipc"][ipc].get("iterations",
                                             params["distill"]["defaults"]["iterations"])


@pytest.mark.slow
def test_changing_one_ipc_reruns_only_that_ipc(e2e):
    once(e2e, on=RUN_STAGES_ON)
    params = e2e.params()
    params["distill"]["ipc"][2]["iterations"] = 4
    e2e.set_params(params)
    result = e2e.repro()
    assert result.returncode == 0, describe(result)
    assert ran_stages(result.stdout) == {"distill@2", "evaluate@2", "crossarch@2", "summary"}, \
        result.stdout
    from datm import artifacts

    meta = artifacts.read_meta(e2e.root / "artifacts/distilled/ipc_2.safetensors", "distilled")
    assert meta["iteration"] == 4
    assert artifacts.read_meta(e2e.root / "artifacts/distilled/ipc_1.safetensors",
                               "distilled")["iteration"] == 3


@pytest.mark.slow
def test_changing_buffers_lr_reruns_buffers_and_what_follows(e2e):
    once(e2e, on=RUN_STAGES_ON)
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
    once(e2e)
    result = helpers.run([DVC, "metrics", "show"], cwd=e2e.root, env=e2e.env)
    assert result.returncode == 0, describe(result)
    assert "ipc" in result.stdout
    assert "metrics/evaluate/ipc_1.json" in result.stdout


# --- export and friends on the finished pipeline ---------------------------------------------------

FORMATS = ("safetensors", "pt", "npz", "png")


@pytest.fixture(scope="module")
def exports(e2e) -> dict[str, Path]:
    """`datm export --ipc 2` in every format (pt and npz, plain tensor dumps, on one stand-in)."""
    out = {}
    for fmt in FORMATS if e2e.name == RERUN_ON else ("safetensors", "png"):
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
    once(e2e)
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
    once(e2e)
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
    once(e2e)
    result = datm("status", cwd=e2e.root, env=e2e.env)
    assert result.returncode == 0, describe(result)
    text = result.stdout + result.stderr
    assert "2/2" in text
    assert text.count("done") == 2 and "missing" not in text


@pytest.mark.slow
def test_forced_rerun_of_unchanged_stages_leaves_everything_downstream_fresh(e2e):
    """Artifacts are deterministic: re-running download and zca by force on the same data writes
    the same bytes, so DVC sees nothing downstream as changed (it once marked 2 of 3 tries)."""
    once(e2e)
    assert _status(e2e) == {}
    for stage in ("download", "zca", "buffers"):
        result = e2e.repro("-f", "-s", stage)
        assert result.returncode == 0, describe(result)
        assert _status(e2e) == {}, f"forced {stage} made downstream stages stale"
