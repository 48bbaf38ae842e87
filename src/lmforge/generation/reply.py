"""One reply's state while the engine grows it: the row state of :mod:`lmforge.generation.engine`.

``push`` takes each sampled token and returns the :class:`~lmforge.generation.outputs.StreamChunk`
to stream; ``result`` is the finished :class:`~lmforge.generation.outputs.Generation`. Stop tokens,
stop strings (text held back while it may still turn into one), the token budget and the decoded
text live here, once, for every way a reply is produced. Standard library only.
"""

from __future__ import annotations

from lmforge.generation.outputs import Decode, FinishReason, Generation, StreamChunk
from lmforge.generation.sampling_params import SamplingParams


class Reply:
    """One reply while it grows: its tokens, stop detection and the streamed-text invariant.

    Invariant: the concatenation of all emitted text deltas equals the final ``text``. Text that
    might still turn out to be part of a stop string (or a half-decoded UTF-8 char) is held back.
    """

    def __init__(self, budget: int, params: SamplingParams, decode: Decode | None, incremental: bool) -> None:
        self.budget, self.params, self.decode = budget, params, decode
        self.incremental = incremental and decode is not None
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.text = ""  # decode(tokens), kept current only when incremental
        self.emitted = 0  # characters of text already handed out as deltas
        self.finish_reason: FinishReason | None = None
        self.stop_token_id: int | None = None
        self.stop_string: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(
        self,
        token: int,
        logprob: float | None,
        top: list[tuple[int, float]] | None,
        complete: bool = False,
    ) -> StreamChunk:
        """Add a sampled token; ``complete``: its grammar is done, the reply ends with it ("stop")."""
        if token in self.params.stop_token_ids:
            self.stop_token_id = token
            return self._finish("stop", None, logprob, top)
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.tops.append(top or [])
        if self.incremental:
            assert self.decode is not None
            self.text = self.decode(self.tokens)
            if self._check_stop_strings():
                return self._finish("stop", token, logprob, top)
        if complete:
            return self._finish("stop", token, logprob, top)
        if len(self.tokens) >= self.budget:
            return self._finish("length", token, logprob, top)
        return StreamChunk(token, self._delta(self._safe_len()), logprob, top)

    def _check_stop_strings(self) -> bool:
        hits = [(i, s) for s in self.params.stop_strings if (i := self.text.find(s)) >= 0]
        if not hits:
            return False
        cut, self.stop_string = min(hits)
        self.text = self.text[:cut]
        # Keep the fewest tokens whose text covers everything before the stop string.
        assert self.decode is not None
        keep = next(k for k in range(len(self.tokens) + 1) if len(self.decode(self.tokens[:k])) >= cut)
        del self.tokens[keep:], self.logprobs[keep:], self.tops[keep:]
        return True

    def _safe_len(self) -> int:
        text, hold = self.text, 0
        for s in self.params.stop_strings:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = len(text) - hold
        while safe > 0 and text[safe - 1] == "\ufffd":  # possibly an incomplete multi-byte character
            safe -= 1
        return safe

    def _delta(self, upto: int) -> str | None:
        if self.decode is None:
            return None
        delta = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return delta

    def _finish(
        self,
        reason: FinishReason,
        token: int | None,
        logprob: float | None,
        top: list[tuple[int, float]] | None,
    ) -> StreamChunk:
        self.finish_reason = reason
        if self.decode is not None and not self.incremental:
            self.text = self.decode(self.tokens)
        return StreamChunk(token, self._delta(len(self.text)), logprob, top, reason)

    def result(self) -> Generation:
        assert self.finish_reason is not None
        want_lp = self.params.logprobs is not None
        return Generation(
            token_ids=list(self.tokens),
            finish_reason=self.finish_reason,
            text=self.text if self.decode is not None else None,
            logprobs=list(self.logprobs) if want_lp else None,
            top_logprobs=[list(t) for t in self.tops] if want_lp else None,
            stop_token_id=self.stop_token_id,
            stop_string=self.stop_string,
        )
