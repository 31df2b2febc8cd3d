"""A small layer over MLflow: one run per stage execution, batched metric writes.

MLflow is optional: without it (a bare GPU machine) or with DATM_TRACKING=off every call is a
no-op and the pipeline runs the same. The default store is a SQLite file at the project root;
MLFLOW_TRACKING_URI overrides it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from . import locks
from .errors import UserError

DEFAULT_EXPERIMENT = "datm"


def default_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def _store_lock(uri: str):
    """Serializes first use of a SQLite store: MLflow creates and migrates its tables on first
    use, and two processes doing that at once can crash each other. Other stores (a tracking
    server) serialize themselves."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(uri[len("sqlite:///"):].split("?")[0])
    return locks.hold(db.parent / f".{db.name}.lock", wait=True)


def _experiment_id(client: Any, name: str) -> str:
    """The experiment's id, made if missing. Another process can make it between our look and
    our create: then the create fails, and a second look finds it."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                return client.create_experiment(name)  # the one retry
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


class TrackingError(UserError):
    """The MLflow store cannot be opened or written; the message names it."""


class Tracker:
    """Context manager around one MLflow run; inert when tracking is unavailable or off."""

    def __init__(self, stage: str, root: str | Path = ".", experiment: str | None = None,
                 run_name: str | None = None, flush_every: float = 5.0) -> None:
        self.stage, self.root = stage, Path(root)
        self.experiment = experiment or os.environ.get("DATM_EXPERIMENT", DEFAULT_EXPERIMENT)
        self.run_name = run_name or stage
        self.client: Any = None
        self.run_id: str | None = None
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
        try:
            with _store_lock(uri):
                self.client = MlflowClient(tracking_uri=uri)  # creates the tables of a new store
                exp_id = _experiment_id(self.client, self.experiment)
        except Exception as exc:  # mlflow, sqlalchemy and the OS raise many types here
            raise TrackingError(
                f"cannot use the MLflow store {uri}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''} (set MLFLOW_TRACKING_URI to a "
                "writable store, or DATM_TRACKING=off)") from None
        self._end_dead_runs(exp_id)
        # pid and host: how a later run of this stage tells that this one was killed
        tags = {"stage": self.stage, "git_commit": git_commit(self.root),
                "git_dirty": str(git_dirty(self.root)).lower(),
                "mlflow.runName": self.run_name, "mlflow.source.name": "datm",
                "pid": str(os.getpid()), "host": socket.gethostname()}
        self.run_id = self.client.create_run(exp_id, tags=tags).info.run_id
        return self

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
            "KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        self.client.set_terminated(self.run_id, status=status)

    def params(self, values: dict[str, Any], prefix: str = "") -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        flat = _flatten(values, prefix)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

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
        if self.active:
            self.client.log_artifact(self.run_id, str(path), folder)

    def figure(self, fig: Any, name: str) -> None:
        """Log a matplotlib figure as a PNG artifact."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            fig.savefig(path, dpi=120, bbox_inches="tight")
            self.artifact(path, "figures")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
