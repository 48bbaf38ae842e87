"""The engine processes the web process starts and watches: a handle on each one
(:class:`ChildHandle`), a request waiting on one (:class:`Pending`), and the supervision of
:class:`~lmforge.serving.process.EngineProcess` (:class:`Supervision`, a base class of it): a
supervisor thread that notices a dead, lost or stalled engine, restarts it after a backoff, sends it
the requests held meanwhile, and gives up after repeated quick failures.

:class:`Supervision` works on the state :class:`~lmforge.serving.process.EngineProcess` owns: its
lock, requests (``_rows``), current child, state, the engine's configuration and the restart
settings. Core module: multiprocessing and the standard library.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from lmforge.generation.interface import Emit, EngineUnavailable, RequestTimeout
from lmforge.serving.child import child_main
from lmforge.serving.frames import Frames
from lmforge.serving.messages import Ready, Submit
from lmforge.serving.sharing import NoEngine, connect

log = logging.getLogger("lmforge.serving")

MAX_BACKOFF_S = 30.0


@dataclass(eq=False)
class ChildHandle:
    """One engine process and the parent's ends of its two pipes."""

    proc: Any  # multiprocessing.Process
    send_end: Any  # Connection: requests to the child
    recv_end: Any  # Connection: events from the child
    device: str
    dtype: str
    started: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)
    frames: Frames | None = None
    gone: bool = False  # its pending rows have been failed

    @property
    def remote(self) -> bool:
        """An engine another worker started (:class:`~lmforge.serving.sharing.Link`)."""
        return getattr(self.proc, "remote", False)

    def describe_exit(self) -> str:
        code = self.proc.exitcode
        if self.remote:
            return "hung up on this worker"
        if code is None:
            return "stopped answering"
        if code < 0:
            return f"was killed by {_signal_name(-code)}"
        return "exited" if code == 0 else f"exited with code {code}"

    def exit_label(self) -> str:
        """A short, bounded label of how it ended (for the restart metric)."""
        code = self.proc.exitcode
        if self.remote:
            return "hung_up"
        if code is None:
            return "stalled"
        return _signal_name(-code).replace(" ", "_") if code < 0 else f"exit_{code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(eq=False)
class Pending:
    """A submitted request: its listener, the choices not yet ended, and the engine it runs on
    (None while it is held for a restarting engine)."""

    emit: Emit
    open: set[int]
    message: Submit
    child: ChildHandle | None
    deadline: float | None


