"""Safetensors artifacts: atomic writes, JSON metadata, and clear errors on damage.

Every artifact of the pipeline is one safetensors file whose header carries a `kind` tag and a
JSON `meta` object, so a reader can check what it got before touching the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import interrupts
from .errors import UserError

HEADER = "datm"  # the one safetensors metadata key: {"kind": ..., "meta": {...}} as JSON


class ArtifactError(UserError):
    """A missing, corrupt or mismatched artifact; the message is meant for a user."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it over `path` only if the block succeeds.

    A killed process therefore never leaves a half-written artifact under the final name, and
    the temp file it leaves is removed by the next write of `path` (`remove_dead_temps`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:  # a read-only or full disk: the error names what could not be written
        name_in(exc, path)
        raise
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are ordinary shared files
        os.replace(tmp, path)
    except OSError as exc:
        name_in(exc, path, tmp)
        raise
    finally:
        with suppress(OSError):  # gone already, or left to the next write (remove_dead_temps)
            os.unlink(tmp)


def name_in(exc: OSError, path: str | os.PathLike, temp: str | None = None) -> None:
    """Make `exc` name `path` where it names no file (a write to an open file on a full disk)
    or only `temp`, the writer's temp file: a person reads which artifact was not written."""
    if exc.filename is None or exc.filename == temp:
        exc.filename, exc.filename2 = str(path), None


def _io_error(exc: Exception) -> OSError | None:
    """The OSError behind a safetensors write that failed: it reports the OS's refusal (a full
    disk) as a SafetensorError ending "... (os error 28)"."""
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def _host_tag() -> str:
    """8 hex digits naming this host: a pid in a temp name only means something on its host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
    """`<pid>-<host>` of this process: in a temp's name, it tells a later process whether the
    temp's writer is dead (`writer_is_dead`)."""
    return f"{os.getpid()}-{_host_tag()}"


def _temp_prefix(path: Path) -> str:
    """`.<name>.<pid>-<host>-`, to which mkstemp adds its random part and `.tmp`."""
    return f".{path.name}.{owner_tag()}-"


def _temps(target: Path) -> Iterator[tuple[Path, str]]:
    """The temp files and folders beside `target` named as its writers name them
    (`.<name>.<middle>.tmp`), each with its middle part."""
    if not target.parent.is_dir():
        return
    head, tail = f".{target.name}.", ".tmp"
    for temp in sorted(target.parent.iterdir()):  # a list: callers remove some
        name = temp.name
        middle = name[len(head):-len(tail)] if name.startswith(head) and name.endswith(tail) else ""
        if middle and "." not in middle:  # the random part never holds a dot: `x.1` is not `x`'s
            yield temp, middle


def writer_is_dead(middle: str) -> bool:
    """Whether the `<pid>-<host>-<random>` middle of a temp name names a process of this host
    that no longer runs. Other names (another host's, or those of datm before pids were in
    them) are never taken for dead: their writer may still be writing."""
    pid, _, rest = middle.partition("-")
    host, _, _ = rest.partition("-")
    if not pid.isdigit() or host != _host_tag():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process, or no such pid at all
        return False
    return False


def _remove(temp: Path) -> None:
    if temp.is_dir() and not temp.is_symlink():
        shutil.rmtree(temp, ignore_errors=True)
    else:
        temp.unlink(missing_ok=True)


def remove_dead_temps(target: str | os.PathLike) -> None:
    """Remove the temp files that writers of `target` killed on this host left beside it; a
    live writer's temp (another process writing `target` right now) is kept. Safe without a
    lock: the writer's pid is alive from its temp's creation to its rename."""
    for temp, middle in _temps(Path(target)):
        if writer_is_dead(middle):
            _remove(temp)


def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str,
         meta: dict[str, Any] | None = None) -> Path:
    """Write tensors plus JSON metadata atomically."""
    # One header key: safetensors writes its metadata map in no fixed order, so two keys would
    # make the same artifact come out as different bytes (and DVC would see a change).
    header = {HEADER: json.dumps({"kind": kind, "meta": meta or {}}, sort_keys=True)}
    # safetensors refuses non-contiguous or shared storage; clone keeps callers' views untouched.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp, interrupts.deferred():
        try:
            save_file(flat, str(tmp), metadata=header)
        except Exception as exc:
            refused = _io_error(exc)
            if refused is None:
                raise
            raise refused from exc  # atomic_path names `path` in it
    return Path(path)


def _open(path: Path, kind: str | None):
    if not path.exists():
        raise ArtifactError(f"missing artifact: {path}")
    try:
        # a Ctrl-C inside safetensors' reader would surface as another error: "corrupt"
        with interrupts.deferred():
            handle = safe_open(str(path), framework="pt", device="cpu")
            header = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise ArtifactError(f"corrupt artifact {path}: {exc}") from None
    try:
        found = json.loads(header[HEADER])
        meta = found["meta"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ArtifactError(f"{path} is not a datm artifact of this version (no readable "
                            f"'{HEADER}' header): remake it with its stage") from None
    if kind is not None and found.get("kind") != kind:
        raise ArtifactError(f"{path} is a '{found.get('kind')}' artifact, expected '{kind}'")
    return handle, meta


def content_digest(path: str | os.PathLike, meta_keys: tuple[str, ...] = ()) -> str:
    """sha256 of what an artifact holds: every tensor (name, dtype, shape, values) and the
    chosen metadata keys. This is the identity of an input that other artifacts are made from,
    so a rewrite with equal content (or other bookkeeping metadata) changes nothing downstream.
    """
    tensors, meta = load(path)
    return tensor_digest(tensors, json.dumps({k: meta.get(k) for k in meta_keys}, sort_keys=True))


def tensor_digest(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """sha256 of tensors by name, dtype, shape and values (and of `extra`)."""
    digest = hashlib.sha256(extra.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def read_meta(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Metadata only; the tensors are not read."""
    _, meta = _open(Path(path), kind)
    return meta


def load(path: str | os.PathLike, kind: str | None = None,
         keys: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (tensors, metadata); `keys` restricts which tensors are read."""
    path = Path(path)
    handle, meta = _open(path, kind)
    try:
        names = keys if keys is not None else list(handle.keys())
        # clone: get_tensor may map the file, and a later rewrite of it must not change our copy
        with interrupts.deferred():  # see _open
            tensors = {k: handle.get_tensor(k).clone() for k in names}
    except Exception as exc:
        raise ArtifactError(f"corrupt artifact {path}: {exc}") from None
    return tensors, meta


def load_rows(path: str | os.PathLike, key: str, rows: list[int],
              kind: str | None = None) -> torch.Tensor:
    """Read selected rows of one 2-D tensor without loading the others (memory-mapped slices)."""
    path = Path(path)
    handle, _ = _open(path, kind)
    try:
        with interrupts.deferred():  # see _open
            sl = handle.get_slice(key)
            return torch.stack([sl[r:r + 1][0] for r in rows])
    except Exception as exc:
        raise ArtifactError(f"corrupt artifact {path}: {exc}") from None


def remove_stale_temps(target: str | os.PathLike) -> None:
    """Remove every temp that writers of `target` left beside it: `atomic_path`'s temp files,
    and temp folders named the same way (`.<name>.<random>.tmp`, as `export` makes them).

    Call it only while no other process can be writing `target` (hold its lock): a live
    writer's temp looks just like a dead one's here (`remove_dead_temps` tells them apart).
    """
    for temp, _ in _temps(Path(target)):
        _remove(temp)
