"""The serving engine in its own process, as vLLM runs its engine core, and its supervisor.

In one process the decode loop and the web server share Python's GIL: every streamed token costs
the event loop Python work (SSE, ASGI middleware), and the engine thread waits for the GIL after
each torch op. :class:`EngineProcess` runs :class:`~lmforge.generation.engine.ServingEngine` in a
spawned child that loads the model folder itself; the parent keeps the same interface
(``submit`` / ``Ticket.cancel`` / ``close`` / ``waiting`` / ``running`` / ``stats``) and talks over two
pipes: requests one message each, events **one message per engine step** (every row's tokens of
that step, plus the step's metric observations, replayed into the parent's observer).

The parent checks a request (prompt fits, ids in range) and the queue bound itself, so
:class:`QueueFull` and ``ValueError`` are raised synchronously, as in-process.

**Events are read without ever blocking the web server.** On an event loop the pipe is read
non-blocking (uvloop makes every ``add_reader`` descriptor non-blocking anyway) and messages are
framed by :class:`Frames`: a step's message may be larger than what the pipe holds (a step of rows
with 20 alternatives per token is tens of KB), so a read can return part of it; the rest comes on
the next wake-up. (Reading it with ``Connection.recv`` raised ``BlockingIOError`` mid-message, which
was taken for the engine's death while it still ran: issue 22.)

**Nothing on the web server's loop waits for the engine.** Requests are written to the engine's
pipe by a sender thread: a write blocks while the pipe is full, and a wedged engine never empties it.

**Supervision.** A supervisor thread watches the child. If it dies (a bug, out of memory,
``kill -9``), or stops answering with work in hand for ``stall_s`` seconds (then it is killed):

* the rows it was running end at once with :class:`EngineDied` (the web layer answers a 5xx that
  says so);
* a new child is started after a backoff (``restart_backoff_s`` doubling up to 30 s); requests that
  arrive meanwhile wait for it, within their own timeout;
* each restart is logged with its cause and reported to the observer (``engine_restart``);
* after ``max_restarts`` restarts in a row that each died within ``stable_s`` of starting (or failed
  to start), it gives up: ``live`` turns False, so the orchestrator replaces the replica.

``alive`` (readiness) is True only while a child runs and can take requests. Core module: torch (in
the child), multiprocessing and the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import queue
import threading
import time
from dataclasses import replace
from typing import Any

from lmforge.generation.interface import (
    Cancelled,
    Emit,
    EngineClosed,
    EngineDied,
    EngineError,
    EngineUnavailable,
    Finished,
    NullObserver,
    Observer,
    QueueFull,
    Request,
    Ticket,
    check_request,
)
from lmforge.serving.frames import Frames
from lmforge.serving.messages import Cancel, Close, Step, Submit
from lmforge.serving.sharing import EngineShare
from lmforge.serving.supervision import ChildHandle, Pending, Supervision

log = logging.getLogger("lmforge.serving")

CLOSE_MARGIN_S = 2.0  # a closing engine past its grace period by this much is killed


class _ProcessTicket(Ticket):
    def __init__(self, owner: EngineProcess, rid: int) -> None:
        super().__init__()
        self.owner, self.rid = owner, rid

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.owner._cancel(self.rid)


class EngineProcess(Supervision):
    """A :class:`ServingEngine` for the model folder ``model_dir``, running in a supervised child.

    ``prefix_cache_mb`` (default 64; 0: off) and ``prefix_block`` configure the engine's automatic
    prefix caching (:mod:`lmforge.generation.prefix_cache`). With ``share``, the web processes of one
    server share one engine: the first to own the share starts it, the others connect to it
    (:mod:`lmforge.serving.sharing`)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        block_size: int,
        vocab_size: int,
        device: str | None = None,
        torch_threads: int | None = None,
        max_batch: int = 32,
        max_queue: int = 256,
        prefill_chunk: int = 512,
        timeout_s: float | None = 600.0,
        observer: Observer | None = None,
        prefix_cache_mb: float = 64.0,
        prefix_block: int = 16,
        start_timeout_s: float = 300.0,
        restart_backoff_s: float = 0.5,
        max_restarts: int = 5,
        stable_s: float = 60.0,
        stall_s: float | None = 120.0,
        share: EngineShare | None = None,
    ) -> None:
        self.block_size, self.vocab_size = block_size, vocab_size
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.timeout_s = timeout_s
        self.observer: Observer = observer or NullObserver()
        self.start_timeout_s = start_timeout_s
        self.restart_backoff_s, self.max_restarts = restart_backoff_s, max_restarts
        self.stable_s, self.stall_s = stable_s, stall_s
        self.stats: dict[str, Any] = {}
        self.waiting = self.running = 0
        self.restarts = 0
        self._config = {
            "model_dir": str(model_dir),
            "device": device,
            "torch_threads": torch_threads,
            "max_batch": max_batch,
            "max_queue": max_queue,
            "prefill_chunk": prefill_chunk,
            "timeout_s": timeout_s,
            "prefix_cache_mb": prefix_cache_mb,
            "prefix_block": prefix_block,
        }
        self._rows: dict[int, Pending] = {}
        self._outstanding = 0  # rows submitted and not ended (held, waiting or running)
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # (child, message, rid) for the sender
        self._closing = False
        self._state = "running"  # running | restarting | failed
        self._failures = 0  # restarts in a row whose engine died young (or did not start)
        self._reader: threading.Thread | asyncio.AbstractEventLoop | None = None  # bound on first use
        self._share = share
        self._wake = threading.Event()
        self._stopped = threading.Event()
        try:
            self._child = self._spawn()
        except BaseException:
            if share is not None:
                share.release()  # an owner whose engine never started lets another worker try
            raise
        self.device, self.dtype = self._child.device, self._child.dtype
        if self.owns_shared_engine:
            # The engine also sends its owner every other worker's load and metrics: read them from
            # now on, not from this worker's first request, or its pipe fills and the engine waits.
            # On the event loop when built on one (a BentoML worker builds its service there).
            if (loop := _running_loop()) is not None:
                self.bind_loop(loop)
            else:
                self._start_reader_thread()
        self._supervisor = threading.Thread(
            target=self._supervise, name="lmforge-engine-supervisor", daemon=True
        )
        self._supervisor.start()
        self._sender = threading.Thread(target=self._send_loop, name="lmforge-engine-requests", daemon=True)
        self._sender.start()

    # ---- health --------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Ready: an engine runs and takes requests."""
        return (
            self._state == "running"
            and not self._closing
            and self._child.proc.is_alive()
            and not self._child.gone
        )

    @property
    def live(self) -> bool:
        """False once the engine could not be restarted: only a new replica can serve again."""
        return self._state != "failed"

    @property
    def state(self) -> str:
        return "closing" if self._closing else self._state

    @property
    def in_flight(self) -> int:
        """Rows handed to the engine (or held for its restart) and not yet ended."""
        return self._outstanding

    @property
    def share(self) -> EngineShare | None:
        """The share this worker's engine belongs to (None: an engine of its own)."""
        return self._share

    @property
    def owns_shared_engine(self) -> bool:
        """This worker started (and supervises) the engine the share's other workers connect to."""
        return self._share is not None and self._share.owner

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid

    # ---- the interface of ServingEngine --------------------------------------------------
    def submit(self, request: Request, emit: Emit) -> Ticket:
        prompt, n = check_request(request, self.block_size, self.vocab_size), request.n
        if self._reader is None:
            self._start_reader_thread()
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if self._state == "failed":
                raise EngineUnavailable(
                    "the engine process could not be restarted; this replica cannot serve"
                )
            if self._outstanding + n > self.max_batch + self.max_queue:
                self.observer.error(QueueFull.kind)
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            rid = next(self._ids)
            message = Submit(rid, replace(request, prompt=prompt))
            # An engine that has exited but whose end the reader has not seen yet is no engine: the
            # request waits for the next one (as /readyz already says) instead of dying with this one.
            child = self._child if self.alive else None
            deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
            self._rows[rid] = Pending(emit, set(range(n)), message, child, deadline)
            self._outstanding += n
            if child is not None and self._outstanding == n:
                # An idle engine sends nothing: its stall clock starts with the work it is given.
                child.last_heard = time.monotonic()
        if child is not None:
            self._send(child, message, rid)
        return _ProcessTicket(self, rid)

    def close(self, grace_s: float = 10.0) -> None:
        """Stop taking requests; running rows get ``grace_s`` seconds, then the engine is stopped
        (killed if it does not exit within 2 s more: a wedged engine never holds up shutdown)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            held = self._requests_on(None)
            child = self._child
        self._stopped.set()
        self._wake.set()
        for rid, pending in held:
            self._end(rid, pending, EngineClosed("the server is shutting down; the request was not started"))
        if child.remote:  # another worker's engine: let this worker's rows finish, then hang up
            deadline = time.monotonic() + grace_s
            while self._outstanding and time.monotonic() < deadline and _running_loop() is not self._reader:
                time.sleep(0.02)
            self._child_gone(child)  # the engine cancels whatever of this worker's rows is left
        else:
            if child.proc.is_alive():
                self._send(child, Close(grace_s))
                child.proc.join(grace_s + CLOSE_MARGIN_S)
            self.kill()
            self._drain(child)
        if self._share is not None:
            self._share.release()
        with self._lock:
            left = list(self._rows.items())  # none, unless one was held for a restart meanwhile
        for rid, pending in left:
            self._end(rid, pending, EngineClosed("the server shut down before this reply finished"))
        self._requests.put(None)
        if self._sender is not threading.current_thread():
            self._sender.join(5)
        if isinstance(self._reader, threading.Thread) and self._reader is not threading.current_thread():
            self._reader.join(5)
        if self._supervisor is not threading.current_thread():
            self._supervisor.join(5)

    def kill(self) -> None:
        """SIGKILL the engine process now (shutdown's last resort)."""
        proc = self._child.proc
        if proc.is_alive():
            proc.kill()
        proc.join(5)

    # ---- plumbing -----------------------------------------------------------------------
    def _send(self, child: ChildHandle, message: Submit | Cancel | Close, rid: int | None = None) -> None:
        """Queue a message for ``child``; the sender thread writes it. A pipe write blocks while the
        pipe is full, which a wedged engine never empties: on the web server's event loop that
        would stop every request and health probe, so no write happens there."""
        self._requests.put((child, message, rid))

    def _send_loop(self) -> None:
        """Sender thread: write queued messages in order (a cancel never overtakes its submit)."""
        while (item := self._requests.get()) is not None:
            child, message, rid = item
            if child.gone:
                continue  # its requests ended with it
            try:
                child.send_end.send(message)
            except (OSError, ValueError) as exc:
                if rid is not None:
                    with self._lock:
                        pending = self._rows.get(rid)
                        if (
                            pending is not None
                            and pending.child is child
                            and not child.gone
                            and not self._closing
                        ):
                            pending.child = None  # never reached the engine: hold it for the next one
                self._lose(child, f"its request pipe broke ({type(exc).__name__}: {exc})")

    def _cancel(self, rid: int) -> None:
        with self._lock:
            pending = self._rows.get(rid)
            held = pending is not None and pending.child is None
        if pending is None:
            return
        if held:
            self._end(rid, pending, Cancelled("cancelled while the engine restarted"))
        elif pending.child is not None:
            self._send(pending.child, Cancel(rid))

    def _end(self, rid: int, pending: Pending, error: EngineError) -> None:
        """End a request's open choices with ``error`` (it never reached, or lost, its engine)."""
        with self._lock:
            if self._rows.get(rid) is not pending:
                return
            del self._rows[rid]
            indices, pending.open = sorted(pending.open), set()
            self._outstanding -= len(indices)
        self.observer.error(error.kind)
        for index in indices:
            with contextlib.suppress(Exception):
                pending.emit(index, error)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read events on ``loop`` itself (``add_reader`` on the pipe) instead of on a thread: the
        web server then never hands the GIL back and forth with a reader thread. Called by
        :mod:`lmforge.serving.aio` before the first request; without it a thread reads."""
        with self._lock:
            bound = self._reader
            if bound is loop or isinstance(bound, threading.Thread):
                return
            if isinstance(bound, asyncio.AbstractEventLoop) and not bound.is_closed():
                return  # another live loop reads; its callbacks reach this loop's listeners
            self._reader = loop  # the first loop, or one after the bound loop was closed
            child = self._child
        self._attach_loop(loop, child)

    def _attach_loop(self, loop: asyncio.AbstractEventLoop, child: ChildHandle) -> None:
        """On ``loop``'s thread: read ``child``'s events there, without blocking."""
        if child.gone:
            return
        fd = child.recv_end.fileno()
        os.set_blocking(fd, False)
        if child.frames is None:
            child.frames = Frames(fd)
        loop.add_reader(fd, self._on_readable, loop, child)

    def _start_reader_thread(self) -> None:
        with self._lock:
            if self._reader is not None:
                return
            self._reader = self._reader_thread(self._child)

    def _reader_thread(self, child: ChildHandle) -> threading.Thread:
        thread = threading.Thread(target=self._read, args=(child,), name="lmforge-engine-events", daemon=True)
        thread.start()
        return thread

    def _attach(self, child: ChildHandle) -> None:
        """Read a new engine's events the way the old one's were read."""
        reader = self._reader
        if isinstance(reader, asyncio.AbstractEventLoop) and not reader.is_closed():
            try:
                reader.call_soon_threadsafe(self._attach_loop, reader, child)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        if reader is not None or self.owns_shared_engine:
            self._reader = self._reader_thread(child)  # (an owner reads from the start, as above)

    def _on_readable(self, loop: asyncio.AbstractEventLoop, child: ChildHandle) -> None:
        assert child.frames is not None
        try:
            payloads, eof = child.frames.read()
        except OSError:
            payloads, eof = [], True
        for payload in payloads:
            self._deliver(child, payload)
        if eof:
            with contextlib.suppress(Exception):
                loop.remove_reader(child.frames.fd)
            self._child_gone(child)

    def _read(self, child: ChildHandle) -> None:
        """Reader thread: deliver each step's events to the requests, replay metric calls."""
        while True:
            try:
                payload = child.recv_end.recv_bytes()
            except (EOFError, OSError, TypeError):  # TypeError: hung up (closed) under this read
                break
            self._deliver(child, payload)
        self._child_gone(child)

    def _deliver(self, child: ChildHandle, payload: bytes) -> None:
        try:
            message = pickle.loads(payload)  # our own child's message, over our own pipe
        except Exception as exc:  # a torn message: this channel cannot be trusted any more
            self._lose(child, f"it sent an unreadable message ({type(exc).__name__}: {exc})")
            return
        try:
            self._dispatch(child, message)
        except Exception:
            log.exception("engine event delivery failed")

    def _dispatch(self, child: ChildHandle, step: Step) -> None:
        child.last_heard = time.monotonic()
        for rid, index, event in zip(step.rids, step.indices, step.events, strict=True):
            pending = self._rows.get(rid)
            if pending is None or pending.child is not child:
                continue
            try:
                pending.emit(index, event)
            except Exception:  # a listener that is gone must not stop the others
                log.exception("event delivery failed")
            if isinstance(event, Finished | EngineError):
                with self._lock:
                    if index in pending.open:
                        pending.open.discard(index)
                        self._outstanding -= 1
                    if not pending.open and self._rows.get(rid) is pending:
                        del self._rows[rid]
        for name, args in zip(step.observed, step.arguments, strict=True):
            getattr(self.observer, name)(*args)
        if child is self._child:
            self.waiting, self.running = step.waiting, step.running
            self.stats = step.stats

    def _lose(self, child: ChildHandle, why: str) -> None:
        """A child we cannot talk to is no engine: kill it; the supervisor replaces it."""
        if child.proc.is_alive():
            log.error("engine process %s: %s; killing it", child.proc.pid, why)
            child.proc.kill()
        self._child_gone(child)

    def _child_gone(self, child: ChildHandle) -> None:
        """The child exited (or was lost): whatever it was running will never finish."""
        with self._lock:
            if child.gone:
                return
            child.gone = True
            lost = self._requests_on(child)
        if child.proc.is_alive():
            child.proc.kill()  # never leave a live engine nobody listens to
        child.proc.join(5)
        self._release(child)
        if self._closing:
            error: EngineError = EngineClosed("the server shut down before this reply finished")
        else:
            how = child.describe_exit()
            error = EngineDied(
                f"the engine process {how} before this reply finished; it is being restarted, retry the request"
            )
            log.error("engine process %s %s with %d request(s) in flight", child.proc.pid, how, len(lost))
        for rid, pending in lost:
            self._end(rid, pending, error)
        if child is self._child:
            self.waiting = self.running = 0
        self._wake.set()

    def _drain(self, child: ChildHandle, wait_s: float = 2.0) -> None:
        """After ``child`` exited: deliver what it sent before the end, then fail what is left."""
        reader = self._reader
        if (
            isinstance(reader, asyncio.AbstractEventLoop)
            and child.frames is not None
            and _running_loop() is reader
        ):
            self._on_readable(reader, child)  # on the reading loop itself: read to the end now
        elif reader is not None:
            deadline = time.monotonic() + wait_s
            while not child.gone and time.monotonic() < deadline:
                time.sleep(0.02)
        self._child_gone(child)

    def _release(self, child: ChildHandle) -> None:
        """Close a gone child's pipes; a loop stops watching the descriptor first (on its own thread),
        so a new pipe that reuses the number is never read as the old one."""

        def close() -> None:
            if child.frames is not None and isinstance(reader, asyncio.AbstractEventLoop):
                with contextlib.suppress(Exception):
                    reader.remove_reader(child.frames.fd)
            for conn in (child.send_end, child.recv_end):
                with contextlib.suppress(OSError):
                    conn.close()

        reader = self._reader
        if (
            child.frames is not None
            and isinstance(reader, asyncio.AbstractEventLoop)
            and not reader.is_closed()
        ):
            if _running_loop() is reader:
                close()
                return
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop closed meanwhile
                reader.call_soon_threadsafe(close)
                return
        close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
