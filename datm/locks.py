"""One writer at a time: an exclusive lock between processes that names its holder.

`fcntl.flock` is tied to the open file, so the kernel drops the lock when its holder ends,
however it ends (a kill included): there is never a stale lock to clear by hand. The lock
file records who holds it, for the message a second process gets, and goes when released.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import UserError


class LockHeld(UserError):
    """Another process holds the lock; the message says which one and what to do."""


@contextmanager
def hold(path: str | os.PathLike, busy: str = "", wait: bool = False) -> Iterator[None]:
    """Hold the lock file `path` for the block. If another process holds it, wait for it
    (`wait`) or raise LockHeld at once, `busy` saying what the holder does ("IPC 10 is being
    distilled").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, busy, wait)
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError as exc:  # a full disk: its error names no file, the line should
            exc.filename = exc.filename or str(path)
            raise
        yield
    finally:
        # Unlink while still holding it: a process that opened this file meanwhile sees, once
        # it gets the lock, that the path no longer names it, and starts over (_acquire). One
        # that cannot be unlinked (the disk went read-only) is harmless: the kernel's lock went.
        with suppress(OSError):
            path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path, busy: str, wait: bool) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockHeld(f"{busy} by {holder}; wait for it or stop it") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass  # released and removed between our open and our lock
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {record['pid']} on host {record['host']} since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it is starting: try again in a moment)"
