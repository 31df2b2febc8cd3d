"""Shared helpers: tiny stand-in datasets, tiny params, throw-away project copies, subprocesses.

Everything here is sized for a busy 2-core CPU: a few hundred 28x28 or 32x32 images at most.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from datm.augment import AugConfig
from datm.networks import NetSpec

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DATM = str(VENV_BIN / "datm")
DVC = str(VENV_BIN / "dvc")
DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: any download fails at once

# The unit tests' network and augmentation: a ConvNet of width 4 on 1x8x8 images of 3 classes.
TINY_SPEC = NetSpec(channels=1, num_classes=3, im_size=8, width=4, depth=2)
TINY_AUG = AugConfig(strategy="color_crop_cutout_scale_rotate")


# --- tiny in-memory data -------------------------------------------------------------------

def blobs(n: int, num_classes: int, channels: int = 1, size: int = 8, seed: int = 0,
          noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable float images: a fixed random pattern per class plus noise; labels balanced."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, channels, size, size, generator=g)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    x = protos[y] + noise * torch.randn(n, channels, size, size, generator=g)
    return x, y


def learnable_uint8(n: int, num_classes: int, channels: int, size: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, channels, size, size] with class-dependent patterns, and labels."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, size=(num_classes, channels, size, size))
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = 0.7 * protos[labels] + 0.3 * rng.uniform(0, 255, size=(n, channels, size, size))
    return images.round().clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


# --- stand-in datasets on disk -------------------------------------------------------------

def _write_idx_gz(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, n_train: int = 200, n_test: int = 50,
                       num_classes: int = 10) -> Path:
    """Fashion-MNIST-shaped idx .gz files in <root>/FashionMNIST/raw/ (28x28, 10 classes)."""
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = learnable_uint8(n, num_classes, 1, 28, seed)
        _write_idx_gz(raw / f"{prefix}-images-idx3-ubyte.gz", images[:, 0], 0x00000803)
        _write_idx_gz(raw / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x00000801)
    return raw


CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                 b"horse", b"ship", b"truck"]


def make_cifar10(root: Path, per_batch: int = 30, n_test: int = 40) -> Path:
    """CIFAR-10-shaped python pickles in <root>/cifar-10-batches-py/ (3x32x32, 10 classes)."""
    base = Path(root) / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        images, labels = learnable_uint8(n, 10, 3, 32, seed=10 + i)
        batch = {b"batch_label": name.encode(), b"data": images.reshape(n, 3072),
                 b"labels": [int(v) for v in labels],
                 b"filenames": [f"{name}_{j}.png".encode() for j in range(n)]}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f)
    return base


# --- params and projects -------------------------------------------------------------------

def _overlay(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(out[key], value)
        else:
            out[key] = value
    return out


def shipped_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def tiny_params(name: str = "fashion_mnist", root: str = "standin", zca: bool = True) -> dict:
    """The repository's params.yaml with tiny values: a pipeline that finishes in seconds.

    Only values change (and the IPC table is replaced): keys the shipped profile lacks stay
    missing, so the end-to-end tests exercise the profile as it is shipped.
    """
    tiny = {
        "seed": 0,
        "device": "cpu",
        "data": {"name": name, "root": root},
        "zca": {"enabled": zca, "eps": 0.1},
        "net": {"width": 4, "depth": 2, "norm": "instance"},
        "augment": {"strategy": "color_crop_cutout_scale_rotate"},
        # compile off: 10-30 s per process to compile pays for nothing on these sizes
        # (tests/test_compiled.py runs it)
        # no decay tail and a snapshot per epoch, so the tests' 2-3 epoch experts fit their
        # windows (tests/test_snapshots.py runs the tail and save_every)
        "buffers": {"num_experts": 2, "epochs": 3, "lr": 0.05, "batch": 32, "group": 1,
                    "compile": False, "decay_epochs": 0, "save_every": 0},
        "distill": {
            "ipcs": [1, 2],
            "defaults": {"iterations": 3, "threshold": 10.0, "mode": "recompute",
                         "init": "real_correct", "labels": "expert", "checkpoint_every": 2,
                         "grid_every": 2},
        },
        "evaluate": {"models": 1, "epochs": 2, "batch": 32, "arch": "convnet",
                     "cross_archs": ["convnet_bn"], "cross_ipcs": [2], "decompose_ipcs": [1]},
    }
    params = _overlay(shipped_params(), tiny)
    params["distill"]["ipc"] = {
        1: {"syn_steps": 2, "expert_epochs": 1, "min_start_epoch": 0, "max_start_epoch": 2,
            "batch_syn": 5, "lr_img": 10, "lr_y": 2},
        2: {"syn_steps": 2, "expert_epochs": 1, "min_start_epoch": 0, "sg_start": 1,
            "max_start_epoch": 2, "sg_end": 2, "batch_syn": 10, "lr_img": 10, "lr_y": 2},
    }
    params["evaluate"]["ipc"] = {1: {}, 2: {}}  # an entry per IPC, as dvc.yaml needs
    return params


def dvc_params_missing(raw: dict, dvc_yaml: Path = REPO / "dvc.yaml") -> list[str]:
    """The params that dvc.yaml's stages name and `raw` lacks (what `datm repro` refuses)."""
    from cli.stage_params import missing

    return missing(dvc_yaml, raw)


