"""Batched, KV-cached autoregressive sampling for :class:`lmforge.model.GPT`.

``generate`` runs one static batch to its end (``_decode_loop``); the logits processing is
:mod:`lmforge.logits`', shared with the serving engine (which streams). Prompts of different lengths are left-padded and masked; the model derives
RoPE positions from the mask, so batching does not change any row's logits.

Training core: imports only torch and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lmforge import logits as rowwise
from lmforge.model import GPT, KVCache
from lmforge.padding import attention_mask, pad

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


# --------------------------------------------------------------------------- per-sequence bookkeeping


class _Sequence:
    """Accumulates one row's tokens; owns stop detection and the streamed-text invariant.

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

    def push(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> StreamChunk:
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
        if len(self.tokens) >= self.budget:
            return self._finish("length", token, logprob, top)
        return StreamChunk(token, self._delta(self._safe_len()), logprob, top)

    def finish_empty(self) -> StreamChunk:
        """A sequence with no room to generate anything (prompt already fills block_size)."""
        return self._finish("length", None, None, None)

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


# --------------------------------------------------------------------------- the decode loop


def _decode_loop(
    model: GPT,
    seqs: list[_Sequence],
    prompts: list[list[int]],
    params: SamplingParams,
    pad_id: int,
    device: torch.device,
) -> Iterator[list[tuple[int, StreamChunk]]]:
    """Run the model until every sequence finishes; yield each step's (row, chunk) pairs."""
    P, steps = max(len(p) for p in prompts), max(s.budget for s in seqs)
    if any(s.budget == 0 for s in seqs):
        yield [(i, s.finish_empty()) for i, s in enumerate(seqs) if s.budget == 0]
    if steps == 0:
        return

    # inference_mode is entered per step rather than around the loop: a generator must not leave it
    # switched on for the caller's code between yields.
    with torch.inference_mode():
        state = _init_state(model, prompts, params, pad_id, device, P + steps)
    for _ in range(steps):
        with torch.inference_mode():
            nxt, lp_list, top_list = _sample_step(model, state, params)
        chunks = []
        for i, (s, tok) in enumerate(zip(seqs, nxt, strict=True)):
            if not s.finished:
                chunks.append((i, s.push(tok, lp_list[i], top_list[i])))
        yield chunks
        if all(s.finished for s in seqs):
            return
        with torch.inference_mode():
            # Finished rows keep being fed (keeping the batch rectangular) but are masked out, so
            # their RoPE positions stop advancing and they cannot run past block_size.
            active = torch.tensor([not s.finished for s in seqs], dtype=torch.long, device=device)
            state.mask[:, state.cache.length] = active  # the column the next token lands in
            state.x = torch.tensor(nxt, dtype=torch.long, device=device)[:, None]


@dataclass
class _LoopState:
    x: Tensor  # next model input [B, T]
    mask: Tensor  # [B, max_len] 1 = real token; used only when prompts have different lengths
    use_mask: bool
    cache: KVCache
    seen: Tensor | None  # bool [B, V] presence mask for the repetition penalty
    counts: Tensor | None  # [B, V] generated-token counts for presence/frequency penalties
    knobs: rowwise.RowKnobs
    generator: torch.Generator | None


def _init_state(
    model: GPT,
    prompts: list[list[int]],
    params: SamplingParams,
    pad_id: int,
    device: torch.device,
    max_len: int,
) -> _LoopState:
    B, lens = len(prompts), [len(p) for p in prompts]
    P = max(lens)
    ids = pad(prompts, pad_id, P, side="left", device=device)
    mask = torch.zeros(B, max_len, dtype=torch.long, device=device)
    mask[:, :P] = attention_mask(prompts, P, side="left", device=device)
    V = model.config.vocab_size
    knobs = rowwise.RowKnobs.of([params] * B, V, device)
    seen = counts = None
    if knobs.use_repetition:
        seen = rowwise.presence_mask(torch.where(mask[:, :P].bool(), ids, -1), V)
    if knobs.use_counts:
        counts = torch.zeros(B, V, dtype=torch.float32, device=device)
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
    # Equal-length prompts need no mask: this keeps the cheaper SDPA path for the common case.
    use_mask = len(set(lens)) > 1
    cache = model.new_kv_cache(B, max_len, device=device)
    return _LoopState(ids, mask, use_mask, cache, seen, counts, knobs, generator)


def _sample_step(
    model: GPT, st: _LoopState, params: SamplingParams
) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
    """One forward + sample for the whole batch; returns python lists (one entry per row)."""
    B = st.x.shape[0]
    S = st.cache.length + st.x.shape[1]
    logits = model(st.x, kv_cache=st.cache, attention_mask=st.mask[:, :S] if st.use_mask else None)[:, -1]
    logits = rowwise.process(logits, st.knobs, st.seen, st.counts)
    if st.knobs.all_greedy:  # temperature 0, or one too small to divide by (lmforge.logits)
        nxt = logits.argmax(dim=-1)
    else:
        nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=st.generator).squeeze(-1)
    rows = torch.arange(B, device=nxt.device)
    if st.seen is not None:
        st.seen[rows, nxt] = True
    if st.counts is not None:
        st.counts[rows, nxt] += 1

    lp_list: list[float | None] = [None] * B
    top_list: list[list[tuple[int, float]] | None] = [None] * B
    if params.logprobs is not None:
        logp = logits.log_softmax(dim=-1)
        lp_list = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
        top_v, top_i = logp.topk(min(params.logprobs, logp.shape[-1]), dim=-1)
        # Tokens removed by the filters have -inf logprob; they are not real alternatives.
        top_list = [
            [(t, v) for t, v in zip(ti, tv, strict=True) if v != float("-inf")]
            for ti, tv in zip(top_i.tolist(), top_v.tolist(), strict=True)
        ]
    return nxt.tolist(), lp_list, top_list


