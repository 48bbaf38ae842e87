"""A continuous-batching engine: one decode loop over a running batch of independent requests.

Scheduling follows vLLM and TGI:

* one thread owns the model and runs the loop; requests wait in a bounded FIFO queue
  (``max_queue`` rows; past it :class:`QueueFull`) until a KV slot is free (``max_batch`` slots,
  preallocated at the model's context length, :class:`lmforge.kv_cache.SlotKVCache`);
* every iteration admits waiting requests into free slots, runs **one prefill chunk** (at most
  ``prefill_chunk`` prompt tokens, several prompts right-padded into one forward), then **one
  decode step** for every running row. A long prompt is prefilled over several iterations while
  running streams keep getting a token per iteration: prefill and decode never starve each other;
* each row has its own sampling parameters (temperature, top-k/p, min-p, penalties, logit_bias,
  stops, logprobs, max tokens, applied row-wise by :mod:`lmforge.generation.logits`) and its own random
  generator: a seeded request draws the same numbers whatever else shares its batch;
* a finished, cancelled or timed-out row leaves at once: its slot is refilled by moving the last
  row into it (compaction), so the decode batch is always the first ``running`` slots;
* streaming and non-streaming rows share the loop; only their events differ;
* with ``prefix_cache_mb`` set, prompts that share a prefix reuse its keys and values (automatic
  prefix caching, :mod:`lmforge.generation.prefix_cache`): at a row's first prefill chunk the cached
  blocks its prompt starts with are copied into its slot, and it prefills only the rest.

Events go to each request's ``emit`` callback, called on the engine thread: a
:class:`~lmforge.generation.outputs.StreamChunk` per token for streaming rows, then a :class:`Finished`,
or an :class:`EngineError` (timeout, shutdown, failure). :mod:`lmforge.serving.aio` turns them
into awaitables for an asyncio server. Core module: torch and the standard library.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lmforge.generation import logits as rowwise
from lmforge.generation.interface import (
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
    Request,
    RequestTimeout,
    Ticket,
    check_request,
)
from lmforge.generation.prefix_cache import DEFAULT_BLOCK, PrefixCache
from lmforge.generation.reply import Reply
from lmforge.generation.sampling_params import SamplingParams
from lmforge.generation.steps import Front, Row, Steps

log = logging.getLogger("lmforge.serving")

# --------------------------------------------------------------------------- the engine


class ServingEngine(Steps):
    """Continuous batching over a front's model (a :class:`~lmforge.generation.chat.ChatEngine`, or a
    bare model's :class:`~lmforge.generation.driver.ModelFront`); see the module docstring.

    ``max_len`` caps each slot's cache (default: the model's context), for a caller that knows its
    rows never grow past it (:func:`lmforge.generation.driver.generate` does).

    ``prefix_cache_mb`` > 0 turns on automatic prefix caching
    (:mod:`lmforge.generation.prefix_cache`): full ``prefix_block``-token blocks of prefilled prompts
    are kept within that many MiB, and a prompt that starts with cached blocks copies them into its
    slot and prefills only the rest. Off by default here (a one-off batch gains nothing); the
    service turns it on (LMFORGE_PREFIX_CACHE_MB)."""

    def __init__(
        self,
        front: Front,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        prefill_chunk: int = 512,
        timeout_s: float | None = 600.0,
        observer: Observer | None = None,
        after_step: Callable[[], None] | None = None,
        thread: bool = True,
        max_len: int | None = None,
        prefix_cache_mb: float = 0.0,
        prefix_block: int = DEFAULT_BLOCK,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        if prefix_cache_mb < 0 or prefix_block < 1:
            raise ValueError("prefix_cache_mb must be >= 0 and prefix_block >= 1")
        self.front, self.model = front, front.model
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.timeout_s = timeout_s
        self.observer: Observer = observer or NullObserver()
        self.after_step = after_step  # called on the engine thread after every iteration
        self.block_size = self.model.config.block_size
        self.vocab_size = self.model.config.vocab_size
        self.device = front.device
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.max_len = min(max_len or self.block_size, self.block_size)
        self.cache = self.model.new_slot_cache(max_batch, self.max_len)
        store = PrefixCache.for_cache(self.cache, budget_mb=prefix_cache_mb, block=prefix_block)
        self.prefix_cache: PrefixCache | None = store if store.enabled else None
        self._seen: Tensor | None = None  # bool [slots, V]: prompt + reply tokens (repetition penalty)
        self._counts: Tensor | None = None  # [slots, V]: reply token counts (presence/frequency)
        self._rows: list[Row] = []  # slot i holds _rows[i]
        self._prefilling: deque[Row] = deque()
        self._waiting: deque[Row] = deque()
        self._knobs: tuple[tuple[int, ...], rowwise.RowKnobs] | None = None
        self._cv = threading.Condition()
        self._closing = False
        self._grace_deadline: float | None = None
        self._entropy = random.SystemRandom()
        self.stats = {
            "steps": 0,
            "prefill_chunks": 0,
            "prefill_tokens": 0,  # prompt tokens run through the model (not those the prefix cache gave)
            "tokens": 0,
            "rows": 0,
            "largest_batch": 0,
            # prefix cache: prompt tokens looked up, and those reused (hit rate = hit / queried)
            "prefix_cache_queried_tokens": 0,
            "prefix_cache_hit_tokens": 0,
            "prefix_cache_blocks": 0,
            "prefix_cache_bytes": 0,
            "prefix_cache_evictions": 0,
        }
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
        request: Request,
        emit: Emit,
    ) -> Ticket:
        """Queue ``request.n`` rows (choices) for one prompt; events reach ``emit(index, event)``.

        Choice ``i`` of a seeded request draws from the seed rule's stream ``request.seed_index + i``
        (:func:`lmforge.generation.logits.row_generator`): the same numbers whatever shares its batch.

        Raises :class:`QueueFull` when the queue cannot take ``n`` more rows, :class:`EngineClosed`
        when shutting down, ``ValueError`` for a prompt that cannot run (checked here, not later).
        """
        prompt = check_request(request, self.max_len, self.vocab_size)
        n, stream = request.n, request.stream
        params = self.front.with_stops(request.params, request.chat)
        budget = min(params.max_new_tokens, self.max_len - len(prompt))
        now, ticket = time.monotonic(), Ticket()
        deadline = now + self.timeout_s if self.timeout_s else None
        matchers = [self._matcher(request, params) for _ in range(n)]
        rows = [
            Row(
                index=i,
                prompt=prompt,
                params=params,
                seq=Reply(budget, params, self.front.decode, stream or bool(params.stop_strings)),
                emit=emit,
                stream=stream,
                rng=self._rng(params, request.seed_index + i),
                deadline=deadline,
                submitted=now,
                prompt_logprobs=request.prompt_logprobs,
                score_only=request.score_only,
                ticket=ticket,
                matcher=matchers[i],
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

    def _matcher(self, request: Request, params: SamplingParams) -> Any:
        """The row's own grammar matcher, or None for a free reply (``ValueError`` when the front
        cannot constrain: a bare model has no tokenizer)."""
        if request.constraint is None:
            return None
        grammars = getattr(self.front, "grammars", None)
        if grammars is None:
            raise ValueError("a constrained reply needs a tokenizer; this engine serves token ids only")
        return grammars.matcher(request.constraint, params.stop_token_ids)

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
        row_of: Callable[[Any], Row] = lambda item: item,
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

    def _fail_row(self, row: Row, exc: BaseException, what: str) -> None:
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

    # ---- leaving ------------------------------------------------------------------------
    def _finish(self, row: Row) -> None:
        result = Finished(
            row.index, row.seq.result(), row.scored if row.prompt_logprobs is not None else None
        )
        self._send(row, result)

    def _send(self, row: Row, event: Event) -> None:
        if row.ended:
            return  # a row's last event is its last
        if isinstance(event, Finished | EngineError):
            row.ended = True
        try:
            row.emit(row.index, event)
        except Exception:  # the listener is gone (closed event loop): drop the row
            if row.ticket is not None:
                row.ticket.cancel()

    def _fail(self, row: Row, error: EngineError) -> None:
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
