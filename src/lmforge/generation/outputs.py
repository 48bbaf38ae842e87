"""What a generation request gets back: :class:`Generation` (one finished reply) and
:class:`StreamChunk` (one streamed step of a reply). Standard library only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length"]
Decode = Callable[[list[int]], str]


@dataclass
class Generation:
    """One finished sequence. ``token_ids`` never include the stop token (see ``stop_token_id``)."""

    token_ids: list[int]
    finish_reason: FinishReason
    text: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    stop_token_id: int | None = None
    stop_string: str | None = None

    @property
    def ids_with_stop(self) -> list[int]:
        """The reply as the model produced it: ``token_ids`` plus the stop token that ended it, if any."""
        return self.token_ids + ([self.stop_token_id] if self.stop_token_id is not None else [])


@dataclass
class StreamChunk:
    """One step of one sequence. ``text`` is the new text since the previous chunk (None without decode).

    The last chunk has ``finish_reason`` set; when a stop token ended the sequence that chunk carries
    ``token_id=None`` (the stop token is not part of the output) plus any text held back so far.
    """

    token_id: int | None
    text: str | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: FinishReason | None = None
