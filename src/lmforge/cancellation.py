"""Signals turned into exceptions: SIGINT and SIGTERM become a KeyboardInterrupt that names them.

* :func:`cancel_handlers` (for the processes of a stage tree and for `lmforge run`) turns SIGINT
  and SIGTERM into :class:`Cancelled` (a KeyboardInterrupt, which Lightning and DVC treat as
  Ctrl-C) and records that a cancellation was requested (:func:`cancel_signal`), so tracking code
  can end its runs as KILLED whatever exception unwinds;
* a cancellation that lands in the database layer (SQLAlchemy, sqlite3, MLflow's store) is held
  back for a moment and delivered once that code is left.

Standard library only. POSIX only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any


class Cancelled(KeyboardInterrupt):
    """What :func:`cancel_handlers` raises: a KeyboardInterrupt (Lightning and DVC treat it as Ctrl-C)
    that names the signal."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"cancelled by {signal.Signals(signum).name}")

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return (type(self), (self.signum,))


_cancel_signal: int | None = None
_pending_since: float | None = None  # a cancellation held back while in the database layer

# Code a KeyboardInterrupt must not land in: raised mid-transaction, it leaves a SQLAlchemy connection
# holding SQLite's write lock, abandoned, and the run's KILLED status then waits on that lock until
# SIGKILL (seen in testing: about one cancelled stage in ten, in MLflow's logging or end_run).
DEFER_IN = tuple(f"{os.sep}{name}{os.sep}" for name in ("sqlalchemy", "sqlite3", f"mlflow{os.sep}store"))
DEFER_MAX_S = 2.0  # a cancellation is held back at most this long
_RECHECK_S = 0.02


def cancel_signal() -> int | None:
    """The first signal :func:`cancel_handlers` caught (None: no cancellation requested)."""
    return _cancel_signal


def request_cancel(signum: int = signal.SIGINT) -> None:
    """Record that this process is being cancelled (what the installed handlers do first)."""
    global _cancel_signal
    if _cancel_signal is None:
        _cancel_signal = int(signum)


def _in(frame: Any, places: Sequence[str]) -> bool:
    while frame is not None:
        if any(place in frame.f_code.co_filename for place in places):
            return True
        frame = frame.f_back
    return False


_armed = threading.Event()  # a redelivery of a held-back (or swallowed) cancellation is scheduled
_timer: threading.Timer | None = None  # the scheduled redelivery, cancelled and joined on leaving


def _redeliver(signum: int) -> None:
    """Deliver `signum` to the main thread again (a real signal: it also cuts a blocking call short)."""
    _armed.clear()
    if _pending_since is None or not callable(signal.getsignal(signum)):
        return  # raised meanwhile, or the handlers are gone: a default SIGTERM would kill us
    with contextlib.suppress(Exception):  # the interpreter may be shutting down
        signal.pthread_kill(threading.main_thread().ident, signum)


def _hold_back(signum: int) -> None:
    global _pending_since, _timer
    if _pending_since is None:
        _pending_since = time.monotonic()
    if not _armed.is_set():
        _armed.set()
        _timer = threading.Timer(_RECHECK_S, _redeliver, (signum,))
        _timer.daemon = True
        _timer.start()


def _cancel_handler(defer_in: Sequence[str]) -> Any:
    def handler(signum: int, frame: Any) -> None:
        global _pending_since
        if _pending_since is None and _cancel_signal is not None and signum == signal.SIGINT:
            return  # a repeated Ctrl-C must not break the graceful shutdown the first one started
        if _armed.is_set():
            return  # held back already: the scheduled redelivery decides
        request_cancel(signum)
        now = time.monotonic()
        if defer_in and _in(frame, defer_in) and now - (_pending_since or now) < DEFER_MAX_S:
            _hold_back(signum)
            return
        _pending_since = None
        raise Cancelled(signum)

    return handler


def _unraisable_hook(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, Cancelled) and _cancel_signal is not None:
            # It landed in a finalizer or weakref callback (one of importlib's, while the stage was
            # still importing), where Python prints and drops it: deliver the signal again.
            _hold_back(exc.signum)
        previous(unraisable)

    return hook


@contextlib.contextmanager
def cancel_handlers(
    signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
    *,
    defer_in: Sequence[str] = DEFER_IN,
    deaf_after_cancel: bool = False,
) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Cancelled` (a KeyboardInterrupt), the first one
    is recorded.

    Code that unwinds (tracking's run contexts) asks :func:`cancel_signal` to tell a cancellation
    from a failure, whatever exception reaches it: Lightning, for one, catches the KeyboardInterrupt
    and leaves with `sys.exit(1)`. Once cancelling, a repeated SIGINT is ignored (as Lightning does,
    so the graceful shutdown runs to its end), while a SIGTERM raises again: it is the escalation
    (:func:`interrupt` sends it after the grace period) and cuts a slow shutdown short. Lightning
    composes its own SIGTERM handler with this one during `fit`. The conventional exit status of a
    cancelled command is `128 + cancel_signal()` (130 for SIGINT, 143 for SIGTERM).

    Two places where a KeyboardInterrupt must not land are handled:

    * code from `defer_in` (path fragments; default: SQLAlchemy, sqlite3 and MLflow's store, i.e. a
      database transaction): the signal is held back until the main thread has left it, rechecked
      every 20 ms, for at most 2 s. Raised mid-transaction, the exception would leave SQLite locked
      by an abandoned connection, and the KILLED status written next would wait on that lock until
      the process is killed.
    * a finalizer or weakref callback, where Python prints the exception and drops it (it happens
      while modules are still being imported): the signal is delivered again 20 ms later.

    Entering resets the record; leaving cancels a scheduled redelivery (waiting for one in flight, so
    it lands in these handlers) and restores the previous handlers; the record stays, for the caller's
    exit status. With `deaf_after_cancel`, a cancelled block leaves SIGINT ignored instead: for a
    command about to exit with 130, where a late Ctrl-C (or the group's signal arriving twice) would
    otherwise hit Python's default handler during shutdown and turn the exit into death by SIGINT.
    Outside the main thread (where Python cannot set handlers) it does nothing.
    """
    global _cancel_signal, _pending_since
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _cancel_signal, _pending_since = None, None
    _armed.clear()
    handler = _cancel_handler(tuple(defer_in))
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook(previous_hook)
    try:
        yield
    finally:
        _pending_since = None  # a scheduled redelivery must not fire into the restored handlers
        if (timer := _timer) is not None:
            timer.cancel()
            timer.join()  # one already past its check delivers into our handlers, which ignore it
        sys.unraisablehook = previous_hook
        for sig, old in previous.items():
            if deaf_after_cancel and sig == signal.SIGINT and _cancel_signal is not None:
                old = signal.SIG_IGN
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
