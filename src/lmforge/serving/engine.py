"""A continuous-batching engine: one decode loop over a running batch of independent requests.

Scheduling follows vLLM and TGI:

* one thread owns the model and runs the loop; requests wait in a bounded FIFO queue
  (``max_queue`` rows; past it :class:`QueueFull`) until a KV slot is free (``max_batch`` slots,
  preallocated at the model's context length, :class:`lmforge.model.SlotKVCache`);
* every iteration admits waiting requests into free slots, runs **one prefill chunk** (at most
  ``prefill_chunk`` prompt tokens, several prompts right-padded into one forward), then **one
  decode step** for every running row. A long prompt is prefilled over several iterations while
  running streams keep getting a token per iteration: prefill and decode never starve each other;
* each row has its own sampling parameters (temperature, top-k/p, min-p, penalties, logit_bias,
  stops, logprobs, max tokens, applied row-wise by :mod:`lmforge.logits`) and its own random
  generator: a seeded request draws the same numbers whatever else shares its batch;
* a finished, cancelled or timed-out row leaves at once: its slot is refilled by moving the last
  row into it (compaction), so the decode batch is always the first ``running`` slots;
* streaming and non-streaming rows share the loop; only their events differ.

Events go to each request's ``emit`` callback, called on the engine thread: a
:class:`~lmforge.sampling.StreamChunk` per token for streaming rows, then a :class:`Finished`,
or an :class:`EngineError` (timeout, shutdown, failure). :mod:`lmforge.serving.aio` turns them
into awaitables for an asyncio server. Core module: torch and the standard library.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmforge import logits as rowwise
from lmforge.engine import ChatEngine
from lmforge.sampling import SamplingParams, _Sequence
from lmforge.serving.interface import (
    Cancelled,
    Emit,
    EngineClosed,
    EngineError,
    Event,
    Finished,
    GenerationFailed,
    NullObserver,
    Observer,
    QueueFull,
    RequestTimeout,
    Ticket,
    TokenLogprob,
    check_request,
)

log = logging.getLogger("lmforge.serving")

# --------------------------------------------------------------------------- a request's rows


@dataclass(eq=False)
class _Row:
    """One sequence: a request with ``n`` choices has n rows."""

    index: int
    prompt: list[int]
    params: SamplingParams
    seq: _Sequence
    emit: Emit
    stream: bool
    rng: random.Random | None
    deadline: float | None
    submitted: float
    prompt_logprobs: int | None = None  # top alternatives per prompt token (echo scoring)
    score_only: bool = False  # max_tokens 0: score the prompt, generate nothing
    ticket: Ticket | None = None
    prefilled: int = 0  # prompt tokens in the cache
    length: int = 0  # tokens in the cache (prompt + fed replies)
    next_token: int | None = None  # sampled, not yet fed
    last_emit: float = 0.0
    scored: list[TokenLogprob | None] = field(default_factory=list)
    ended: bool = False  # its last event (Finished or an error) is sent: nothing follows it
    uniform: float | None = None  # this step's draw from rng, kept until the step is applied

    @property
    def decoding(self) -> bool:
        return self.next_token is not None

    @property
    def cancelled(self) -> bool:
        return self.ticket is not None and self.ticket.cancelled


# --------------------------------------------------------------------------- the engine


class ServingEngine:
    """Continuous batching over a :class:`ChatEngine`'s model and tokenizer (see module docstring)."""

    def __init__(
        self,
        chat: ChatEngine,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        prefill_chunk: int = 512,
        timeout_s: float | None = 600.0,
        observer: Observer | None = None,
        after_step: Callable[[], None] | None = None,
        thread: bool = True,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.chat, self.model = chat, chat.model
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.timeout_s = timeout_s
        self.observer: Observer = observer or NullObserver()
        self.after_step = after_step  # called on the engine thread after every iteration
        self.block_size = self.model.config.block_size
        self.vocab_size = self.model.config.vocab_size
        self.device = chat.device
        self.cache = self.model.new_slot_cache(max_batch)
        self._seen: Tensor | None = None  # bool [slots, V]: prompt + reply tokens (repetition penalty)
        self._counts: Tensor | None = None  # [slots, V]: reply token counts (presence/frequency)
        self._rows: list[_Row] = []  # slot i holds _rows[i]
        self._prefilling: deque[_Row] = deque()
        self._waiting: deque[_Row] = deque()
        self._knobs: tuple[tuple[int, ...], rowwise.RowKnobs] | None = None
        self._cv = threading.Condition()
        self._closing = False
        self._grace_deadline: float | None = None
        self._entropy = random.SystemRandom()
        self.stats = {"steps": 0, "prefill_chunks": 0, "tokens": 0, "rows": 0, "largest_batch": 0}
        self._thread: threading.Thread | None = None
        if thread:  # else the owner drives ``iterate()`` (the engine process does, between messages)
            self._thread = threading.Thread(target=self._run, name="lmforge-serving", daemon=True)
            self._thread.start()

    # ---- client side (any thread) ------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Ready: the loop runs and takes requests."""
        return (self._thread is None or self._thread.is_alive()) and not self._closing

    @property
    def live(self) -> bool:
        """False once the loop's thread died (nothing in this process restarts it)."""
        return self._thread is None or self._thread.is_alive() or self._closing

    @property
    def state(self) -> str:
        return "closing" if self._closing else "running" if self.live else "failed"

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def in_flight(self) -> int:
        """Rows submitted and not yet ended."""
        return len(self._waiting) + len(self._rows)

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        emit: Emit,
        *,
        chat: bool,
        stream: bool = False,
        n: int = 1,
        prompt_logprobs: int | None = None,
        score_only: bool = False,
    ) -> Ticket:
        """Queue ``n`` rows (choices) for one prompt; events reach ``emit(index, event)``.

        Raises :class:`QueueFull` when the queue cannot take ``n`` more rows, :class:`EngineClosed`
        when shutting down, ``ValueError`` for a prompt that cannot run (checked here, not later).
        """
        prompt = check_request(prompt, params, self.block_size, self.vocab_size, score_only=score_only)
        params = self.chat.with_stops(params, chat)
        budget = min(params.max_new_tokens, self.block_size - len(prompt))
        now, ticket = time.monotonic(), Ticket()
        deadline = now + self.timeout_s if self.timeout_s else None
        rows = [
            _Row(
                index=i,
                prompt=prompt,
                params=params,
                seq=_Sequence(budget, params, self.chat.decode, stream or bool(params.stop_strings)),
                emit=emit,
                stream=stream,
                rng=self._rng(params, i),
                deadline=deadline,
                submitted=now,
                prompt_logprobs=prompt_logprobs,
                score_only=score_only,
                ticket=ticket,
            )
            for i in range(n)
        ]
        with self._cv:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            # Rows that a free slot takes at the next step are not queued: the bound is on the rest.
            free = self.max_batch - len(self._rows)
            if len(self._waiting) + n > self.max_queue + free:
                self.observer.error(QueueFull.kind)
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.extend(rows)
            self._cv.notify()
        return ticket

    def _rng(self, params: SamplingParams, index: int) -> random.Random | None:
        """The row's own generator (Mersenne Twister: the same draws on every platform; seeding
        from a string is a SHA-512, microseconds, where numpy's SeedSequence takes a millisecond)."""
        if params.greedy:
            return None
        if params.seed is None:
            return random.Random(self._entropy.getrandbits(64))
        return rowwise.row_generator(params.seed, index)  # choice i of a seed: always the same draws

    def close(self, grace_s: float = 10.0) -> None:
        """Stop taking requests, fail the waiting ones, let running rows finish for up to ``grace_s``
        seconds, then end the rest with :class:`EngineClosed`."""
        with self._cv:
            self._closing = True
            self._grace_deadline = time.monotonic() + grace_s
            waiting, self._waiting = list(self._waiting), deque()
            self._cv.notify()
        for row in waiting:
            self._fail(row, EngineClosed("the server is shutting down; the request was not started"))
        if self._thread is not None:
            self._thread.join(grace_s + 5)

    # ---- the loop (engine thread) ------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while self.iterate(block=True):
                pass

    def iterate(self, block: bool = False) -> bool:
        """One scheduler iteration: admit, prefill a chunk, decode a step, send events. Returns False
        once closed and drained. ``block`` waits for work when idle. The engine's own thread calls
        this; with ``thread=False`` the owner does (from one thread, inside ``torch.inference_mode``).

        Nothing a request carries can stop the loop: an exception in one row's work fails that row
        alone (:meth:`_isolate`); only one that escapes every guard (a bug in the loop itself) fails
        all running rows, and the loop still goes on."""
        with self._cv:
            while block and not self._rows and not self._waiting and not self._closing:
                self._cv.wait()
            if self._closing and not self._rows:
                self._flush()
                return False
            self._admit()
        try:
            self._step()
        except Exception as exc:  # the last resort: fail what runs, keep serving
            log.exception("engine step failed")
            for row in list(self._rows):
                self._fail(row, GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"))
            self._rows.clear()
            self._prefilling.clear()
            self._knobs = None
        if self._closing and self._grace_deadline and time.monotonic() > self._grace_deadline:
            for row in self._rows:
                self._fail(row, EngineClosed("the server shut down before this reply finished"))
            self._rows.clear()
            self._flush()
            return False
        self._flush()
        return True

    @property
    def idle(self) -> bool:
        return not self._rows and not self._waiting

    def _flush(self) -> None:
        if self.after_step is not None:
            self.after_step()

    def _admit(self) -> None:
        """Move waiting rows into free slots (under the lock)."""
        now = time.monotonic()
        while self._waiting and len(self._rows) < self.max_batch:
            row = self._waiting.popleft()
            if row.cancelled:
                self._fail(row, Cancelled("cancelled while waiting"))
                continue
            if row.deadline is not None and now > row.deadline:
                self._fail(row, RequestTimeout("timed out waiting for a free slot"))
                continue
            slot = len(self._rows)
            self._rows.append(row)
            self._prefilling.append(row)
            self.stats["rows"] += 1
            try:
                if row.params.repetition_penalty != 1.0:
                    seen = self._buffer("_seen", torch.bool)
                    seen[slot] = False
                    seen[slot, torch.tensor(row.prompt, device=self.device)] = True
                if row.params.presence_penalty or row.params.frequency_penalty:
                    self._buffer("_counts", torch.float32)[slot] = 0
            except Exception as exc:
                self._fail_row(row, exc, "admitting")

    def _buffer(self, name: str, dtype: torch.dtype) -> Tensor:
        buf = getattr(self, name)
        if buf is None:
            buf = torch.zeros(self.max_batch, self.vocab_size, dtype=dtype, device=self.device)
            setattr(self, name, buf)
        return buf

    def _step(self) -> None:
        self._drop_dead()
        self._compact()
        if self._prefilling:
            self._prefill()
            # Rows done in their prefill (a scored prompt, a one-token reply) leave before the decode
            # step: a scored prompt may fill the context, leaving no position for a dummy decode token.
            self._compact()
            self._flush()  # first tokens out now, not after the decode step (time to first token)
        if any(r.decoding for r in self._rows):
            self._decode()
        self._compact()
        self.observer.load(len(self._waiting), len(self._rows), self.max_batch)

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for row in self._rows:
            if row.seq.finished:
                continue
            if row.cancelled:
                self._fail(row, Cancelled("cancelled during generation"))
                row.seq.finish_reason = "stop"  # freed by _compact
            elif row.deadline is not None and now > row.deadline:
                self._fail(row, RequestTimeout("the request timed out during generation"))
                row.seq.finish_reason = "length"

    # ---- guards -------------------------------------------------------------------------
    def _isolate(
        self,
        what: str,
        items: list,
        compute: Callable[[list], Any],
        apply: Callable[[list, Any], None],
        row_of: Callable[[Any], _Row] = lambda item: item,
    ) -> None:
        """``apply(items, compute(items))``. ``compute`` changes no row's state (the forward pass only
        writes cache positions that a retry writes again with the same values); ``apply`` guards each
        row itself. If ``compute`` raises for the batch, each item is computed alone, so a row whose
        work raises fails by itself (:class:`GenerationFailed`) and the others go on."""
        try:
            result = compute(items)
        except Exception as exc:
            if len(items) == 1:
                self._fail_row(row_of(items[0]), exc, what)
                return
            log.warning(
                "%s %d rows together failed (%s: %s); retrying one by one",
                what,
                len(items),
                type(exc).__name__,
                exc,
            )
        else:
            apply(items, result)
            return
        for item in items:
            try:
                result = compute([item])
            except Exception as exc:
                self._fail_row(row_of(item), exc, what)
                continue
            apply([item], result)

    def _fail_row(self, row: _Row, exc: BaseException, what: str) -> None:
        """End one row with :class:`GenerationFailed` naming the cause; its slot is freed by _compact."""
        log.error(
            "%s a request failed (prompt of %d tokens, %s): %s: %s",
            what,
            len(row.prompt),
            row.params,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self._fail(
            row, GenerationFailed(f"generation failed while {what} this request: {type(exc).__name__}: {exc}")
        )
        if row.seq.finish_reason is None:
            row.seq.finish_reason = "stop"  # freed by _compact
        row.next_token = None
        if row in self._prefilling:
            self._prefilling.remove(row)

    # ---- prefill ------------------------------------------------------------------------
    def _prefill(self) -> None:
        """One chunk: up to ``prefill_chunk`` prompt tokens of the oldest prefilling rows."""
        budget, batch = self.prefill_chunk, []
        for row in self._prefilling:
            if budget == 0:
                break
            take = min(len(row.prompt) - row.prefilled, budget)
            batch.append((row, take))
            budget -= take
        self._isolate(
            "prefilling", batch, self._prefill_forward, self._prefilled, row_of=lambda item: item[0]
        )

    def _prefill_forward(self, batch: list[tuple[_Row, int]]) -> tuple[Tensor, Tensor | None]:
        """The chunk's forward pass: each row's last logits, and all positions' when a row scores."""
        T = max(take for _, take in batch)
        pad, limit = self.chat.tok.pad_id, self.block_size - 1
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

    def _prefilled(self, batch: list[tuple[_Row, int]], out: tuple[Tensor, Tensor | None]) -> None:
        """Each row's bookkeeping after its chunk; rows whose prompt is complete sample a first token."""
        logits, all_logits = out
        self.stats["prefill_chunks"] += 1
        done, done_logits = [], []
        for i, (row, take) in enumerate(batch):
            try:
                if row.prompt_logprobs is not None and all_logits is not None:
                    self._score_prompt(row, all_logits[i, :take])
                row.prefilled += take
                row.length = row.prefilled
                if row.prefilled == len(row.prompt):
                    self._prefilling.remove(row)
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

    def _score_prompt(self, row: _Row, logits: Tensor) -> None:
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
        rows, pad = self._rows, self.chat.tok.pad_id
        slots = list(range(len(rows))) if together else live
        idx = [[rows[s].next_token if rows[s].decoding else pad] for s in slots]
        positions = torch.tensor([[rows[s].length] for s in slots], device=self.device)
        which = len(rows) if together else torch.tensor(slots, device=self.device)
        view = self.cache.rows(which, positions, int(positions.max()) + 1)
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

    def _sample(self, rows: list[_Row], logits: Tensor, slots: Tensor | None) -> None:
        """Sample one token for each row (``slots``: their slot indices; None = the first len(rows)).
        Never raises: a row whose sampling fails ends alone with :class:`GenerationFailed`."""
        at = torch.arange(len(rows), device=self.device) if slots is None else slots

        def compute(part: list[_Row]) -> tuple:
            if part is rows:
                return self._draw(part, logits, at, slots is None)
            i = rows.index(part[0])  # a retry, row by row (rare): rows compare by identity
            return self._draw(part, logits[i : i + 1], at[i : i + 1], False)

        def apply(part: list[_Row], out: tuple) -> None:
            knobs, where, tokens, lps, tops = out
            for r in part:
                r.uniform = None  # used: the next step draws a new one
            if self._seen is not None and knobs.use_repetition:
                self._seen[where, tokens] = True
            if self._counts is not None and knobs.use_counts:
                self._counts[where, tokens] += 1
            self._advance(part, tokens.tolist(), lps, tops)

        self._isolate("sampling", rows, compute, apply)

    def _draw(self, rows: list[_Row], logits: Tensor, at: Tensor, cacheable: bool) -> tuple:
        """The rows' next tokens and log-probabilities. Changes no state: a row's uniform for this
        step is drawn once and kept until the step is applied, so a retry draws the same number."""
        knobs = self._knobs_for(rows, cacheable)

        def state(buf: Tensor | None) -> Tensor | None:
            return None if buf is None else buf[at]

        processed = rowwise.process(logits, knobs, state(self._seen), state(self._counts))
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

    def _knobs_for(self, rows: list[_Row], cacheable: bool) -> rowwise.RowKnobs:
        key = tuple(id(r) for r in rows)
        if cacheable and self._knobs is not None and self._knobs[0] == key:
            return self._knobs[1]
        knobs = rowwise.RowKnobs.of([r.params for r in rows], self.vocab_size, self.device)
        if cacheable:
            self._knobs = (key, knobs)
        return knobs

    def _advance(self, rows: list[_Row], tokens: list[int], lps: list, tops: list) -> None:
        now = time.monotonic()
        observer = self.observer
        for row, token, lp, top in zip(rows, tokens, lps, tops, strict=True):
            if row.seq.finished:
                continue
            try:
                first = not row.seq.tokens and row.last_emit == 0.0
                chunk = row.seq.push(token, lp, top)
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

    # ---- leaving ------------------------------------------------------------------------
    def _finish(self, row: _Row) -> None:
        result = Finished(
            row.index, row.seq.result(), row.scored if row.prompt_logprobs is not None else None
        )
        self._send(row, result)

    def _send(self, row: _Row, event: Event) -> None:
        if row.ended:
            return  # a row's last event is its last
        if isinstance(event, Finished | EngineError):
            row.ended = True
        try:
            row.emit(row.index, event)
        except Exception:  # the listener is gone (closed event loop): drop the row
            if row.ticket is not None:
                row.ticket.cancel()

    def _fail(self, row: _Row, error: EngineError) -> None:
        if row.ended:
            return
        self.observer.error(error.kind)
        self._send(row, error)

    def _compact(self) -> None:
        """Free finished rows' slots: the last row moves into each hole."""
        rows = self._rows
        holes = [i for i, r in enumerate(rows) if r.seq.finished]
        if not holes:
            return
        for hole in reversed(holes):
            last = len(rows) - 1
            if hole != last:
                moved = rows[last]
                self.cache.move(last, hole, moved.length)
                for buf in (self._seen, self._counts):
                    if buf is not None:
                        buf[hole] = buf[last]
                rows[hole] = moved
            rows.pop()
        for row in [r for r in self._prefilling if r.seq.finished]:
            self._prefilling.remove(row)
        self._knobs = None
