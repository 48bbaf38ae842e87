"""Child process trees that stop the way Ctrl-C stops them: gracefully first, for sure in the end.

An orchestrator (`lmforge run`, the Prefect flow) runs `dvc repro`, which runs `lmforge <stage>`,
which may run workers. To cancel such a tree cleanly:

    proc = process_groups.start(["dvc", "repro"], cwd=root, env=env)
    with process_groups.stopped_on_interrupt(proc):   # any BaseException in the block stops the tree
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

Signals turned into exceptions are :mod:`lmforge.cancellation`; DVC's lock file,
:mod:`lmforge.orchestration.dvc_lock`.

A process that leaves the group on purpose (`setsid`, `start_new_session=True`) is out of reach,
as is the tree once the orchestrator itself is SIGKILLed. Standard library only. POSIX only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

GRACE_S = 10.0  # after SIGINT: DVC and Lightning need a second or two to close runs and locks
TERM_GRACE_S = 5.0  # after SIGTERM
KILL_WAIT_S = 10.0  # after SIGKILL (only a process stuck in the kernel takes longer)
POLL_S = 0.05

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
            raise TypeError(f"process_groups.start sets the session itself; {key}= is not accepted")
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


def is_zombie(pid: int) -> bool:
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
        time.sleep(POLL_S)


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
