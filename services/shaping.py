"""Response shaping: engine results -> the JSON each API returns.

One log-probability formatter (:class:`Logprobs`) decodes token strings once and projects them into
the three shapes clients expect: lmforge's native list, OpenAI chat's ``{"content": [...]}`` and
OpenAI's legacy completions ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmforge.tokenizer import ChatTokenizer

Top = list[tuple[int, float]]
Entry = tuple[int, float | None, Top | None]  # token id, its logprob (None: not scored), alternatives


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def entries(
    token_ids: Sequence[int], logprobs: Sequence[float | None], tops: Sequence[Top | None]
) -> list[Entry]:
    return list(zip(token_ids, logprobs, tops, strict=False))


class Logprobs:
    """Token log-probabilities with their strings, decoded once, in any of the three shapes."""

    def __init__(self, tok: ChatTokenizer, items: Sequence[Entry]) -> None:
        self.items = list(items)
        ids = [t for t, _, _ in self.items] + [a for _, _, top in self.items for a, _ in top or []]
        self.strings = dict(zip(ids, tok.token_strings(ids), strict=True))

    def _alts(self, top: Top | None) -> list[tuple[str, int, float]]:
        return [(self.strings[t], t, v) for t, v in top or []]

    def native(self) -> list[dict]:
        """``[{"token", "token_id", "logprob", "top_logprobs": [{"token", "token_id", "logprob"}]}]``."""
        return [
            {
                "token": self.strings[t],
                "token_id": t,
                "logprob": lp,
                "top_logprobs": [{"token": s, "token_id": a, "logprob": v} for s, a, v in self._alts(top)],
            }
            for t, lp, top in self.items
        ]

    def chat(self) -> dict:
        """OpenAI chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``."""
        return {
            "content": [
                {
                    "token": self.strings[t],
                    "logprob": lp,
                    "bytes": list(self.strings[t].encode()),
                    "top_logprobs": [
                        {"token": s, "logprob": v, "bytes": list(s.encode())} for s, _, v in self._alts(top)
                    ],
                }
                for t, lp, top in self.items
            ]
        }

    def legacy(self, offset: int = 0) -> dict:
        """OpenAI completions: parallel lists; ``top_logprobs`` entries map token strings to logprobs
        (None where a token was not scored, as the first echoed prompt token)."""
        tokens, offsets, at = [], [], offset
        for t, _, _ in self.items:
            tokens.append(self.strings[t])
            offsets.append(at)
            at += len(self.strings[t])
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in self.items],
            "top_logprobs": [
                None if lp is None else {s: v for s, _, v in self._alts(top)} for _, lp, top in self.items
            ],
            "text_offset": offsets,
        }


def generation_entries(gen: Any) -> list[Entry] | None:
    """A :class:`lmforge.generation.outputs.Generation`'s tokens with their logprobs, or None if not asked."""
    if gen.logprobs is None:
        return None
    return entries(gen.token_ids, gen.logprobs, gen.top_logprobs)


def chunk_entries(chunk: Any) -> list[Entry] | None:
    """One streamed token's entry (None when the chunk carries no token or no logprob)."""
    if chunk.token_id is None or chunk.logprob is None:
        return None
    return [(chunk.token_id, chunk.logprob, chunk.top_logprobs or [])]
