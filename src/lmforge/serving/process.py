"""The serving engine in its own process, as vLLM runs its engine core.

In one process the decode loop and the web server share Python's GIL: every streamed token costs
the event loop Python work (SSE, ASGI middleware), and the engine thread waits for the GIL after
each torch op. :class:`EngineProcess` runs :class:`~lmforge.serving.engine.ServingEngine` in a
spawned child that loads the model folder itself; the parent keeps the same interface
(``submit`` / ``Ticket.cancel`` / ``close`` / ``waiting`` / ``running`` / ``stats``) and talks over two
pipes: requests one message each, events **one message per engine step** (every row's tokens of
that step, plus the step's metric observations, replayed into the parent's observer).

The parent checks a request (prompt fits, ids in range) and the queue bound itself, so
:class:`QueueFull` and ``ValueError`` are raised synchronously, as in-process. Core module:
torch (in the child), multiprocessing and the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from lmforge.sampling import SamplingParams
from lmforge.serving.engine import (
    Emit,
    EngineClosed,
    EngineError,
    Finished,
    GenerationFailed,
    NullObserver,
    Observer,
    QueueFull,
    Ticket,
    check_request,
)

log = logging.getLogger("lmforge.serving")


class _ProcessTicket(Ticket):
    def __init__(self, owner: EngineProcess, rid: int) -> None:
        super().__init__()
        self.owner, self.rid = owner, rid

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.owner._cancel(self.rid)


class EngineProcess:
    """A :class:`ServingEngine` for the model folder ``model_dir``, running in a child process."""

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
        start_timeout_s: float = 300.0,
    ) -> None:
        self.block_size, self.vocab_size = block_size, vocab_size
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.timeout_s = timeout_s
        self.observer: Observer = observer or NullObserver()
        self.stats: dict[str, Any] = {}
        self.waiting = self.running = 0
        self._rows: dict[int, list] = {}  # rid -> [emit, rows not yet ended]
        self._outstanding = 0  # rows submitted and not ended (waiting + running)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closing = False
        ctx = mp.get_context("spawn")  # never fork a process with torch and server threads in it
        child_recv, self._send_end = ctx.Pipe(duplex=False)  # (reader, writer)
        self._recv_end, child_send_end = ctx.Pipe(duplex=False)
        config = {
            "model_dir": str(model_dir),
            "device": device,
            "torch_threads": torch_threads,
            "max_batch": max_batch,
            "max_queue": max_queue,
            "prefill_chunk": prefill_chunk,
            "timeout_s": timeout_s,
        }
        self._proc = ctx.Process(
            target=_child_main, args=(config, child_recv, child_send_end), name="lmforge-engine", daemon=True
        )
        self._proc.start()
        child_recv.close()
        child_send_end.close()
        if not self._recv_end.poll(start_timeout_s):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not start within {start_timeout_s:g} s")
        kind, payload = self._recv_end.recv()
        if kind != "ready":
            self._proc.join(5)
            raise RuntimeError(f"the engine process failed to start: {payload}")
        self.device = payload["device"]
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | asyncio.AbstractEventLoop | None = None  # started on first use
        self._done = threading.Event()  # set once the child's pipe closed

    # ---- the interface of ServingEngine --------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._proc.is_alive() and not self._closing

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        emit: Emit,
        *,
        chat: bool,
        stream: bool = False,
        n: int = 1,
        prompt_logprobs: int | None = None,
        score_only: bool = False,
    ) -> Ticket:
        prompt = check_request(prompt, params, self.block_size, self.vocab_size, score_only=score_only)
        if self._reader is None:
            self._start_reader_thread()
        with self._lock:
            if self._closing or not self._proc.is_alive():
                raise EngineClosed("the server is shutting down")
            if self._outstanding + n > self.max_batch + self.max_queue:
                self.observer.error(QueueFull.kind)
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            rid = next(self._ids)
            self._rows[rid] = [emit, n]
            self._outstanding += n
        self._send(("submit", rid, prompt, params, chat, stream, n, prompt_logprobs, score_only))
        return _ProcessTicket(self, rid)

    def close(self, grace_s: float = 10.0) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
        with contextlib.suppress(OSError):
            self._send(("close", grace_s))
        self._proc.join(grace_s + 10)
        if self._proc.is_alive():
            self._proc.kill()
        if isinstance(self._reader, threading.Thread):
            self._reader.join(5)
        # with a loop reader, the loop sees the pipe close (if it still runs) and fails what is left

    # ---- plumbing -----------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._send_end.send(message)

    def _cancel(self, rid: int) -> None:
        if rid in self._rows and self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._send(("cancel", rid))

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
        loop.add_reader(self._recv_end.fileno(), self._on_readable, loop)

    def _start_reader_thread(self) -> None:
        with self._lock:
            if self._reader is not None:
                return
            self._reader = threading.Thread(target=self._read, name="lmforge-engine-events", daemon=True)
        self._reader.start()

    def _on_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while self._recv_end.poll(0):
                self._dispatch(self._recv_end.recv())
        except (EOFError, OSError):
            loop.remove_reader(self._recv_end.fileno())
            self._child_gone()

    def _read(self) -> None:
        """Reader thread: deliver each step's events to the requests, replay metric calls."""
        while True:
            try:
                message = self._recv_end.recv()
            except (EOFError, OSError):
                break
            self._dispatch(message)
        self._child_gone()

    def _dispatch(self, message: tuple) -> None:
        events, observations, load = message
        for rid, index, event in events:
            entry = self._rows.get(rid)
            if entry is None:
                continue
            try:
                entry[0](index, event)
            except Exception:  # a listener that is gone must not stop the others
                log.exception("event delivery failed")
            if isinstance(event, Finished | EngineError):
                with self._lock:
                    self._outstanding -= 1
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._rows[rid]
        for name, args in observations:
            getattr(self.observer, name)(*args)
        self.waiting, self.running, self.stats = load

    def _child_gone(self) -> None:
        """The child exited: whatever was pending will never finish."""
        with self._lock:
            pending, self._rows = self._rows, {}
            self._outstanding = 0
        error = EngineClosed if self._closing else GenerationFailed
        for emit, left in pending.values():
            for index in range(left):
                with contextlib.suppress(Exception):
                    emit(index, error("the engine process stopped before this reply finished"))
        self._done.set()