def write_params(project: Path, params: dict) -> Path:
    path = Path(project) / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def project_files() -> list[str]:
    """The repository's files as a checkout would have them (tracked and new, not ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    # the default run's committed results (dvc.lock, metrics/, reports/) are not the project's
    # sources: a test project makes its own
    skip = ("tests/", ".dvc/", ".ci/", "dvc.lock", "metrics/", "reports/")
    return [f for f in out.splitlines()
            if f and not f.startswith(skip) and (REPO / f).is_file()
            and (REPO / f).stat().st_size < 5_000_000]  # no stray data files


def copy_project(dest: Path) -> Path:
    """A fresh git + DVC project holding a copy of the working tree (without tests/)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    git = ["git", "-c", "user.name=datm tests", "-c", "user.email=tests@example.invalid"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=dest, check=True, env=base_env())
    return dest


def git_commit_all(project: Path, message: str = "tiny project") -> str:
    git = ["git", "-c", "user.name=datm tests", "-c", "user.email=tests@example.invalid",
           "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["add", "-A"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-q", "-m", message], cwd=project, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                          text=True, check=True).stdout.strip()


def base_env(**extra: str) -> dict:
    """Environment for subprocesses: the venv first on PATH, no tracking, no network, 1 thread."""
    drop = ("COLUMNS", "LINES", "MLFLOW_TRACKING_URI", "PYTHONPATH", "DATM_DEBUG",
            "DATM_EXPERIMENT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "DATM_TRACKING": "off",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY,
        "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY,
        "NO_PROXY": "", "no_proxy": "",
        "GIT_CONFIG_NOSYSTEM": "1",
    })
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env or base_env(),
                          timeout=timeout)


