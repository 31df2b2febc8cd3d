"""Ctrl-C where Python cannot take it cleanly: inside native code that calls back into Python.

Python raises KeyboardInterrupt at the next bytecode, wherever that is. Inside safetensors'
reader (Rust calling torch) it comes out as another error ("could not determine the shape of
object type 'torch.storage.UntypedStorage'"), which a reader would report as a damaged file;
inside torch's C++ start-up it aborts the process. `deferred` holds a Ctrl-C over such a block
and raises it when the block ends; `hold` / `release` do the same from a stage process's first
import to the start of its work (stages/__init__.py, stages.common.guarded). `fatal` is for a
native wait that may never end (peers that are gone): a Ctrl-C ends the process at once.

Signal handlers belong to the process, and only its main thread runs them: elsewhere, or when
SIGINT is not Python's default handler (ignored, as in a background job, or someone's own),
`deferred` and `fatal` change nothing. A blocked SIGINT that is ignored stays ignored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_held: list = []  # while `hold` is in force: [(its handler, the signals it caught)]
_MASKS = hasattr(signal, "pthread_sigmask")  # not on Windows, where none of this applies


def _can_hold() -> bool:
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block with Ctrl-C held; one that came during it is raised (KeyboardInterrupt)
    when it ends, instead of whatever error the block ended with."""
    if not _can_hold():
        yield
        return
    caught: list[int] = []

    def catch(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    signal.signal(signal.SIGINT, catch)
    try:
        yield
    except Exception:
        if caught:  # the block's error came from the interrupt (or is moot after it)
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


@contextmanager
def fatal() -> Iterator[None]:
    """Run the block with Ctrl-C ending the process at once (the signal's default action), for
    a native call that waits without returning to Python, which could not raise in it. The
    block must leave nothing half-done that a process killed in it would leave behind."""
    if not _can_hold():
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def hold() -> None:
    """Hold Ctrl-C until `release`, for a process's imports, which run in no `with` block.

    SIGINT is blocked in this thread, so children started meanwhile inherit the block (see
    `blocked`), and caught, not raised, should another thread of the process take it.
    """
    if _held or not _can_hold():
        return
    caught: list[int] = []

    def catch(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    signal.signal(signal.SIGINT, catch)
    if _MASKS:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    _held.append((catch, caught))


def release() -> None:
    """End `hold` (if in force); raise KeyboardInterrupt if a Ctrl-C came meanwhile."""
    if not _held:
        return
    catch, caught = _held.pop()
    if _MASKS:  # a pending SIGINT reaches `catch` within this call (Python checks at once)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if signal.getsignal(signal.SIGINT) is catch:  # not replaced meanwhile by someone's own
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


@contextmanager
def blocked() -> Iterator[None]:
    """SIGINT blocked in this thread for the block, then let through to whatever handler is in
    place by then. A process started in the block inherits the block: it holds a Ctrl-C from
    its first instruction, before Python could take it, until it unblocks SIGINT itself (a
    stage process: stages/__init__.py holds, stages.common.guarded releases)."""
    if not _MASKS:
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