class _Recorder:
    """Observer in the child: calls are recorded and sent with the step's events."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def first_token(self, seconds: float) -> None:
        self.calls.append(("first_token", (seconds,)))

    def inter_token(self, seconds: float) -> None:
        self.calls.append(("inter_token", (seconds,)))

    def tokens(self, count: int) -> None:
        self.calls.append(("tokens", (count,)))

    def error(self, kind: str) -> None:
        self.calls.append(("error", (kind,)))

    def load(self, waiting: int, running: int, slots: int) -> None:
        self.calls.append(("load", (waiting, running, slots)))


def _child_main(config: dict, requests: Any, events: Any) -> None:
    """The engine process: load the model folder, serve requests until told to close. One thread:
    requests are taken between engine steps, so nothing here is shared across threads."""
    # Shutdown is the parent's call (graceful: running replies finish). A signal to the whole
    # process group (Ctrl-C, `bentoml serve` stopping) must not kill the engine under them; if the
    # parent dies, the closed pipe ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import torch

        from lmforge.engine import ChatEngine
        from lmforge.serving.engine import ServingEngine

        if config["torch_threads"]:
            torch.set_num_threads(int(config["torch_threads"]))
        chat = ChatEngine.from_dir(config["model_dir"], device=config["device"])
        recorder, outbox = _Recorder(), []
        engine: ServingEngine | None = None
        tickets: dict[int, Ticket] = {}
        left: dict[int, int] = {}  # rid -> rows not yet ended

        def flush() -> None:
            if not outbox and not recorder.calls:
                return
            batch, outbox[:] = list(outbox), []
            calls, recorder.calls = recorder.calls, []
            assert engine is not None
            events.send((batch, calls, (engine.waiting, engine.running, dict(engine.stats))))

        def emit_for(rid: int) -> Emit:
            def emit(index: int, event: Any) -> None:
                outbox.append((rid, index, event))
                if isinstance(event, Finished | EngineError):
                    left[rid] -= 1
                    if left[rid] == 0:
                        del left[rid]
                        tickets.pop(rid, None)

            return emit

        def handle(message: tuple) -> None:
            """One message from the parent: submit a request or cancel one."""
            if message[0] == "submit":
                _, rid, prompt, params, chat_mode, stream, n, prompt_logprobs, score_only = message
                left[rid] = n
                try:
                    # Events come only from engine steps, so the ticket is in place before any.
                    tickets[rid] = engine.submit(
                        prompt,
                        params,
                        emit_for(rid),
                        chat=chat_mode,
                        stream=stream,
                        n=n,
                        prompt_logprobs=prompt_logprobs,
                        score_only=score_only,
                    )
                except Exception as exc:
                    error = exc if isinstance(exc, EngineError) else GenerationFailed(str(exc))
                    emit = emit_for(rid)
                    for i in range(n):
                        emit(i, error)
                    flush()
            elif message[0] == "cancel" and (ticket := tickets.get(message[1])) is not None:
                ticket.cancel()

        engine = ServingEngine(
            chat,
            max_batch=config["max_batch"],
            max_queue=config["max_queue"],
            prefill_chunk=config["prefill_chunk"],
            timeout_s=config["timeout_s"],
            observer=recorder,
            after_step=flush,
            thread=False,  # driven below: one thread, so requests never wait for a GIL
        )
        gc.collect()
        gc.freeze()  # the loaded heap (torch, model) out of the collector's reach: no long pauses
        events.send(("ready", {"device": str(chat.device)}))
    except BaseException as exc:  # reported to the parent, which raises it at startup
        events.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    closing = False
    with torch.inference_mode():
        while True:
            # Block only when idle; while rows run, take whatever arrived between two steps.
            try:
                while not closing and requests.poll(None if engine.idle else 0):
                    message = requests.recv()
                    if message[0] == "close":
                        engine.iterate()  # requests sent before the close that fit a free slot start now
                        engine.close(message[1])  # fails the rest of the waiting; running rows get the grace
                        closing = True
                    else:
                        handle(message)
            except (EOFError, OSError):  # the parent is gone
                engine.close(0)
                closing = True
            if not engine.iterate():
                flush()
                return
