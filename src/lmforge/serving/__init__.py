"""Serving: the continuous-batching engine (:mod:`.engine`), the interface and events every engine
shares (:mod:`.interface`), the engine in a supervised process of its own (:mod:`.process`, with
:mod:`.supervision`, :mod:`.child`, :mod:`.messages` and :mod:`.frames`), and the asyncio front (:mod:`.aio`).

Core package (torch, numpy, stdlib): the BentoML service in ``services/`` is one user of it; the
tests drive it directly.
"""

from lmforge.generation.engine import ServingEngine
from lmforge.generation.interface import (
    Cancelled,
    Engine,
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
    Ticket,
)

__all__ = [
    "Cancelled",
    "Engine",
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
