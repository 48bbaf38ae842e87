"""The messages between the web process and the engine process (:mod:`lmforge.serving.process`).

Requests go down one pipe (:class:`Submit`, :class:`Cancel`, :class:`Close`); the engine answers on
the other: :class:`Ready` or :class:`StartFailed` once, then one :class:`Step` per engine step (every
row's events of that step and the step's metric observations). Other web processes sharing the engine
(:mod:`lmforge.serving.sharing`) open the same two channels over a Unix socket, each connection first
saying which of the two it is (:class:`Hello`). Each message pickles as its class
and a tuple of its fields (``__reduce__``), as cheap as the bare tuples it replaces. Core module:
standard library (the events themselves are the engine's own types).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.generation.interface import Event, Request


class _Message:
    __slots__ = ()

    def __reduce__(self) -> tuple[type, tuple]:
        return type(self), tuple(getattr(self, name) for name in type(self).__slots__)


# ---- web process -> engine process


@dataclass(frozen=True, slots=True)
class Submit(_Message):
    """Start a request: ``n`` rows (choices) for one prompt."""

    rid: int
    request: Request


@dataclass(frozen=True, slots=True)
class Cancel(_Message):
    rid: int


@dataclass(frozen=True, slots=True)
class Close(_Message):
    """Stop taking requests; running rows get ``grace_s`` seconds."""

    grace_s: float


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    """First message on a connection to a shared engine: ``role`` "events" or "requests"; the two
    connections of one web process carry the same random ``token``."""

    role: str
    token: bytes


# ---- engine process -> web process


@dataclass(frozen=True, slots=True)
class Ready(_Message):
    device: str
    dtype: str
    pid: int


@dataclass(frozen=True, slots=True)
class StartFailed(_Message):
    error: str


@dataclass(frozen=True, slots=True)
class Step(_Message):
    """What one engine step produced: event i is for choice ``indices[i]`` of request ``rids[i]`` (a
    stream chunk, the finished row, or an error); observation j is the call ``observed[j]`` with
    ``arguments[j]`` made on the engine's observer, replayed on the web process's; and the engine's
    load after the step. Parallel lists, not an object per event: a step of 16 rows pickles 3x
    faster so."""

    rids: list[int]
    indices: list[int]
    events: list[Event]
    observed: list[str]
    arguments: list[tuple[Any, ...]]
    waiting: int
    running: int
    stats: dict[str, Any]
