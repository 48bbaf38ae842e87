"""What a serving engine promises its callers: the :class:`Engine` interface that both the
in-process :class:`~lmforge.generation.engine.ServingEngine` and the supervised
:class:`~lmforge.serving.process.EngineProcess` implement, the events a request's ``emit`` callback
receives, the errors that end a request, and the metric hooks (:class:`Observer`).

Core module: the standard library (and :mod:`lmforge.generation.outputs`'s result types).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lmforge.generation.outputs import Generation, StreamChunk
from lmforge.generation.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lmforge.generation.grammar import Constraint

TokenLogprob = tuple[int, float, list[tuple[int, float]]]  # token, its logprob, top alternatives


class EngineError(Exception):
    """A request the engine could not complete; ``kind`` labels it in metrics, ``retry_after_s``
    (when set) tells a client how long to wait before a retry can succeed."""

    kind = "internal"
    retry_after_s: int | None = None

    def __init__(self, message: str = "", retry_after_s: int | None = None) -> None:
        super().__init__(message)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class QueueFull(EngineError):
    kind = "queue_full"
    retry_after_s = 1


class EngineClosed(EngineError):
    kind = "shutdown"


class RequestTimeout(EngineError):
    kind = "timeout"


class GenerationFailed(EngineError):
    kind = "internal"


class EngineDied(GenerationFailed):
    """The engine process died under a running request (a bug, out of memory, ``kill -9``); the
    supervisor restarts it, so a retry can succeed."""

    kind = "engine_died"


class EngineUnavailable(EngineError):
    """No engine can take the request: it is restarting and the request's wait ran out, or it could
    not be restarted at all."""

    kind = "unavailable"
    retry_after_s = 5


class Cancelled(EngineError):
    """The last event of a row whose request was cancelled (nobody may be listening any more)."""

    kind = "cancelled"


@dataclass(frozen=True, slots=True)
class Request:
    """One prompt to generate for; its ``n`` choices become ``n`` rows of the engine.

    ``prompt_logprobs``: top alternatives per prompt token (echo scoring); ``score_only``: score the
    prompt, generate nothing; ``seed_index``: choice ``i`` of a seeded request draws from stream
    ``seed_index + i`` of the seed rule (:func:`lmforge.generation.logits.row_generator`);
    ``constraint``: a grammar every choice's reply must match (:mod:`lmforge.generation.grammar`)."""

    prompt: Sequence[int]
    params: SamplingParams
    chat: bool
    stream: bool = False
    n: int = 1
    prompt_logprobs: int | None = None
    score_only: bool = False
    seed_index: int = 0
    constraint: Constraint | None = None


@dataclass
class Finished:
    """The last event of a row: its :class:`Generation`, plus prompt log-probabilities when asked
    (entry t scores prompt token t given the tokens before it; the first has none)."""

    index: int
    generation: Generation
    prompt_logprobs: list[TokenLogprob | None] | None = None


Event = StreamChunk | Finished | EngineError
Emit = Callable[[int, Event], None]  # (choice index, event)


class Observer(Protocol):
    """Hooks for metrics (the service binds them to Prometheus); all run on the engine thread."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens(self, count: int) -> None: ...
    def error(self, kind: str) -> None: ...
    def load(self, waiting: int, running: int, slots: int) -> None: ...
    def engine_restart(self, cause: str) -> None: ...
    def prefix_cache(self, queried: int, hit: int) -> None:
        """A prompt of ``queried`` tokens was looked up in the prefix cache; ``hit`` of them were
        reused."""
        ...


class NullObserver:
    """An :class:`Observer` that records nothing; a base for observers that want a few hooks."""

    def _ignore(self, *_args: Any) -> None:
        return None

    first_token = inter_token = tokens = error = load = engine_restart = prefix_cache = _ignore


def check_request(request: Request, block_size: int, vocab_size: int) -> list[int]:
    """The prompt as ints, or ``ValueError`` naming what cannot run (checked before queueing)."""
    prompt, params = [int(t) for t in request.prompt], request.params
    room = block_size if request.score_only else block_size - 1  # a reply needs one position
    if not prompt or len(prompt) > room:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {block_size}")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
    if params.logit_bias and max(params.logit_bias) >= vocab_size:
        raise ValueError(f"logit_bias: token ids must lie in [0, {vocab_size})")
    return prompt


class Ticket:
    """A submitted request; ``cancel()`` frees its rows at the engine's next step."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@runtime_checkable
class Engine(Protocol):
    """A continuous-batching engine as the web layer and :mod:`lmforge.serving.aio` use it."""

    max_batch: int
    max_queue: int
    prefill_chunk: int
    timeout_s: float | None
    device: Any
    dtype: str  # the weights' and KV cache's: float32, bfloat16, ...
    stats: dict[str, Any]

    @property
    def alive(self) -> bool:
        """Ready: it takes requests now (/readyz)."""
        ...

    @property
    def live(self) -> bool:
        """It serves or can recover (/livez); False: only a new replica can serve again."""
        ...

    @property
    def state(self) -> str:
        """running, restarting, failed or closing."""
        ...

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...

    @property
    def in_flight(self) -> int:
        """Rows submitted and not yet ended (waiting, running, or held while the engine restarts)."""
        ...

    def submit(self, request: Request, emit: Emit) -> Ticket:
        """Queue ``request.n`` rows (choices) for one prompt; every row's events reach ``emit(index, event)``
        and each row ends with exactly one :class:`Finished` or :class:`EngineError`. Raises
        ``ValueError`` for a prompt that cannot run, :class:`QueueFull`, or :class:`EngineClosed`."""
        ...

    def close(self, grace_s: float = 10.0) -> None:
        """Stop taking requests; running rows get ``grace_s`` seconds, then end with an error."""
        ...
