"""asyncio front of :class:`~lmforge.generation.engine.ServingEngine` for an async web server.

The engine calls back on its own thread; these helpers hop each event onto the caller's event
loop. ``generate`` awaits a request's finished rows; ``open_stream`` submits at once (so a full
queue is an error before any byte is sent) and returns an async iterator of its events. Leaving
either early (client gone, task cancelled) cancels the request: its slot is freed at the engine's
next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from lmforge.generation.interface import Engine, EngineError, Event, Finished, Request
from lmforge.generation.outputs import StreamChunk
from lmforge.generation.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lmforge.generation.grammar import Constraint


class _Mailbox:
    """Engine thread -> event loop, one wake-up per burst: a decode step that finishes 16 rows'
    tokens posts 16 callbacks but writes the loop's self-pipe once (``call_soon_threadsafe`` per token
    costs a syscall and a loop iteration each)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.items, self.lock, self.scheduled = loop, deque(), threading.Lock(), False
        self.thread = threading.get_ident()  # the loop's own thread

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        if threading.get_ident() == self.thread:  # already on the loop (an engine read by the loop)
            fn(*args)
            return
        with self.lock:
            self.items.append((fn, args))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, deque(), False
        for fn, args in items:
            fn(*args)


_mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}


def _mailbox(engine: Any = None) -> _Mailbox:
    loop = asyncio.get_running_loop()
    if hasattr(engine, "bind_loop"):
        engine.bind_loop(loop)  # an engine process: its events are read on this loop
    box = _mailboxes.get(loop)
    if box is None:
        for stale in [lp for lp in _mailboxes if lp.is_closed()]:
            del _mailboxes[stale]
        box = _mailboxes[loop] = _Mailbox(loop)
    return box


async def generate(
    engine: Engine,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    chat: bool,
    n: int = 1,
    prompt_logprobs: int | None = None,
    score_only: bool = False,
    constraint: Constraint | None = None,
) -> list[Finished]:
    """The ``n`` finished rows of one prompt, in choice order; raises the engine's error if any."""
    box = _mailbox(engine)
    done: asyncio.Future[list[Finished]] = box.loop.create_future()
    results: list[Finished | None] = [None] * n

    def deliver(index: int, event: Event) -> None:
        if done.done():
            return
        if isinstance(event, EngineError):
            done.set_exception(event)
        elif isinstance(event, Finished):
            results[index] = event
            if all(r is not None for r in results):
                done.set_result([r for r in results if r is not None])

    request = Request(
        prompt,
        params,
        chat,
        n=n,
        prompt_logprobs=prompt_logprobs,
        score_only=score_only,
        constraint=constraint,
    )
    ticket = engine.submit(request, lambda i, e: box.post(deliver, i, e))
    try:
        return await done
    finally:
        if not done.done() or done.cancelled():
            ticket.cancel()


def open_stream(
    engine: Engine,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    chat: bool,
    constraint: Constraint | None = None,
) -> AsyncIterator[list[StreamChunk | Finished]]:
    """Submit one streaming row now; iterate its events in bursts: each item is every event that
    arrived since the last one (a slow consumer gets several tokens at once), the last ending with
    its :class:`Finished`. An :class:`EngineError` is raised after the events before it."""
    box = _mailbox(engine)
    queue: asyncio.Queue[Event] = asyncio.Queue()
    ticket = engine.submit(
        Request(prompt, params, chat, stream=True, constraint=constraint),
        lambda _, e: box.post(queue.put_nowait, e),
    )

    async def events() -> AsyncIterator[list[StreamChunk | Finished]]:
        try:
            while True:
                burst = [await queue.get()]
                while not queue.empty():
                    burst.append(queue.get_nowait())
                error = next((e for e in burst if isinstance(e, EngineError)), None)
                ready = [e for e in burst if not isinstance(e, EngineError)]
                if ready:
                    yield ready  # type: ignore[misc]
                if error is not None:
                    raise error
                if any(isinstance(e, Finished) for e in ready):
                    return
        finally:
            ticket.cancel()  # no-op when finished; frees the slot when the client left early

    return events()