def _prepare(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    decode: Decode | None,
    device: torch.device | str | None,
    incremental: bool,
) -> tuple[list[list[int]], list[_Sequence], torch.device]:
    if params.stop_strings and decode is None:
        raise ValueError("SamplingParams.stop_strings requires a `decode` function")
    if not prompts:
        raise ValueError("prompts must contain at least one prompt")
    cfg = model.config
    clean = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(clean):
        if not p:
            raise ValueError(f"prompt {i} is empty; at least one token is needed to condition on")
        if len(p) > cfg.block_size:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, more than the model's block_size {cfg.block_size}"
            )
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} contains token ids outside [0, {cfg.vocab_size})")
    # Each row may grow to block_size; anything past that is cut short with finish_reason "length".
    seqs = [
        _Sequence(min(params.max_new_tokens, cfg.block_size - len(p)), params, decode, incremental)
        for p in clean
    ]
    return clean, seqs, _model_device(model, device)


def _model_device(model: GPT, device: torch.device | str | None) -> torch.device:
    """The model's device: every tensor of the decode loop is created there. An explicit
    ``device`` is only a check (a batch on another device than the weights cannot run)."""
    dev = next(model.parameters()).device
    if device is not None:
        want = torch.device(device)
        if want.type != dev.type or (want.index is not None and want.index != dev.index):
            raise ValueError(f"device={want} but the model is on {dev}; move the model instead")
    return dev


def generate(
    model: GPT,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    decode: Decode | None = None,
    pad_id: int = 0,
    device: torch.device | str | None = None,
) -> list[Generation]:
    """Sample continuations for a batch of prompts (token id lists of any lengths).

    Runs on the model's device (``device``, if given, must name it).
    """
    clean, seqs, dev = _prepare(model, prompts, params, decode, device, incremental=bool(params.stop_strings))
    was_training = model.training
    model.eval()
    try:
        for _ in _decode_loop(model, seqs, clean, params, pad_id, dev):
            pass
    finally:
        model.train(was_training)
    return [s.result() for s in seqs]