class Supervision:
    """The supervisor thread's work, as methods of :class:`~lmforge.serving.process.EngineProcess`."""

    def _requests_on(self, child: ChildHandle | None) -> list[tuple[int, Pending]]:
        """The requests running on ``child`` (None: those held for a restarting engine); call under
        the lock."""
        return [(rid, p) for rid, p in self._rows.items() if p.child is child]

    def _supervise(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stopped.is_set():
                return
            child = self._child
            if self._state == "running":
                if not child.gone and not child.proc.is_alive():
                    self._drain(child)  # a reader delivers what it sent before the end
                elif not child.gone and self._stalled(child):
                    self._lose(child, f"no engine step for {self.stall_s:g} s with requests in hand")
                if child.gone and not self._stopped.is_set():
                    self._restart(child)
            self._expire_held()

    def _stalled(self, child: ChildHandle) -> bool:
        if self.stall_s is None or child.remote:
            return False  # a shared engine's owner watches it
        with self._lock:
            # Other workers' rows count too: the engine reports its load to its owner every step.
            busy = bool(self._requests_on(child)) or self.waiting + self.running > 0
        return busy and time.monotonic() - child.last_heard > self.stall_s

    def _restart(self, dead: ChildHandle) -> None:
        """Start a new engine after a backoff; give up after ``max_restarts`` quick failures."""
        with self._lock:
            if self._closing:
                return
            self._state = "restarting"
        cause = dead.describe_exit()
        self._failures = 0 if time.monotonic() - dead.started >= self.stable_s else self._failures + 1
        while not self._stopped.is_set():
            if self._failures > self.max_restarts:
                self._give_up(f"the engine process {cause}, and {self.max_restarts} restarts in a row failed")
                return
            delay = min(self.restart_backoff_s * 2 ** max(self._failures - 1, 0), MAX_BACKOFF_S)
            log.error("engine process %s %s; restarting it in %.1f s", dead.proc.pid, cause, delay)
            if self._stopped.wait(delay):
                return
            try:
                child = self._spawn()
            except Exception as exc:
                log.error("engine restart failed: %s", exc)
                cause = f"failed to restart ({exc})"
                self._failures += 1
                continue
            break
        else:
            return
        with self._lock:
            if self._closing:
                child.proc.kill()
                child.proc.join(5)
                if child.remote:
                    self._release(child)  # a link's kill only marks it: close its connections
                return
            self._child = child
            self._state = "running"
            self.restarts += 1
            held = self._requests_on(None)
            for _, pending in held:
                pending.child = child
        self.stats = {}
        self._attach(child)
        if not dead.remote:  # an engine's restart is counted once, by the worker that started it
            self.observer.engine_restart(dead.exit_label())
        log.warning(
            "engine process restarted (pid %s, restart %d; the last one %s); %d waiting request(s) sent to it",
            child.proc.pid,
            self.restarts,
            cause,
            len(held),
        )
        for rid, pending in held:
            self._send(child, pending.message, rid)

    def _give_up(self, why: str) -> None:
        with self._lock:
            self._state = "failed"
            held = self._requests_on(None)
        log.critical("%s: giving up; this replica cannot serve (liveness now fails)", why)
        for rid, pending in held:
            self._end(rid, pending, EngineUnavailable(f"{why}; this replica cannot serve"))

    def _expire_held(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [
                (rid, p) for rid, p in self._requests_on(None) if p.deadline is not None and now > p.deadline
            ]
        for rid, pending in late:
            self._end(rid, pending, RequestTimeout("timed out waiting for the engine process to restart"))

    def _spawn(self) -> ChildHandle:
        """An engine to talk to: a new engine process, or, for a worker on a shared engine
        (:mod:`lmforge.serving.sharing`), the one listening on the share, started here only if no
        worker owns the share. Waits up to ``start_timeout_s`` for an owner's engine to come up."""
        share = self._share
        if share is None:
            return self._start_engine()
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._stopped.is_set():  # closing: start no engine nobody will use
                raise RuntimeError("closed while waiting for the shared engine")
            if share.owner or share.try_own():
                return self._start_engine(*share.announce())
            try:
                link, requests, events, ready = connect(share)
            except NoEngine as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no shared engine came up within {self.start_timeout_s:g} s ({exc})"
                    ) from None
                self._stopped.wait(0.1)  # (checked at the top of the loop)
                continue
            return ChildHandle(link, requests, events, ready.device, ready.dtype)

    def _start_engine(self, listen: str | None = None, key: bytes | None = None) -> ChildHandle:
        """Start an engine process and wait until its model is loaded."""
        config = {**self._config, "listen": listen, "key": key}
        ctx = mp.get_context("spawn")  # never fork a process with torch and server threads in it
        child_recv, send_end = ctx.Pipe(duplex=False)  # (reader, writer)
        recv_end, child_send_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=child_main,
            args=(config, child_recv, child_send_end),
            name="lmforge-engine",
            daemon=True,
        )
        proc.start()
        child_recv.close()
        child_send_end.close()
        try:
            if not recv_end.poll(self.start_timeout_s):
                raise RuntimeError(f"the engine process did not start within {self.start_timeout_s:g} s")
            try:
                answer = recv_end.recv()
            except EOFError:
                proc.join(5)
                raise RuntimeError(
                    f"the engine process exited with code {proc.exitcode} while starting"
                ) from None
            if not isinstance(answer, Ready):
                proc.join(5)
                raise RuntimeError(f"the engine process failed to start: {getattr(answer, 'error', answer)}")
        except BaseException:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            send_end.close()  # a restart that keeps failing must not leak two descriptors a try
            recv_end.close()
            raise
        return ChildHandle(proc, send_end, recv_end, answer.device, answer.dtype)
