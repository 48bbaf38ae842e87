"""The engine process's own side (:func:`child_main`): load the model folder, then serve the requests
the web process sends (:mod:`lmforge.serving.messages`) until told to close, sending one
:class:`~lmforge.serving.messages.Step` per engine step. One thread: requests are taken between
engine steps, so nothing here is shared across threads. Core module: torch and the standard library.
"""

from __future__ import annotations

import gc
import os
import signal
from multiprocessing.connection import wait
from typing import Any

from lmforge.generation.interface import Emit, EngineError, Finished, GenerationFailed, Ticket
from lmforge.serving.messages import Cancel, Close, Ready, StartFailed, Step, Submit
from lmforge.serving.sharing import Channels


class _Recorder:
    """Observer in the child: calls are recorded and sent with the step's events."""

    def __init__(self) -> None:
        self.observed: list[str] = []
        self.arguments: list[tuple] = []

    def _record(self, name: str, *args: Any) -> None:
        self.observed.append(name)
        self.arguments.append(args)

    def first_token(self, seconds: float) -> None:
        self._record("first_token", seconds)

    def inter_token(self, seconds: float) -> None:
        self._record("inter_token", seconds)

    def tokens(self, count: int) -> None:
        self._record("tokens", count)

    def error(self, kind: str) -> None:
        self._record("error", kind)

    def load(self, waiting: int, running: int, slots: int) -> None:
        self._record("load", waiting, running, slots)

    def engine_restart(self, cause: str) -> None:  # the parent's supervisor reports restarts
        self._record("engine_restart", cause)

    def prefix_cache(self, queried: int, hit: int) -> None:
        self._record("prefix_cache", queried, hit)


class _Outbox:
    """The child's events of the current step, as :class:`Step`'s parallel lists."""

    def __init__(self) -> None:
        self.rids: list[int] = []
        self.indices: list[int] = []
        self.events: list[Any] = []

    def add(self, rid: int, index: int, event: Any) -> None:
        self.rids.append(rid)
        self.indices.append(index)
        self.events.append(event)


