"""What a generation request asks for: :class:`SamplingParams`, the decoding knobs, checked when built
(the error names the field). Standard library only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


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
