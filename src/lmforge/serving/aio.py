"""asyncio front of :class:`~lmforge.serving.engine.ServingEngine` for an async web server.

The engine calls back on its own thread; these helpers hop each event onto the caller's event
loop. ``generate`` awaits a request's finished rows; ``open_stream`` submits at once (so a full
queue is an error before any byte is sent) and returns an async iterator of its events. Leaving
either early (client gone, task cancelled) cancels the request: its slot is freed at the engine's
next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from lmforge.sampling import SamplingParams, StreamChunk
from lmforge.serving.engine import EngineError, Event, Finished, ServingEngine


async def generate(
    engine: ServingEngine,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    chat: bool,
    n: int = 1,
    prompt_logprobs: int | None = None,
    score_only: bool = False,
) -> list[Finished]:
    """The ``n`` finished rows of one prompt, in choice order; raises the engine's error if any."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[list[Finished]] = loop.create_future()
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

    ticket = engine.submit(
        prompt,
        params,
        lambda i, e: loop.call_soon_threadsafe(deliver, i, e),
        chat=chat,
        n=n,
        prompt_logprobs=prompt_logprobs,
        score_only=score_only,
    )
    try:
        return await done
    finally:
        if not done.done() or done.cancelled():
            ticket.cancel()


def open_stream(
    engine: ServingEngine, prompt: Sequence[int], params: SamplingParams, *, chat: bool
) -> AsyncIterator[StreamChunk | Finished]:
    """Submit one streaming row now; iterate its chunks, then its :class:`Finished`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    ticket = engine.submit(
        prompt, params, lambda _, e: loop.call_soon_threadsafe(queue.put_nowait, e), chat=chat, stream=True
    )

    async def events() -> AsyncIterator[StreamChunk | Finished]:
        try:
            while True:
                event = await queue.get()
                if isinstance(event, EngineError):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            ticket.cancel()  # no-op when finished; frees the slot when the client left early

    return events()