def child_main(config: dict, requests: Any, events: Any) -> None:
    """The engine process: load the model folder, serve requests until told to close. One thread:
    requests are taken between engine steps, so nothing here is shared across threads.

    ``requests`` / ``events`` are the owner's pipes (channel 0). With ``config["listen"]`` (a Unix
    socket path) and ``config["key"]``, other web processes join over that socket
    (:class:`~lmforge.serving.sharing.Channels`); each gets its own events, and only the owner gets
    the metric observations."""
    # Shutdown is the parent's call (graceful: running replies finish). A signal to the whole
    # process group (Ctrl-C, `bentoml serve` stopping) must not kill the engine under them; if the
    # parent dies, the closed pipe ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channels: Channels | None = None
    try:
        import torch

        from lmforge.generation.chat import ChatEngine
        from lmforge.generation.engine import ServingEngine

        if config["torch_threads"]:
            torch.set_num_threads(int(config["torch_threads"]))
        chat = ChatEngine.from_dir(config["model_dir"], device=config["device"])
        if chat.device.type == "cuda":  # an fp32 server ($LMFORGE_DTYPE=float32) on TF32 tensor cores
            torch.set_float32_matmul_precision("high")
        recorder = _Recorder()
        outboxes: dict[int, _Outbox] = {}  # channel (0: the owner) -> this step's events
        engine: ServingEngine | None = None
        tickets: dict[tuple[int, int], Ticket] = {}  # (channel, rid) -> its ticket
        left: dict[tuple[int, int], int] = {}  # (channel, rid) -> rows not yet ended

        def step_of(box: _Outbox, observed: list, arguments: list) -> Step:
            assert engine is not None
            return Step(
                rids=box.rids,
                indices=box.indices,
                events=box.events,
                observed=observed,
                arguments=arguments,
                waiting=engine.waiting,
                running=engine.running,
                stats=dict(engine.stats),
            )

        def flush() -> None:
            nonlocal outboxes
            if not outboxes and not recorder.observed:
                return
            sent, outboxes = outboxes, {}
            observed, arguments = recorder.observed, recorder.arguments
            recorder.observed, recorder.arguments = [], []
            if 0 in sent or observed:
                events.send(step_of(sent.pop(0, _Outbox()), observed, arguments))
            for cid, box in sent.items():  # other workers' events (only with channels)
                channels.send(cid, step_of(box, [], []))

        def emit_for(key: tuple[int, int]) -> Emit:
            cid, rid = key

            def emit(index: int, event: Any) -> None:
                box = outboxes.get(cid)
                if box is None:
                    box = outboxes[cid] = _Outbox()
                box.add(rid, index, event)
                if isinstance(event, Finished | EngineError):
                    left[key] -= 1
                    if left[key] == 0:
                        del left[key]
                        tickets.pop(key, None)

            return emit

        def handle(cid: int, message: Submit | Cancel) -> None:
            """One message from a web process: submit a request or cancel one."""
            key = (cid, message.rid)
            if isinstance(message, Submit):
                left[key] = message.request.n
                try:
                    # Events come only from engine steps, so the ticket is in place before any.
                    tickets[key] = engine.submit(message.request, emit_for(key))
                except Exception as exc:
                    error = exc if isinstance(exc, EngineError) else GenerationFailed(str(exc))
                    emit = emit_for(key)
                    for i in range(message.request.n):
                        emit(i, error)
                    flush()
            elif isinstance(message, Cancel) and (ticket := tickets.get(key)) is not None:
                ticket.cancel()

        def forget(cid: int) -> None:
            """A web process hung up: its rows are cancelled (their slots free at the next step)."""
            for key in [k for k in tickets if k[0] == cid]:
                tickets[key].cancel()
            outboxes.pop(cid, None)

        engine = ServingEngine(
            chat,
            max_batch=config["max_batch"],
            max_queue=config["max_queue"],
            prefill_chunk=config["prefill_chunk"],
            timeout_s=config["timeout_s"],
            observer=recorder,
            after_step=flush,
            prefix_cache_mb=config["prefix_cache_mb"],
            prefix_block=config["prefix_block"],
            thread=False,  # driven below: one thread, so requests never wait for a GIL
        )
        ready = Ready(device=str(chat.device), dtype=str(chat.dtype).removeprefix("torch."), pid=os.getpid())
        if config.get("listen"):
            channels = Channels(config["listen"], config["key"], ready)
        gc.collect()
        gc.freeze()  # the loaded heap (torch, model) out of the collector's reach: no long pauses
        events.send(ready)
    except BaseException as exc:  # reported to the parent, which raises it at startup
        events.send(StartFailed(error=f"{type(exc).__name__}: {exc}"))
        return
    closing = False
    try:
        with torch.inference_mode():
            while True:
                # Block only when idle; while rows run, take whatever arrived between two steps.
                # Closing, the owner's pipe is no longer read (its end is the owner's business), but
                # other workers still are: their new requests are refused at once (EngineClosed).
                try:
                    while True:
                        sources = [] if closing else [requests]
                        if channels is not None:
                            sources += channels.sources
                        if not sources:
                            break
                        if closing or not engine.idle:
                            timeout = 0  # rows to run: take what is there, then step
                        elif channels is not None and channels.backlogged:
                            timeout = 0.01  # idle, with events a worker has not read yet: retry soon
                        else:
                            timeout = None  # idle: sleep until a message comes
                        ready_now = wait(sources, timeout)
                        if not ready_now:
                            break
                        for source in ready_now:
                            if source is requests:
                                message = requests.recv()
                                if isinstance(message, Close):
                                    engine.iterate()  # requests sent before the close that fit a free slot start now
                                    engine.close(
                                        message.grace_s
                                    )  # fails the rest of the waiting; running rows get the grace
                                    closing = True
                                else:
                                    handle(0, message)
                            elif source == channels.wake_r:
                                channels.admit()
                            elif (channel := channels.by_conn.get(source)) is not None:
                                try:
                                    handle(channel.cid, channel.requests.recv())
                                except Exception:  # hung up, or sent what is no request: cut off
                                    channels.drop(channel)
                except (EOFError, OSError):  # the parent is gone
                    engine.close(0)
                    closing = True
                if channels is not None:  # every pass, idle ones included: nobody waits on a backlog
                    channels.flush()
                    while channels.dropped:
                        forget(channels.dropped.pop())
                if not engine.iterate():
                    flush()
                    return
    finally:
        if channels is not None:
            channels.close()