def datm(*args: str, cwd: Path, env: dict | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    return run([DATM, *args], cwd=cwd, env=env, timeout=timeout)


def ran_stages(output: str) -> set[str]:
    """Stage names from `dvc repro`'s "Running stage 'name':" lines."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The non-empty lines a failed command printed (stdout and stderr together)."""
    text = result.stdout + result.stderr
    return [line for line in text.splitlines() if line.strip()]


def describe(result: subprocess.CompletedProcess) -> str:
    return (f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n"
            f"--- stderr ---\n{result.stderr[-4000:]}")


# --- a tiny project in-process (splits, ZCA and experts by the pipeline's own steps) ---------

# --- the tiny pipeline's artifacts ---------------------------------------------------------

# The stages `dvc repro` runs on tiny_params: its evaluate.cross_ipcs crossarch@2 (IPC 2's
# recipe on cross_archs) and its evaluate.decompose_ipcs decompose@1.
TINY_STAGES = {"download", "zca", "buffers", "baseline@1", "baseline@2", "distill@1",
               "distill@2", "evaluate@1", "evaluate@2", "crossarch@2", "decompose@1", "summary"}


def iterations(params: dict, ipc: int) -> int:
    """The iterations params.yaml asks of `ipc` (its own table first, then the defaults); the
    table's key may be the number or its string, as DVC's `-S` writes it."""
    tables = params["distill"]["ipc"]
    table = tables.get(ipc, tables.get(str(ipc), {}))
    return table.get("iterations", params["distill"]["defaults"]["iterations"])


def check_every_artifact(root: Path, ran: set[str], name: str, shape: tuple[int, int, int],
                         n_train: int, n_test: int) -> None:
    """What a first `dvc repro` of tiny_params(name) with 2 experts must have written, read
    back: stages, shapes, the ZCA flag, iterations, metrics and the report."""
    import json

    from datm import artifacts, data

    params = yaml.safe_load((root / "params.yaml").read_text())
    assert ran == TINY_STAGES, ran
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
    assert train.images.shape == (n_train, *shape)
    assert test.images.shape == (n_test, *shape)
    assert train.num_classes == 10 and train.source == name  # a name, never a path
    assert artifacts.read_meta(root / "artifacts/zca.safetensors", "zca")["enabled"] is (
        params["zca"]["enabled"])

    experts = sorted((root / "artifacts/buffers").glob("expert_*.safetensors"))
    assert len(experts) == 2
    traj = artifacts.load(experts[0], "expert")[0]["trajectory"]
    assert traj.shape[0] == params["buffers"]["epochs"] + 1

    for ipc in (1, 2):
        tensors, meta = artifacts.load(root / f"artifacts/distilled/ipc_{ipc}.safetensors",
                                       "distilled")
        assert tensors["images"].shape == (10 * ipc, *shape)
        assert tensors["labels"].shape == (10 * ipc, 10)
        want = iterations(params, ipc)
        assert meta["iteration"] == want and tensors["history"].shape[0] == want
        ev = json.loads((root / f"metrics/evaluate/ipc_{ipc}.json").read_text())
        assert ev["ipc"] == ipc and 0 <= ev["distilled"] <= 1 and 0 <= ev["random_real"] <= 1
        assert ev["full_dataset"] is not None
        assert [r["set"] for r in ev["runs"]] == ["distilled", "initialization", "random real"]
        assert {r["batch"] for r in ev["runs"]} == {params["evaluate"]["batch"]}
    full = json.loads((root / "metrics/buffers.json").read_text())  # the experts: the full set
    assert full["full_dataset"] == sum(r["acc"] for r in full["runs"]) / 2 == ev["full_dataset"]

    report = (root / "reports/summary.md").read_text()
    assert re.search(r"^\| 1 \|", report, flags=re.M) and re.search(r"^\| 2 \|", report,
                                                                     flags=re.M)
    for png in ("accuracy_vs_ipc.png", "grid_ipc_1.png", "grid_ipc_2.png"):
        assert (root / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_learnable_splits(paths, n_train: int = 60, n_test: int = 60, lo: int = 0,
                           hi: int = 255, seed: int = 0, classes: tuple[str, ...] = ("a", "b", "c"),
                           channels: int = 1, size: int = 8) -> None:
    """uint8 train and test splits saved the way the download stage saves them.

    Both splits come from ONE draw of `learnable_uint8` (the same class patterns), so that a
    network trained on the train split scores above chance on the test split; the pixels are
    rescaled into [lo, hi] (a margin from 0 and 255 keeps slightly moved images unclipped).
    """
    from datm import data

    images, labels = learnable_uint8(n_train + n_test, len(classes), channels, size, seed)
    images = (lo + images.astype(np.float64) * (hi - lo) / 255).round().astype(np.uint8)
    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    mean, std = data.channel_stats(x[:n_train])
    for path, part, name in ((paths.train, slice(0, n_train), "train"),
                             (paths.test, slice(n_train, None), "test")):
        split = data.Split(x[part].clone(), y[part].clone(), list(classes), "tiny-standin",
                           mean, std)
        split.save(path, name)


def tiny_project(root: Path, params: dict, experts: bool = True, **splits):
    """params.yaml, data/, the ZCA and (if `experts`) the expert buffer of a tiny project,
    made in-process by the pipeline's steps; returns its `Paths`."""
    from datm import pipeline
    from datm.config import Params, Paths

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_params(root, params)
    paths = Paths(root)
    write_learnable_splits(paths, **splits)
    parsed = Params.from_dict(yaml.safe_load(yaml.safe_dump(params)))
    pipeline.fit_zca(parsed, paths)
    if experts:
        pipeline.train_experts(parsed, paths)
    return paths


def stage_env(**extra: str) -> dict:
    """`base_env` for `python -m stages.<name>` run from a project folder outside the repo."""
    return base_env(PYTHONPATH=str(REPO), **extra)


def start(args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """A background stage process (`stage_env`) writing stdout and stderr to `log` (no pipe to
    fill up). It takes SIGINT as a foreground command takes Ctrl-C even when the tests run as a
    background job: its shell started them with SIGINT ignored, which a child inherits, and a
    Python started so installs no KeyboardInterrupt handler."""
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env=stage_env(**env), preexec_fn=default_sigint)


def default_sigint() -> None:
    """SIGINT at its default action (for a child's preexec_fn): see `start`."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """`proc`'s exit code; killed (and waited for) if it has not ended within `timeout`."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None,
             every: float = 0.02) -> bool:
    """Poll `predicate` until it holds (True), `timeout` passes or `proc` ends (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(every)
    return False
