"""What a generation request asks for and what it gets back.

:class:`SamplingParams` (the decoding knobs, checked when built), :class:`Generation` (one finished
reply) and :class:`StreamChunk` (one streamed step of a reply). The engine that produces them is
:mod:`lmforge.generation.engine`; a reply's state while it grows is :mod:`lmforge.generation.reply`.

Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length"]
Decode = Callable[[list[int]], str]


@dataclass
class SamplingParams:
    """Decoding knobs. ``temperature == 0`` means greedy; ``top_k`` of None/0 and ``top_p == 1`` are off.

    ``presence_penalty`` / ``frequency_penalty`` (OpenAI's, in [-2, 2]) lower the logits of tokens
    already generated, once / per occurrence; ``logit_bias`` maps token ids to a bias in [-100, 100].
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise bad("max_new_tokens", "an int >= 1")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an int >= 1")
        if not self.temperature >= 0:
            raise bad("temperature", ">= 0 (0 = greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise bad("top_k", "None or an int >= 0")
        if self.top_k is not None and self.top_k < 0:
            raise bad("top_k", "None or an int >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise bad("repetition_penalty", "finite and > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "in [-2, 2]")
        if self.logit_bias:
            if any(
                isinstance(t, bool) or int(t) < 0 or not -100 <= float(b) <= 100
                for t, b in self.logit_bias.items()
            ):
                raise bad("logit_bias", "a map of token ids >= 0 to biases in [-100, 100]")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or self.logprobs < 0):
            raise bad("logprobs", "None or an int >= 0")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if isinstance(self.stop_strings, str):
            raise bad("stop_strings", "a sequence of strings, not a single string")
        self.stop_strings = tuple(self.stop_strings)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise bad("stop_strings", "a sequence of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
