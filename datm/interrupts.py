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

SIGTERM (`kill`, a scheduler, DVC's stage ending) ends a process at once by default, without a
word. `terminate_gently` makes it a `Terminated`, a KeyboardInterrupt: the stage stops as on
Ctrl-C (finished work kept) and says so; `deferred` holds it as it holds a Ctrl-C. SIGKILL
cannot be caught: a process killed so says nothing (whoever started it may).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_held: list = []  # while `hold` is in force: [(its handler, the signals it caught)]
_MASKS = hasattr(signal, "pthread_sigmask")  # not on Windows, where none of this applies


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where a Ctrl-C would be (`terminate_gently`): whatever stops cleanly on
    Ctrl-C stops so on it; the stage's last line tells the two apart."""


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise Terminated


def terminate_gently() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread, where it had its default
    action (ending the process at once, silently); a handler someone installed stays. Not
    for a rank of torchrun: it stops its ranks with SIGTERM and waits only 30 s, and a rank
    waiting in gloo's C++ could not raise there (stages.common calls this outside ranks)."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)


def _can_hold() -> bool:
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


def _interrupt(caught: list[int]) -> KeyboardInterrupt:
    """What the first signal `deferred` held raises once its block ends."""
    return Terminated() if caught[0] == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block with Ctrl-C (and a SIGTERM `terminate_gently` takes) held; one that came
    during it is raised (KeyboardInterrupt, Terminated) when it ends, instead of whatever
    error the block ended with."""
    held = [signal.SIGINT] if _can_hold() else []
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is _terminate:
        held.append(signal.SIGTERM)
    if not held:
        yield
        return
    caught: list[int] = []

    def catch(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {sig: signal.signal(sig, catch) for sig in held}
    try:
        yield
    except Exception:
        if caught:  # the block's error came from the interrupt (or is moot after it)
            raise _interrupt(caught) from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise _interrupt(caught)


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


def release(*, children_held: bool = False) -> None:
    """End `hold` (if in force); raise KeyboardInterrupt if a Ctrl-C came meanwhile.

    children_held: SIGINT stays blocked in this thread, so that the processes it starts from
    now on hold a Ctrl-C from their first instruction as this one did (a rank's Python start-up
    runs imports before stages/__init__.py can hold one, and a KeyboardInterrupt there is a
    traceback); a thread of its own takes SIGINT for this process instead, and Python runs the
    handler in the main thread as ever.
    """
    if not _held:
        return
    catch, caught = _held.pop()
    if _MASKS and children_held:
        taking = threading.Event()

        def take() -> None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            taking.set()
            threading.Event().wait()

        threading.Thread(target=take, name="datm-sigint", daemon=True).start()
        taking.wait()
    elif _MASKS:  # a pending SIGINT reaches `catch` within this call (Python checks at once)
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
