"""A small layer over MLflow: one run per stage execution, batched metric writes.

MLflow is optional: without it (a bare GPU machine) or with DATM_TRACKING=off every call is a
no-op and the pipeline runs the same. The default store is a SQLite file at the project root;
MLFLOW_TRACKING_URI overrides it.

One pipeline execution (a `dvc repro`, or one `dvc exp run` experiment) is one MLflow *parent*
run, the stage runs nested under it: the parent carries every setting and the resulting
accuracies, so MLflow's runs table and compare view set settings against accuracy per
experiment. The first stage that runs makes the parent (under the store lock), the others find
it by its key: the DVC experiment's name, or outside experiments the git commit and a hash of
the settings. A stage run by hand (`datm distill`) is a run of its own, not part of one.

A SQLite store keeps its runs' artifacts in `mlartifacts/` beside the database, found at run
time, never through an absolute path recorded in it: a copied or moved project keeps writing
into its own folder, and `datm ui` (or `mlflow ui` started there) serves them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from . import locks
from .errors import UserError

DEFAULT_EXPERIMENT = "datm"
ARTIFACTS = "mlartifacts"  # beside a SQLite store: its runs' artifacts
# An artifact location of MLflow's proxied scheme is relative: `mlflow ui` resolves it under
# its --artifacts-destination (default ./mlartifacts), the Tracker under the store's folder.
RELATIVE_SCHEME = "mlflow-artifacts"


def store_root(root: str | Path = ".") -> Path:
    """The folder of the default store: the project root. A DVC experiment run in a temporary
    copy (`dvc exp run --temp`, the queue) logs into the project it came from (DVC_ROOT)."""
    if os.environ.get("DVC_EXP_NAME") and os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    return Path(root)


def default_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{store_root(root).resolve() / 'mlflow.db'}"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):].split("?")[0]) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> Path | None:
    """Where a SQLite store's runs keep their artifacts (None for other stores)."""
    db = _sqlite_file(uri)
    return None if db is None else db.parent / ARTIFACTS


def _store_lock(uri: str, root: str | Path = "."):
    """Serializes first use of a SQLite store: MLflow creates and migrates its tables on first
    use, and two processes doing that at once can crash each other; and the making of a parent
    run, which two stages started at once would otherwise both make. A tracking server
    serializes its tables itself; its parent runs are made under a lock in the project."""
    db = _sqlite_file(uri)
    if db is None:
        return locks.hold(Path(root) / ".mlflow-parent.lock", wait=True)
    return locks.hold(db.parent / f".{db.name}.lock", wait=True)


def _experiment_id(client: Any, name: str, uri: str = "") -> str:
    """The experiment's id, made if missing. Another process can make it between our look and
    our create: then the create fails, and a second look finds it. In a SQLite store it is made
    with a relative artifact location (see the module's docstring)."""
    from mlflow.exceptions import MlflowException

    location = None
    if artifact_root(uri) is not None:
        location = f"{RELATIVE_SCHEME}:/{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"
    # model training, not GenAI: MLflow's UI then opens the experiment on its runs table
    tags = {"mlflow.experimentKind": "custom_model_development"}
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:  # the one retry
                return client.create_experiment(name, artifact_location=location, tags=tags)
    return exp.experiment_id


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _git(root: str | Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(root: str | Path = ".") -> str:
    return _git(root, "rev-parse", "HEAD") or "unknown"


def git_dirty(root: str | Path = ".") -> bool:
    """Whether tracked files differ from the commit (the run is then not exactly that commit)."""
    return bool(_git(root, "status", "--porcelain", "--untracked-files=no"))


def dvc_experiment() -> str | None:
    """The name of the DVC experiment this process runs in (DVC sets it during `dvc exp run`)."""
    return os.environ.get("DVC_EXP_NAME") or None


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(_flatten(settings), sort_keys=True, default=str)
                          .encode()).hexdigest()[:12]


class TrackingError(UserError):
    """The MLflow store cannot be opened or written; the message names it."""


