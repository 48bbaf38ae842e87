"""Serving: the continuous-batching engine (:mod:`.engine`) and its asyncio front (:mod:`.aio`).

Core package (torch, numpy, stdlib): the BentoML service in ``services/`` is one user of it; the
tests drive it directly.
"""

from lmforge.serving.engine import (
    Cancelled,
    EngineClosed,
    EngineDied,
    EngineError,
    EngineUnavailable,
    Finished,
    GenerationFailed,
    NullObserver,
    Observer,
    QueueFull,
    RequestTimeout,
    ServingEngine,
    Ticket,
)

__all__ = [
    "Cancelled",
    "EngineClosed",
    "EngineDied",
    "EngineError",
    "EngineUnavailable",
    "Finished",
    "GenerationFailed",
    "NullObserver",
    "Observer",
    "QueueFull",
    "RequestTimeout",
    "ServingEngine",
    "Ticket",
]
