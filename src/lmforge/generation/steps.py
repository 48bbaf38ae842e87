"""The engine's model-facing work for one iteration: a prefill chunk, a decode step, the draw.

:class:`Steps` is a base class of :class:`lmforge.generation.engine.ServingEngine`, which owns the
scheduling (admission, slots, compaction, guards, events); the forward passes, the sampling and a
row's advance by one token are here. :class:`Row` is one sequence of a request in the engine, and
:class:`Front` what the engine needs of the text side (pad id, decode, the stop tokens).

Training core: torch and the standard library.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from lmforge.generation import logits as rowwise
from lmforge.generation.interface import Emit, Event, Observer, Ticket, TokenLogprob
from lmforge.generation.outputs import Decode
from lmforge.generation.prefix_cache import PrefixCache
from lmforge.generation.reply import Reply
from lmforge.generation.sampling_params import SamplingParams
from lmforge.kv_cache import SlotKVCache
from lmforge.model import GPT

log = logging.getLogger("lmforge.serving")


class Front(Protocol):
    """The text side of an engine: a :class:`lmforge.generation.chat.ChatEngine`, or a bare model's
    :class:`lmforge.generation.driver.ModelFront` (token ids in and out, no tokenizer)."""

    model: GPT
    pad_id: int
    decode: Decode | None  # None: replies carry token ids only

    @property
    def device(self) -> torch.device: ...

    def with_stops(self, params: SamplingParams, chat: bool) -> SamplingParams: ...


@dataclass(eq=False)
class Row:
    """One sequence: a request with ``n`` choices has n rows."""

    index: int
    prompt: list[int]
    params: SamplingParams
    seq: Reply
    emit: Emit
    stream: bool
    rng: random.Random | None
    deadline: float | None
    submitted: float
    prompt_logprobs: int | None = None  # top alternatives per prompt token (echo scoring)
    score_only: bool = False  # max_tokens 0: score the prompt, generate nothing
    matcher: Any = None  # its grammar's state (lmforge.generation.grammar), None: a free reply
    ticket: Ticket | None = None
    prefilled: int = 0  # prompt tokens in the cache
    length: int = 0  # tokens in the cache (prompt + fed replies)
    next_token: int | None = None  # sampled, not yet fed
    last_emit: float = 0.0
    scored: list[TokenLogprob | None] = field(default_factory=list)
    ended: bool = False  # its last event (Finished or an error) is sent: nothing follows it
    uniform: float | None = None  # this step's draw from rng, kept until the step is applied
    looked_up: bool = False  # its prompt was looked up in the prefix cache (at its first chunk)

    @property
    def decoding(self) -> bool:
        return self.next_token is not None

    @property
    def cancelled(self) -> bool:
        return self.ticket is not None and self.ticket.cancelled


class Steps:
    """Prefill, decode and sampling over the engine's rows (see the module docstring)."""

    front: Front
    model: GPT
    cache: SlotKVCache
    device: torch.device
    block_size: int
    vocab_size: int
    prefill_chunk: int
    observer: Observer
    stats: dict[str, Any]
    prefix_cache: PrefixCache | None
    _rows: list[Row]
    _prefilling: deque[Row]
    _seen: Tensor | None
    _counts: Tensor | None
    _knobs: tuple[tuple[int, ...], rowwise.RowKnobs] | None
    _isolate: Callable[..., None]
    _fail_row: Callable[[Row, BaseException, str], None]
    _finish: Callable[[Row], None]
    _send: Callable[[Row, Event], None]

    # ---- prefill ------------------------------------------------------------------------
    def _prefill(self) -> None:
        """One chunk: up to ``prefill_chunk`` prompt tokens of the oldest prefilling rows."""
        budget, batch = self.prefill_chunk, []
        for row in self._prefilling:
            if budget == 0:
                break
            if not row.looked_up:
                self._reuse_prefix(row)
            take = min(len(row.prompt) - row.prefilled, budget)
            batch.append((row, take))
            budget -= take
        self._isolate(
            "prefilling", batch, self._prefill_forward, self._prefilled, row_of=lambda item: item[0]
        )

    def _reuse_prefix(self, row: Row) -> None:
        """At the row's first prefill chunk (its slot is fixed until this iteration's forward): copy
        the longest cached block run its prompt starts with into its slot and start its prefill
        after it. At least the last prompt token is prefilled, for the first token's logits; rows
        that score their prompt prefill all of it."""
        row.looked_up = True
        store = self.prefix_cache
        if store is None or row.prompt_logprobs is not None or row.score_only or row.prefilled:
            return
        hit = 0
        try:
            tokens, blocks = store.lookup(row.prompt)
            if blocks:
                store.load(blocks, self.cache, self._rows.index(row))
                hit = min(tokens, len(row.prompt) - 1)  # a copied tail past it is recomputed alike
                row.prefilled = row.length = hit
        except Exception:  # the store is an optimisation: a failure there costs the row only time
            log.exception("prefix cache lookup failed; prefilling the whole prompt")
            row.prefilled = row.length = hit = 0
        self.stats["prefix_cache_queried_tokens"] += len(row.prompt)
        self.stats["prefix_cache_hit_tokens"] += hit
        self.observer.prefix_cache(len(row.prompt), hit)

    def _store_prefix(self, row: Row) -> None:
        """A row whose prompt is now in its slot: keep the prompt's full blocks that the store lacks."""
        store = self.prefix_cache
        if store is None or row.prompt_logprobs is not None or row.score_only:
            return
        try:
            store.insert(row.prompt, self.cache, self._rows.index(row), row.prefilled)
        except Exception:
            log.exception("prefix cache insert failed")
        self.stats.update(
            prefix_cache_blocks=store.blocks,
            prefix_cache_bytes=store.bytes,
            prefix_cache_evictions=store.evictions,
        )

    def _prefill_forward(self, batch: list[tuple[Row, int]]) -> tuple[Tensor, Tensor | None]:
        """The chunk's forward pass: each row's last logits, and all positions' when a row scores."""
        T = max(take for _, take in batch)
        pad, limit = self.front.pad_id, self.cache.max_len - 1
        idx = [row.prompt[row.prefilled : row.prefilled + take] + [pad] * (T - take) for row, take in batch]
        # Padding lands past a row's prompt, where its own later tokens overwrite it before any read.
        pos = [[min(row.prefilled + t, limit) for t in range(T)] for row, _ in batch]
        slots = torch.tensor([self._rows.index(row) for row, _ in batch], device=self.device)
        positions = torch.tensor(pos, device=self.device)
        view = self.cache.rows(slots, positions, max(p[-1] for p in pos) + 1)
        tokens = torch.tensor(idx, device=self.device)
        last = torch.tensor([take - 1 for _, take in batch], device=self.device)
        if any(row.prompt_logprobs is not None for row, _ in batch):
            all_logits = self.model.forward_slots(tokens, view).float()
            return all_logits[torch.arange(len(batch), device=self.device), last], all_logits
        return self.model.forward_slots(tokens, view, last=last), None

    def _prefilled(self, batch: list[tuple[Row, int]], out: tuple[Tensor, Tensor | None]) -> None:
        """Each row's bookkeeping after its chunk; rows whose prompt is complete sample a first token."""
        logits, all_logits = out
        self.stats["prefill_chunks"] += 1
        self.stats["prefill_tokens"] += sum(take for _, take in batch)
        done, done_logits = [], []
        for i, (row, take) in enumerate(batch):
            try:
                if row.prompt_logprobs is not None and all_logits is not None:
                    self._score_prompt(row, all_logits[i, :take])
                row.prefilled += take
                row.length = row.prefilled
                if row.prefilled == len(row.prompt):
                    self._prefilling.remove(row)
                    self._store_prefix(row)
                    if row.score_only or row.seq.budget == 0:
                        row.seq.finish_reason = "length"
                        self._finish(row)
                    else:
                        done.append(row)
                        done_logits.append(i)
            except Exception as exc:
                self._fail_row(row, exc, "prefilling")
        if done:
            slots = torch.tensor([self._rows.index(r) for r in done], device=self.device)
            self._sample(done, logits[done_logits], slots)

    def _score_prompt(self, row: Row, logits: Tensor) -> None:
        """Log-probability of each prompt token in this chunk given those before it (raw model)."""
        logp = logits.log_softmax(dim=-1)
        start, k = row.prefilled, row.prompt_logprobs or 0
        if start == 0:
            row.scored.append(None)
        targets = row.prompt[start + 1 : start + 1 + logp.shape[0]]
        if not targets:
            return
        rows = logp[: len(targets)]
        chosen = rows.gather(-1, torch.tensor(targets, device=rows.device)[:, None]).squeeze(-1).tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in targets]
        if k:
            v, i = rows.topk(min(k, self.vocab_size), dim=-1)
            tops = [list(zip(ti, tv, strict=True)) for ti, tv in zip(i.tolist(), v.tolist(), strict=True)]
        row.scored.extend(zip(targets, chosen, tops, strict=True))

    # ---- decode -------------------------------------------------------------------------
    def _decode(self) -> None:
        """One token for every decoding row; prefilling rows ride along on a dummy position that
        their next prefill chunk overwrites (so the batch stays the contiguous first slots)."""
        live = [i for i, r in enumerate(self._rows) if r.decoding]
        self._isolate(
            "decoding",
            live,
            lambda part: self._decode_forward(part, together=part is live),
            self._decoded,
            row_of=lambda s: self._rows[s],
        )

    def _decode_forward(self, live: list[int], *, together: bool) -> Tensor:
        """Next-token logits [len(live), V] of the rows in slots ``live``. All live rows at once run
        as the contiguous first slots (rows still prefilling fed a pad); a retry runs them alone."""
        rows, pad = self._rows, self.front.pad_id
        slots = list(range(len(rows))) if together else live
        idx = [[rows[s].next_token if rows[s].decoding else pad] for s in slots]
        lengths = [rows[s].length for s in slots]
        positions = torch.tensor([[n] for n in lengths], device=self.device)
        which = len(rows) if together else torch.tensor(slots, device=self.device)
        view = self.cache.rows(which, positions, max(lengths) + 1)
        logits = self.model.forward_slots(torch.tensor(idx, device=self.device), view)[:, -1]
        if together and len(live) < len(rows):
            logits = logits[torch.tensor(live, device=self.device)]
        return logits

    def _decoded(self, live: list[int], logits: Tensor) -> None:
        rows = self._rows
        for s in live:
            rows[s].length += 1
            rows[s].next_token = None
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
        if len(live) == len(rows):
            self._sample(rows, logits, None)
        else:
            self._sample([rows[s] for s in live], logits, torch.tensor(live, device=self.device))

    def _sample(self, rows: list[Row], logits: Tensor, slots: Tensor | None) -> None:
        """Sample one token for each row (``slots``: their slot indices; None = the first len(rows)).
        Never raises: a row whose sampling fails ends alone with :class:`GenerationFailed`."""
        at = torch.arange(len(rows), device=self.device) if slots is None else slots

        def compute(part: list[Row]) -> tuple:
            if part is rows:
                return self._draw(part, logits, at, slots is None)
            i = rows.index(part[0])  # a retry, row by row (rare): rows compare by identity
            return self._draw(part, logits[i : i + 1], at[i : i + 1], False)

        def apply(part: list[Row], out: tuple) -> None:
            knobs, where, tokens, lps, tops = out
            for r in part:
                r.uniform = None  # used: the next step draws a new one
            if self._seen is not None and knobs.use_repetition:
                self._seen[where, tokens] = True
            if self._counts is not None and knobs.use_counts:
                self._counts[where, tokens] += 1
            self._advance(part, tokens.tolist(), lps, tops)

        self._isolate("sampling", rows, compute, apply)

    def _draw(self, rows: list[Row], logits: Tensor, at: Tensor, cacheable: bool) -> tuple:
        """The rows' next tokens and log-probabilities. Changes no state: a row's uniform for this
        step is drawn once and kept until the step is applied, so a retry draws the same number."""
        knobs = self._knobs_for(rows, cacheable)

        def state(buf: Tensor | None) -> Tensor | None:
            return None if buf is None else buf[at]

        allowed = None
        if any(r.matcher is not None for r in rows):
            allowed = self.front.grammars.allowed([r.matcher for r in rows], self.vocab_size, self.device)
        processed = rowwise.process(logits, knobs, state(self._seen), state(self._counts), allowed)
        uniforms = None
        if not knobs.all_greedy:
            for r in rows:
                if r.uniform is None and r.rng is not None:
                    r.uniform = r.rng.random()
            draws = [r.uniform or 0.0 for r in rows]
            uniforms = torch.tensor(draws, dtype=torch.float64, device=self.device)
        tokens = rowwise.draw(processed, knobs, uniforms)
        want = [r.params.logprobs for r in rows]
        lps: list[float | None] = [None] * len(rows)
        tops: list[list[tuple[int, float]] | None] = [None] * len(rows)
        if any(k is not None for k in want):
            logp = processed.log_softmax(dim=-1)
            lps = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
            kmax = min(max(k or 0 for k in want), self.vocab_size)
            top_v, top_i = logp.topk(kmax, dim=-1)
            tops = [
                [(t, v) for t, v in zip(ti[: k or 0], tv[: k or 0], strict=True) if v != float("-inf")]
                for ti, tv, k in zip(top_i.tolist(), top_v.tolist(), want, strict=True)
            ]
        return knobs, at, tokens, lps, tops

    def _knobs_for(self, rows: list[Row], cacheable: bool) -> rowwise.RowKnobs:
        key = tuple(id(r) for r in rows)
        if cacheable and self._knobs is not None and self._knobs[0] == key:
            return self._knobs[1]
        knobs = rowwise.RowKnobs.of([r.params for r in rows], self.vocab_size, self.device)
        if cacheable:
            self._knobs = (key, knobs)
        return knobs

    def _advance(self, rows: list[Row], tokens: list[int], lps: list, tops: list) -> None:
        now = time.monotonic()
        observer = self.observer
        for row, token, lp, top in zip(rows, tokens, lps, tops, strict=True):
            if row.seq.finished:
                continue
            try:
                first = not row.seq.tokens and row.last_emit == 0.0
                complete = False  # the grammar takes no more: the reply ends with this token
                if row.matcher is not None and token not in row.params.stop_token_ids:
                    if not row.matcher.consume_token(token):
                        raise ValueError(f"token {token} left the grammar: {row.matcher.get_error()}")
                    complete = row.matcher.is_stopped()
                chunk = row.seq.push(token, lp, top, complete=complete)
                if first:
                    observer.first_token(now - row.submitted)
                else:
                    observer.inter_token(now - row.last_emit)
                row.last_emit = now
                if chunk.finish_reason is None:
                    row.next_token = token
                if row.stream:
                    self._send(row, chunk)
                if row.seq.finished:
                    self._finish(row)
            except Exception as exc:
                self._fail_row(row, exc, "sampling")
        self.stats["tokens"] += len(tokens)
        observer.tokens(len(tokens))
