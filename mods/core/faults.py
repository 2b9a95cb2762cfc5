"""Which failures are worth retrying, and which are the user's to fix.

A retry only helps when the next attempt can pass: a lost worker, memory that was short
this time, an I/O or network hiccup. A bad row, a wrong path or an impossible parameter
fails the same way every time, so it fails at once, in one line.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from typing import Any, Iterator

# errno values of I/O that can pass on a second try (network filesystems, busy devices).
_TRANSIENT_ERRNO = {errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.ESTALE, errno.ECONNRESET,
                    errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBUSY}


def is_out_of_memory(error: BaseException) -> bool:
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return isinstance(error, (RuntimeError, MemoryError)) and (
        isinstance(error, MemoryError) or "out of memory" in str(error).lower()
    )


# Errors of the orchestration's HTTP client (a server restarting), named here so the core
# need not import it: httpx's transport errors, and Prefect's failure to get a concurrency
# slot from a server that is away.
_TRANSIENT_NAMES = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "ReadError",
                    "WriteError", "RemoteProtocolError", "TransportError", "NetworkError",
                    "ConcurrencySlotAcquisitionError"}


def _one_is_transient(error: BaseException) -> bool:
    if is_out_of_memory(error):
        return True
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNO:
        return True
    return any(cls.__name__ in _TRANSIENT_NAMES for cls in type(error).__mro__)


def is_transient(error: BaseException) -> bool:
    """True for failures a retry can fix (out of memory, lost connection, I/O timeout), here
    or anywhere in the chain of causes."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if _one_is_transient(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def release_accelerator_memory() -> None:
    """Give cached GPU memory back after an out-of-memory error, before trying smaller."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def first_line(error: BaseException) -> str:
    """The error's message, first line only (what a command prints), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# Set when the user pressed Ctrl-C. Python drops a KeyboardInterrupt that lands while a
# finalizer runs (a __del__ or weakref callback: "Exception ignored in ..."), and the run
# would go on to the end; so the engine and the executors also stop at the next block,
# shard or stage once this is set.
interrupted = threading.Event()


def stop_if_interrupted() -> None:
    if interrupted.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def catching_interrupts() -> Iterator[None]:
    """While the block runs, Ctrl-C sets ``interrupted`` as well as raising KeyboardInterrupt
    (in the main thread, where SIGINT has Python's default handler; an ignored SIGINT stays
    ignored). The handler and the flag are put back afterwards."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def on_interrupt(signum: int, frame: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    def quiet_dropped_interrupt(unraisable: Any) -> None:
        # A Ctrl-C that lands in a finalizer or an atexit callback cannot propagate, and
        # Python prints its traceback; the flag already stops the run, so say nothing.
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        previous_hook(unraisable)

    signal.signal(signal.SIGINT, on_interrupt)
    sys.unraisablehook = quiet_dropped_interrupt
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # After an interrupt the process is on its way out (exit 130): finalizers still run
        # then, so the quiet hook stays; otherwise the previous one comes back.
        if not interrupted.is_set():
            sys.unraisablehook = previous_hook
        interrupted.clear()


class PermanentStageError(RuntimeError):
    """A deterministic failure (bad data, bad parameter): resubmitting would fail again."""


class MissingOutputError(PermanentStageError):
    """A stage ran without writing a file it declares in ``outputs`` (a bug in the stage):
    nothing is marked complete, and a retry would do the same."""
