"""Child process trees that stop the way Ctrl-C stops them: gracefully first, for sure in the end.

An orchestrator (`lmforge run`, the Prefect flow) runs `dvc repro`, which runs `lmforge <stage>`,
which may run workers. To cancel such a tree cleanly:

    proc = process_tree.start(["dvc", "repro"], cwd=root, env=env)
    with process_tree.stopped_on_interrupt(proc):   # any BaseException in the block stops the tree
        code = proc.wait()

* :func:`start` puts the command in a new session, hence its own process group (group id = its
  pid). Signals aimed at the orchestrator's group (a terminal's Ctrl-C, Prefect's `killpg(SIGTERM)`
  of a flow-run process) do not reach the tree: the orchestrator decides when and how it stops.
* :func:`interrupt` stops the whole group: SIGINT first (DVC releases its locks, Lightning shuts
  down, `lmforge <stage>` ends its MLflow run as KILLED), then SIGTERM, then SIGKILL, each step only
  while some process of the group is still alive. It waits for the *group* to be gone, not only the
  leader: the stage under DVC may outlive `dvc repro` by a moment.
* :func:`stopped_on_interrupt` guarantees :func:`interrupt` runs when the block is left by any
  exception (KeyboardInterrupt, Prefect's TerminationSignal, SystemExit, an error), then re-raises.
* :func:`cancel_handlers` (for the processes of the tree themselves and for `lmforge run`) turns
  SIGINT and SIGTERM into KeyboardInterrupt and records that a cancellation was requested
  (:func:`cancel_signal`), so tracking code can end its runs as KILLED whatever exception unwinds.
* :func:`clear_stale_rwlock` removes the `.dvc/tmp/rwlock` entries of DVC processes that are dead
  (a `dvc repro` killed with SIGTERM/SIGKILL leaves them behind); call it before a run starts.

A process that leaves the group on purpose (`setsid`, `start_new_session=True`) is out of reach,
as is the tree once the orchestrator itself is SIGKILLed. Standard library only (and
`lmforge.atomic`, which is too). POSIX only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_text

GRACE_S = 10.0  # after SIGINT: DVC and Lightning need a second or two to close runs and locks
TERM_GRACE_S = 5.0  # after SIGTERM
KILL_WAIT_S = 10.0  # after SIGKILL (only a process stuck in the kernel takes longer)
_POLL_S = 0.05

_live: set[subprocess.Popen] = set()  # started here and not yet seen stopped (for interrupt_all)
_live_lock = threading.Lock()


# ---------------------------------------------------------------------------------------- starting


def start(
    cmd: Sequence[str | os.PathLike[str]] | str,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    **popen_kwargs: Any,
) -> subprocess.Popen:
    """`subprocess.Popen(cmd, cwd=cwd, env=env, **popen_kwargs)` in a new session and process group.

    The group id is the child's pid. Everything the child starts stays in the group unless it
    creates its own session. `start_new_session`, `process_group` and `preexec_fn` are not accepted
    (they would undo or race the new session). Pipes (`stdout=PIPE`) must be drained by the caller
    until the child exits, also while :func:`interrupt` waits, or a chatty child can block on a full
    pipe instead of shutting down.
    """
    for key in ("start_new_session", "process_group", "preexec_fn"):
        if key in popen_kwargs:
            raise TypeError(f"process_tree.start sets the session itself; {key}= is not accepted")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, **popen_kwargs)
    with _live_lock:
        _live.add(proc)
    return proc


# ---------------------------------------------------------------------------------------- stopping


def _stat(pid: int | str) -> list[str] | None:
    """`/proc/<pid>/stat` after the command name: [state, ppid, pgrp, ...]; None when unreadable
    (no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def _exited(fields: list[str]) -> bool:
    """A zombie (exited, waiting to be reaped) or dead entry."""
    return fields[0] in ("Z", "X")


def _is_zombie(pid: int) -> bool:
    """True when `pid` has exited and only waits to be reaped (Linux /proc; False elsewhere)."""
    fields = _stat(pid)
    return fields is not None and _exited(fields)


def _group_has_live_member(pgid: int) -> bool:
    """A non-zombie process in group `pgid` (Linux /proc scan; without /proc, assume there is)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for name in entries:
        fields = _stat(name) if name.isdigit() else None  # None: not a process, or exited meanwhile
        if fields is not None and len(fields) > 2 and int(fields[2]) == pgid and not _exited(fields):
            return True
    return False


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is still running (zombies, which have exited, do not count:
    without an init that reaps orphans they would otherwise keep the group "alive" forever)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _group_has_live_member(pgid)


def groups_below(pid: int) -> set[int]:
    """The process groups of `pid`'s descendants (Linux /proc; empty elsewhere). A supervisor that
    starts its children in sessions of their own (BentoML's arbiter, circus, does) holds them out
    of its own group: signalling its group reaches them only through it."""
    try:
        entries = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return set()
    parents: dict[int, list[tuple[int, int]]] = {}
    for child in entries:
        fields = _stat(child)
        if fields is not None and len(fields) > 2 and not _exited(fields):
            parents.setdefault(int(fields[1]), []).append((child, int(fields[2])))
    groups, frontier = set(), [pid]
    while frontier:
        for child, pgid in parents.get(frontier.pop(), []):
            groups.add(pgid)
            frontier.append(child)
    return groups


def _leads_group(proc: subprocess.Popen) -> bool:
    """Whether `proc` was started as a group leader (by :func:`start`); decided while it is alive."""
    cached = getattr(proc, "_lmforge_leader", None)
    if cached is None:
        try:
            cached = os.getpgid(proc.pid) == proc.pid
        except ProcessLookupError:  # already gone (or a zombie we have not reaped): assume start()'s
            cached = True
        proc._lmforge_leader = cached  # type: ignore[attr-defined]
    return cached


def _alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader as soon as it exits
    if _leads_group(proc):
        return group_alive(proc.pid)
    return proc.returncode is None


def _send(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if _leads_group(proc):
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)


def _wait_gone(procs: list[subprocess.Popen], seconds: float) -> None:
    """Until no group of `procs` is alive, or `seconds` passed."""
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def _stop(procs: list[subprocess.Popen], grace_s: float, term_grace_s: float) -> None:
    """SIGINT, SIGTERM, SIGKILL to the groups of `procs` still alive, each followed by its wait."""
    for proc in procs:
        _leads_group(proc)  # decide now, while the leader may still be alive
    try:
        for sig, wait_s in (
            (signal.SIGINT, grace_s),
            (signal.SIGTERM, term_grace_s),
            (signal.SIGKILL, KILL_WAIT_S),
        ):
            alive = [p for p in procs if _alive(p)]
            if not alive:
                return
            for proc in alive:
                _send(proc, sig)
            _wait_gone(alive, wait_s)
        if any(_alive(p) for p in procs):
            raise subprocess.TimeoutExpired(procs[0].args, grace_s + term_grace_s + KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        raise
    except BaseException:  # interrupted while waiting: no more grace
        for proc in procs:
            _send(proc, signal.SIGKILL)
        _wait_gone(procs, KILL_WAIT_S)
        raise
    finally:
        for proc in procs:
            _forget(proc)


def interrupt(proc: subprocess.Popen, grace_s: float = GRACE_S, term_grace_s: float = TERM_GRACE_S) -> int:
    """Stop `proc`'s whole process group the way Ctrl-C would, escalating; returns the leader's exit code.

    SIGINT to the group, then up to `grace_s` seconds for every process of the group to be gone;
    then SIGTERM and up to `term_grace_s`; then SIGKILL and up to 10 s. A step is skipped once the
    group is gone, so each signal is sent at most once. The return value is `proc.returncode`
    (negative: killed by that signal, as `Popen` reports it). For a process not started by
    :func:`start` (not a group leader), only that process is signalled.

    Idempotent and safe at any time: a process that already exited (and whose group is gone) is
    just reaped, and nothing is sent. If this call is itself interrupted while waiting (a signal
    handler raising, e.g. a SIGTERM after the Ctrl-C), it skips the remaining grace, SIGKILLs the
    group, waits for it, and re-raises. Raises `subprocess.TimeoutExpired` only if the group
    survives SIGKILL.
    """
    _stop([proc], grace_s, term_grace_s)
    return proc.wait()


def _forget(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        with _live_lock:
            _live.discard(proc)


@contextlib.contextmanager
def stopped_on_interrupt(
    proc: subprocess.Popen, *, grace_s: float = GRACE_S, term_grace_s: float = TERM_GRACE_S
) -> Iterator[subprocess.Popen]:
    """Nothing of `proc`'s group outlives the block.

    If the block raises anything (KeyboardInterrupt, Prefect's TerminationSignal, SystemExit, an
    error), the group is stopped with :func:`interrupt` and the exception re-raised. When the block
    ends normally (usually after `proc.wait()`), whatever is still running in the group (a
    straggler the leader left behind, or the leader itself if the block did not wait) is stopped
    the same way.
    """
    try:
        yield proc
    except BaseException:
        interrupt(proc, grace_s, term_grace_s)
        raise
    interrupt(proc, grace_s, term_grace_s)


def run(
    cmd: Sequence[str | os.PathLike[str]] | str,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    grace_s: float = GRACE_S,
    term_grace_s: float = TERM_GRACE_S,
    **popen_kwargs: Any,
) -> int:
    """`subprocess.call` with :func:`start` and :func:`stopped_on_interrupt`: returns the exit code."""
    proc = start(cmd, cwd=cwd, env=env, **popen_kwargs)
    with stopped_on_interrupt(proc, grace_s=grace_s, term_grace_s=term_grace_s):
        return proc.wait()


def running() -> list[subprocess.Popen]:
    """Processes started with :func:`start` whose group has not been seen stopped yet."""
    with _live_lock:
        procs = list(_live)
    alive = [p for p in procs if _alive(p)]
    with _live_lock:
        _live.difference_update(p for p in procs if p not in alive and p.returncode is not None)
    return alive


def interrupt_all(grace_s: float = GRACE_S, term_grace_s: float = TERM_GRACE_S) -> dict[int, int]:
    """:func:`interrupt` every process from :func:`running`, all at once; returns {pid: exit code}.

    For a main-thread signal handler when the waiting happens in other threads (where no exception
    arrives to trigger :func:`stopped_on_interrupt`).
    """
    procs = running()
    _stop(procs, grace_s, term_grace_s)
    return {proc.pid: proc.wait() for proc in procs}


# ---------------------------------------------------------------------------------- cancel requests


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


# ------------------------------------------------------------------------------- DVC's rwlock file

# `core.hardlink_lock = true` guards the rwlock with flufl.lock instead of an flock: not ours to take.
_HARDLINK_LOCK = re.compile(r"^\s*hardlink_lock\s*=\s*(true|1|yes)\s*$", re.IGNORECASE | re.MULTILINE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def clear_stale_rwlock(repo_root: str | os.PathLike[str], timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Remove the entries of dead processes from DVC's `<repo>/.dvc/tmp/rwlock`; returns what was removed.

    `dvc repro` records in that file, per path, which process reads or writes it, and removes its
    entries when it ends, also on Ctrl-C. A `dvc repro` killed with SIGTERM or SIGKILL leaves its
    entries behind. DVC itself drops an entry whose pid is dead, but only for the paths a later run
    locks, and an entry whose pid was reused by an unrelated live process blocks every later run
    ("'<path>' is busy, it is being blocked by: (PID n)") until someone deletes the file by hand.
    Call this before a run starts: only entries whose process no longer exists (or is a zombie)
    are removed; live DVC processes keep theirs.

    The file is edited under DVC's own guard (an flock on `rwlock.lock`, as DVC's default zc.lockfile
    takes it), waiting up to `timeout_s` for it; with `core.hardlink_lock` set, or if the guard stays
    taken, nothing is touched. A file that is not valid JSON (a writer killed mid-write: DVC would
    refuse to run) is moved aside to `rwlock.corrupt` and reported as one entry of mode "corrupt".
    Each removed entry: {"mode": "read"|"write"|"corrupt", "path", "pid", "cmd"}.
    """
    root = Path(repo_root)
    tmp = root / ".dvc" / "tmp"
    path = tmp / "rwlock"
    if not path.is_file():
        return []
    for config in (root / ".dvc" / "config", root / ".dvc" / "config.local"):
        with contextlib.suppress(OSError):
            if _HARDLINK_LOCK.search(config.read_text(errors="replace")):
                return []
    with open(tmp / "rwlock.lock", "a+") as guard:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(guard.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return []
                time.sleep(_POLL_S)
        try:
            return _clear_stale_entries(path)
        finally:
            fcntl.flock(guard.fileno(), fcntl.LOCK_UN)


def _clear_stale_entries(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        lock = json.loads(text)
        if not isinstance(lock, dict):
            raise ValueError("not an object")
    except ValueError:
        os.replace(path, path.with_name("rwlock.corrupt"))
        return [{"mode": "corrupt", "path": str(path), "pid": None, "cmd": text[:200]}]
    removed: list[dict[str, Any]] = []

    def keep(mode: str, target: str, info: Any) -> bool:
        try:
            pid = int(info["pid"])
        except (TypeError, KeyError, ValueError):
            return True  # not an entry we understand: DVC's business
        if pid <= 0 or _pid_alive(pid):
            return True
        removed.append({"mode": mode, "path": target, "pid": pid, "cmd": info.get("cmd", "")})
        return False

    writes = lock.get("write")
    if isinstance(writes, dict):
        lock["write"] = {p: info for p, info in writes.items() if keep("write", p, info)}
        if not lock["write"]:
            del lock["write"]
    reads = lock.get("read")
    if isinstance(reads, dict):
        kept: dict[str, Any] = {}
        for target, infos in reads.items():
            if not isinstance(infos, list):
                kept[target] = infos
                continue
            alive = [info for info in infos if keep("read", target, info)]
            if alive:
                kept[target] = alive
        lock["read"] = kept
        if not kept:
            del lock["read"]
    if removed:
        atomic_write_text(path, json.dumps(lock))
    return removed