class Tracker:
    """Context manager around one MLflow run; inert when tracking is unavailable or off.

    `settings` (nested, flattened to `net.width`, ...): the settings of the pipeline. Given, a
    stage that DVC runs nests its run under the pipeline's parent run, logging them there.
    """

    def __init__(self, stage: str, root: str | Path = ".", experiment: str | None = None,
                 run_name: str | None = None, flush_every: float = 5.0,
                 settings: dict | None = None) -> None:
        self.stage, self.root = stage, Path(root)
        self.experiment = experiment or os.environ.get("DATM_EXPERIMENT", DEFAULT_EXPERIMENT)
        self.exp_name = dvc_experiment()
        # runs of different experiments differ by name in the runs table, not only by parent
        base = run_name or stage
        self.run_name = f"{base} [{self.exp_name}]" if self.exp_name else base
        self.settings = settings
        self.client: Any = None
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self._artifacts: Path | None = None  # the run's artifact folder, when datm writes it
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        self._flush_every = flush_every

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def __enter__(self) -> Tracker:
        if os.environ.get("DATM_TRACKING", "on").lower() in ("off", "0", "false", "no"):
            return self
        try:
            import logging

            from mlflow.tracking import MlflowClient
        except ImportError:
            return self
        logging.getLogger("alembic").setLevel(logging.WARNING)
        uri = default_uri(self.root)
        commit = git_commit(self.root)
        # A pipeline execution is DVC running the stage (DVC_STAGE); by hand there is none.
        in_pipeline = self.settings is not None and bool(os.environ.get("DVC_STAGE"))
        try:
            with _store_lock(uri, self.root):
                self.client = MlflowClient(tracking_uri=uri)  # creates the tables of a new store
                exp_id = _experiment_id(self.client, self.experiment, uri)
                if in_pipeline:
                    self.parent_id = self._parent(exp_id, commit)
        except Exception as exc:  # mlflow, sqlalchemy and the OS raise many types here
            raise TrackingError(
                f"cannot use the MLflow store {uri}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''} (set MLFLOW_TRACKING_URI to a "
                "writable store, or DATM_TRACKING=off)") from None
        self._end_dead_runs(exp_id)
        # pid and host: how a later run of this stage tells that this one was killed
        tags = {"stage": self.stage, "git_commit": commit,
                "git_dirty": str(git_dirty(self.root)).lower(),
                "dvc_exp": self.exp_name or "workspace",
                "mlflow.runName": self.run_name, "mlflow.source.name": "datm",
                "pid": str(os.getpid()), "host": socket.gethostname(), **_versions()}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        info = self.client.create_run(exp_id, tags=tags).info
        self.run_id = info.run_id
        self._artifacts = _local_artifacts(uri, info.artifact_uri)
        if self.parent_id:
            self.client.update_run(self.parent_id, status="RUNNING")
            self._log_params(self.parent_id, self.settings or {})
        return self

    def _parent(self, exp_id: str, commit: str) -> str:
        """The id of this pipeline execution's parent run, made if missing (under the lock)."""
        digest = settings_hash(self.settings or {})
        # hashed: an experiment's name may hold characters a filter string would need escaped
        key = hashlib.sha256(f"{self.exp_name or commit}:{digest}".encode()).hexdigest()[:16]
        found = self.client.search_runs([exp_id], f"tags.datm_pipeline = '{key}'",
                                        max_results=1)
        if found:
            return found[0].info.run_id
        name = self.exp_name or f"{commit[:7]} settings {digest[:6]}"
        tags = {"stage": "pipeline", "datm_pipeline": key, "settings_hash": digest,
                "git_commit": commit, "dvc_exp": self.exp_name or "workspace",
                "mlflow.runName": name, "mlflow.source.name": "datm"}
        return self.client.create_run(exp_id, tags=tags).info.run_id

    def _end_dead_runs(self, exp_id: str) -> None:
        """Mark KILLED the runs of this stage and run name that a killed process left RUNNING.

        Only runs whose process is known to be gone: recorded on this host, pid not alive.
        """
        host = socket.gethostname()
        for run in self.client.search_runs([exp_id], "attributes.status = 'RUNNING'"):
            tags = run.data.tags
            if (tags.get("stage") == self.stage and tags.get("mlflow.runName") == self.run_name
                    and tags.get("host") == host and tags.get("pid", "").isdigit()
                    and not _alive(int(tags["pid"]))):
                self.client.set_terminated(run.info.run_id, status="KILLED")

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.active:
            return
        self.flush()
        status = "FINISHED" if exc_type is None else (
            "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        self.client.set_terminated(self.run_id, status=status)
        if self.parent_id:  # the pipeline's state is its last stage's, until the next one
            self.client.set_terminated(self.parent_id, status=status)

    def params(self, values: dict[str, Any], prefix: str = "") -> None:
        if self.active:
            self._log_params(self.run_id, values, prefix)

    def _log_params(self, run_id: str, values: dict[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        flat = _flatten(values, prefix)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[start:start + 100])

    def pipeline_metrics(self, values: dict[str, float | None]) -> None:
        """Results of the whole pipeline (`acc.distilled.ipc10`, ...) on the parent run, where
        the runs table sets them beside the settings; None values are left out."""
        if not (self.active and self.parent_id):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None]
        if metrics:
            self.client.log_batch(self.parent_id, metrics=metrics)

    def tags(self, values: dict[str, str]) -> None:
        if self.active:
            for k, v in values.items():
                self.client.set_tag(self.run_id, k, str(v))

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Queue metrics; they are written in batches (per-call writes to SQLite are slow)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in values.items()]
        if len(self._pending) >= 900 or time.monotonic() - self._last_flush > self._flush_every:
            self.flush()

    def flush(self) -> None:
        if self.active and self._pending:
            for start in range(0, len(self._pending), 1000):
                self.client.log_batch(self.run_id, metrics=self._pending[start:start + 1000])
            self._pending = []
        self._last_flush = time.monotonic()

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not self.active:
            return
        if self._artifacts is None:  # a tracking server, or an experiment with an absolute location
            self.client.log_artifact(self.run_id, str(path), folder)
            return
        target = self._artifacts / folder if folder else self._artifacts
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / Path(path).name)

    def figure(self, fig: Any, name: str) -> None:
        """Log a matplotlib figure as a PNG artifact."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            fig.savefig(path, dpi=120, bbox_inches="tight")
            self.artifact(path, "figures")


def _local_artifacts(uri: str, artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts when the store is SQLite and the location relative."""
    root = artifact_root(uri)
    if root is None or urlparse(artifact_uri).scheme != RELATIVE_SCHEME:
        return None
    return root / urlparse(artifact_uri).path.lstrip("/")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _versions() -> dict[str, str]:
    """What computed the run besides its settings (torch's rounding differs between versions):
    the torch and torchvision versions, as tags."""
    from importlib import metadata

    out = {}
    for name in ("torch", "torchvision"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
