"""The continuous-batching engine (lmforge.serving): batching never changes a row's output, chunked
prefill interleaves with decode, cancel/queue/timeout/close semantics, prompt scoring, n > 1 choices,
extreme sampling knobs, and the asyncio helpers.

Everything runs in-process on a tiny model (block_size 64) with a tiny BPE tokenizer, as
tests/test_service.py builds them. Tests that need an exact interleaving do not sleep and hope: an
``emit`` callback runs on the engine thread, so blocking it (or submitting from it) pins the engine
at a known point of its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from conftest import tiny_gpt
from lmforge.generation.chat import ChatEngine
from lmforge.generation.engine import ServingEngine
from lmforge.generation.interface import (
    EngineClosed,
    EngineError,
    Finished,
    NullObserver,
    QueueFull,
    Request,
    RequestTimeout,
)
from lmforge.generation.outputs import Generation, StreamChunk
from lmforge.generation.sampling_params import SamplingParams
from lmforge.serving import aio
from lmforge.tokenizer import ChatTokenizer, train_bpe
from test_service import CORPUS  # the same tiny corpus as the HTTP tests

BLOCK = 64
WAIT_S = 20.0  # generous upper bound for anything that should take milliseconds


# --------------------------------------------------------------------------- model, tokenizer, engines


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer(train_bpe(CORPUS, vocab_size=300))


def _chat_engine(tok: ChatTokenizer, *, tied: bool) -> ChatEngine:
    model = tiny_gpt(tok.vocab_size, block_size=BLOCK, n_head=2, n_kv_head=2, tie_embeddings=tied).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(5.0)  # sharper logits: no near-ties between greedy paths
        if not tied:
            model.lm_head.weight.mul_(20.0)  # an untied head starts near zero; spread its logits too
    return ChatEngine(model, tok)


@pytest.fixture(scope="module")
def chat(tok) -> ChatEngine:
    """Untied embeddings: greedy replies vary from token to token (a tied tiny model repeats its input)."""
    return _chat_engine(tok, tied=False)


@pytest.fixture(scope="module")
def looping_chat(tok) -> ChatEngine:
    """Tied embeddings, sharpened: greedy repeats the last prompt token forever (for the penalties)."""
    return _chat_engine(tok, tied=True)


@pytest.fixture
def make_engine(chat) -> Iterator[Callable[..., ServingEngine]]:
    """``make_engine(**kwargs)`` -> a ServingEngine over ``chat`` (or ``chat=``); all closed at teardown."""
    engines: list[ServingEngine] = []

    def make(*, over: ChatEngine | None = None, **kwargs) -> ServingEngine:
        engine = ServingEngine(over or chat, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close(grace_s=1.0)
        assert thread_done(engine)


def thread_done(engine: ServingEngine) -> bool:
    """The engine's own thread has exited (after close)."""
    thread = getattr(engine, "_thread", None)
    return thread is None or not thread.is_alive()


class Rec:
    """An ``emit`` callback that records every event of a request's ``n`` rows."""

    def __init__(self, n: int = 1, on_event: Callable[[int, object], None] | None = None) -> None:
        self.events: list[list[object]] = [[] for _ in range(n)]
        self.final: list[Finished | EngineError | None] = [None] * n
        self.extra: list[object] = []  # terminal events after a row's first: a protocol violation
        self.done = threading.Event()
        self.on_event = on_event

    def __call__(self, index: int, event: object) -> None:
        self.events[index].append(event)
        if isinstance(event, Finished | EngineError):
            if self.final[index] is not None:
                self.extra.append(event)
                return
            self.final[index] = event
            if all(f is not None for f in self.final):
                self.done.set()
        if self.on_event is not None:
            self.on_event(index, event)

    def wait(self) -> list[Finished | EngineError]:
        assert self.done.wait(WAIT_S), f"no terminal event within {WAIT_S}s: {self.final}"
        assert not self.extra, f"terminal events after the last one: {self.extra}"
        return [f for f in self.final if f is not None]

    def generations(self) -> list[Generation]:
        finals = self.wait()
        for f in finals:
            assert isinstance(f, Finished), f
        return [f.generation for f in finals]  # type: ignore[union-attr]

    def chunks(self, index: int = 0) -> list[StreamChunk]:
        return [e for e in self.events[index] if isinstance(e, StreamChunk)]


def run(engine: ServingEngine, prompt, params: SamplingParams, *, chat: bool = False, **kw) -> Rec:
    rec = Rec(kw.get("n", 1))
    engine.submit(Request(prompt, params, chat=chat, **kw), rec)
    return rec


def greedy(max_new_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kw)


@torch.inference_mode()
def static(chat: ChatEngine, prompt: list[int], params: SamplingParams, is_chat: bool = False) -> Generation:
    """The reference, written apart from the engine: the whole sequence through ``GPT.forward`` (no
    KV cache, no batching, no chunks) at every step, the logits processed and drawn by
    :mod:`lmforge.generation.logits` (the seed rule's stream 0), the reply's stops and text kept by
    :class:`lmforge.generation.reply.Reply`."""
    from lmforge.generation import logits as rowwise
    from lmforge.generation.reply import Reply

    params = chat.with_stops(params, is_chat)
    model, V = chat.model, chat.model.config.vocab_size
    reply = Reply(
        min(params.max_new_tokens, model.config.block_size - len(prompt)), params, chat.decode, True
    )
    knobs = rowwise.RowKnobs.of([params], V, chat.device)
    rng = None if params.greedy or params.seed is None else rowwise.row_generator(params.seed, 0)
    ids, counts = list(prompt), torch.zeros(1, V)
    while not reply.finished:
        logits = model(torch.tensor([ids]))[:, -1].float()
        processed = rowwise.process(logits, knobs, rowwise.presence_mask(torch.tensor([ids]), V), counts)
        uniforms = None if knobs.all_greedy else torch.tensor([rng.random()], dtype=torch.float64)
        token = int(rowwise.draw(processed, knobs, uniforms)[0])
        logp = processed.log_softmax(-1)[0]
        top = None
        if params.logprobs is not None:
            values, indices = logp.topk(min(params.logprobs, V))
            top = [
                (t, v) for t, v in zip(indices.tolist(), values.tolist(), strict=True) if v != float("-inf")
            ]
        reply.push(token, float(logp[token]) if params.logprobs is not None else None, top)
        ids.append(token)
        counts[0, token] += 1
    return reply.result()


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def valid_reply(gen: Generation, chat: ChatEngine, params: SamplingParams, is_chat: bool = False) -> None:
    stops = set(chat.tok.stop_ids(is_chat))
    assert gen.finish_reason in ("stop", "length")
    assert len(gen.token_ids) <= params.max_new_tokens
    assert all(0 <= t < chat.model.config.vocab_size and t not in stops for t in gen.token_ids)
    if gen.finish_reason == "length":
        assert len(gen.token_ids) == params.max_new_tokens
    for lp in gen.logprobs or []:
        assert math.isfinite(lp) and lp <= 0
    for top in gen.top_logprobs or []:
        assert all(math.isfinite(v) and v <= 0 for _, v in top)


def text_prompt(chat: ChatEngine, n_tokens: int) -> list[int]:
    """A raw-text prompt of exactly ``n_tokens`` tokens (BOS + corpus text)."""
    ids = chat.prompt_ids(" ".join(CORPUS[:6]))
    assert len(ids) >= n_tokens
    return ids[:n_tokens]


def chat_prompt(chat: ChatEngine, text: str) -> list[int]:
    return chat.chat_ids([{"role": "user", "content": text}])


class LoadObserver(NullObserver):
    """Records the largest waiting queue and running batch the engine reported."""

    def __init__(self) -> None:
        self.max_waiting = self.max_running = 0
        self.errors: list[str] = []

    def error(self, kind: str) -> None:
        self.errors.append(kind)

    def load(self, waiting: int, running: int, slots: int) -> None:
        self.max_waiting = max(self.max_waiting, waiting)
        self.max_running = max(self.max_running, running)


# --------------------------------------------------------------------------- 1. batching is invisible


def _mixed_requests(chat: ChatEngine) -> list[tuple[list[int], SamplingParams, bool, bool]]:
    """32 different requests: (prompt, params, chat, stream); prompts of 2..40 tokens."""
    V = chat.model.config.vocab_size
    bias_token = chat.tok.encode(" fox")[-1]
    knob_sets = [
        dict(temperature=0.9, top_p=0.9, seed=11),
        dict(temperature=1.3, top_k=20, seed=12),
        dict(temperature=0.7, min_p=0.05, seed=13),
        dict(temperature=0.0),
        dict(temperature=1.0, repetition_penalty=1.4, presence_penalty=0.8, frequency_penalty=0.5, seed=14),
        dict(temperature=1.0, logit_bias={bias_token: 3.0, 7: -100.0}, seed=15),
        dict(temperature=0.8),  # unseeded: runs beside the others, not compared
        dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=1.0, logit_bias={V - 1: 4.0}),
        dict(temperature=1.1, top_k=40, top_p=0.8, min_p=0.02, presence_penalty=-0.5, seed=16, logprobs=2),
        dict(temperature=0.5, top_p=0.97, seed=None),  # unseeded
        dict(temperature=2.0, seed=17, logprobs=0),
    ]
    out = []
    for i in range(32):
        knobs = knob_sets[i % len(knob_sets)]
        if i % 3 == 2:
            prompt, is_chat = chat_prompt(chat, CORPUS[i % 5][: 5 + 3 * i]), True
        else:
            prompt, is_chat = text_prompt(chat, 2 + (i * 7) % 39), False
        params = SamplingParams(max_new_tokens=4 + i % 9, **knobs)
        out.append((prompt, params, is_chat, i % 2 == 0))
    return out


def test_seeded_rows_are_unchanged_by_what_shares_their_batch(make_engine, chat):
    requests = _mixed_requests(chat)
    deterministic = [i for i, (_, p, _, _) in enumerate(requests) if p.greedy or p.seed is not None]
    assert len(deterministic) >= 24 and sum(p.seed is not None for _, p, _, _ in requests) >= 16

    # Alone: one request at a time in an engine of its own.
    solo_engine = make_engine(max_batch=1, prefill_chunk=512)
    alone: dict[int, Generation] = {}
    for i in deterministic:
        prompt, params, is_chat, stream = requests[i]
        alone[i] = run(solo_engine, prompt, params, chat=is_chat, stream=stream).generations()[0]
        valid_reply(alone[i], chat, params, is_chat)

    # Mixed: all 32 at once, 6 slots (the rest wait in the queue), prompts prefilled 16 tokens a chunk.
    observer = LoadObserver()
    engine = make_engine(max_batch=6, max_queue=64, prefill_chunk=16, observer=observer)
    recs = [run(engine, p, params, chat=c, stream=s) for p, params, c, s in requests]
    mixed = [rec.generations()[0] for rec in recs]

    for i in deterministic:
        assert mixed[i].token_ids == alone[i].token_ids, f"request {i}: {requests[i][1]}"
        assert mixed[i].text == alone[i].text
        assert mixed[i].finish_reason == alone[i].finish_reason
        if requests[i][1].logprobs is not None:
            assert mixed[i].logprobs == pytest.approx(alone[i].logprobs, abs=1e-4)
    for i, (_, params, is_chat, stream) in enumerate(requests):
        valid_reply(mixed[i], chat, params, is_chat)
        if stream:  # streamed token ids are the reply's (no stop strings here)
            ids = [c.token_id for c in recs[i].chunks() if c.token_id is not None]
            assert ids == mixed[i].token_ids
            assert "".join(c.text or "" for c in recs[i].chunks()) == mixed[i].text
        else:
            assert recs[i].chunks() == []
    # It really was a crowd: every slot taken, rows decoding together, and a queue.
    assert observer.max_running == 6 and engine.stats["largest_batch"] > 1
    assert observer.max_waiting > 0
    assert engine.stats["rows"] == 32
    wait_until(lambda: engine.running == 0 and engine.waiting == 0, "the engine is idle")
    # Seeds matter: the sampled rows are not all their greedy replies.
    sampled = [i for i in deterministic if requests[i][1].temperature >= 0.9]
    assert any(
        alone[i].token_ids
        != static(chat, requests[i][0], greedy(requests[i][1].max_new_tokens), requests[i][2]).token_ids
        for i in sampled
    )


# --------------------------------------------------------------------------- 2. greedy == the cache-free reference


def test_greedy_stream_equals_reply_and_static_sampler(make_engine, chat):
    engine = make_engine(max_batch=4, prefill_chunk=8)
    prompts = [(text_prompt(chat, n), False) for n in (2, 7, 19, 33, 45)]
    prompts.append((chat_prompt(chat, "What is your name?"), True))
    V = chat.model.config.vocab_size
    param_sets = [
        greedy(14),
        greedy(10, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.7),
        greedy(10, logit_bias={V - 2: 2.5, 9: -5.0}, logprobs=3),
    ]
    for params in param_sets:
        streamed = [run(engine, p, params, chat=c, stream=True) for p, c in prompts]
        plain = [run(engine, p, params, chat=c) for p, c in prompts]
        for (prompt, is_chat), s, r in zip(prompts, streamed, plain, strict=True):
            ref = static(chat, prompt, params, is_chat)
            gen_s, gen_r = s.generations()[0], r.generations()[0]
            assert gen_r.token_ids == ref.token_ids, (len(prompt), params)
            assert gen_r.text == ref.text and gen_r.finish_reason == ref.finish_reason
            assert gen_s.token_ids == gen_r.token_ids and gen_s.text == gen_r.text
            chunks = s.chunks()
            assert "".join(c.text or "" for c in chunks) == gen_r.text
            assert [c.token_id for c in chunks if c.token_id is not None] == gen_r.token_ids
            assert chunks[-1].finish_reason == gen_r.finish_reason
            assert all(c.finish_reason is None for c in chunks[:-1])
            if params.logprobs is not None:
                assert gen_r.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
                assert [[t for t, _ in top] for top in gen_r.top_logprobs] == [
                    [t for t, _ in top] for top in ref.top_logprobs
                ]
                streamed_lps = [c.logprob for c in chunks if c.token_id is not None]
                assert streamed_lps == gen_s.logprobs
                assert streamed_lps == pytest.approx(gen_r.logprobs, abs=1e-4)
    # The replies are not trivial: the tiny model says different things to different prompts.
    replies = {tuple(static(chat, p, greedy(14), c).token_ids) for p, c in prompts}
    assert len(replies) == len(prompts)


# --------------------------------------------------------------------------- 3. cancel frees the slot


def test_cancelled_stream_frees_its_slot(make_engine, chat):
    engine = make_engine(max_batch=1)
    ticket_ready, tickets = threading.Event(), {}

    def cancel_at_third(index: int, event: object) -> None:
        if isinstance(event, StreamChunk) and len(long.chunks()) == 3:
            ticket_ready.wait(WAIT_S)  # the engine thread waits here until the others are queued
            tickets["long"].cancel()

    long = Rec(on_event=cancel_at_third)
    tickets["long"] = engine.submit(Request(text_prompt(chat, 5), greedy(50), chat=False, stream=True), long)
    queued_prompt = text_prompt(chat, 9)
    queued = run(engine, queued_prompt, greedy(8))
    # A third request, cancelled while it waits: it never runs.
    never = Rec()
    engine.submit(Request(text_prompt(chat, 4), greedy(8), chat=False), never).cancel()
    try:
        wait_until(lambda: len(long.chunks()) == 3, "the long stream has 3 tokens")
        assert engine.waiting == 2 and engine.running == 1  # the engine is held inside the 3rd emit
    finally:
        ticket_ready.set()

    gen = queued.generations()[0]
    # The freed slot held stale keys/values of the cancelled row; the reply is still exactly greedy.
    assert gen.token_ids == static(chat, queued_prompt, greedy(8)).token_ids
    # Cancelled: no token after the cancel, no Finished; at most an error event saying it was cancelled.
    wait_until(lambda: engine.running == 0 and engine.waiting == 0, "the engine is idle")
    assert len(long.chunks()) == 3
    for rec in (long, never):
        assert all(isinstance(e, StreamChunk) for e in rec.events[0][:-1])
        assert not any(isinstance(e, Finished) for e in rec.events[0])
        assert rec.final == [None] or (
            isinstance(rec.final[0], EngineError) and rec.final[0].kind == "cancelled"
        )
    assert not never.chunks()
    assert engine.stats["rows"] == 2  # the long one and the queued one; the cancelled waiter never ran
    # The slot is usable again.
    assert run(engine, queued_prompt, greedy(8)).generations()[0].token_ids == gen.token_ids


# --------------------------------------------------------------------------- 4. a bounded queue


def test_full_queue_raises_queue_full_then_recovers(make_engine, chat):
    observer = LoadObserver()
    engine = make_engine(max_batch=1, max_queue=1, observer=observer)
    release = threading.Event()

    def hold(index: int, event: object) -> None:
        if isinstance(event, StreamChunk) and len(running.chunks()) == 1:
            release.wait(WAIT_S)  # pins the engine: the slot stays busy, the queue stays as it is

    running = Rec(on_event=hold)
    prompt = text_prompt(chat, 6)
    try:
        engine.submit(Request(prompt, greedy(6), chat=False, stream=True), running)
        wait_until(lambda: len(running.chunks()) == 1, "the first request runs")
        waiting = run(engine, prompt, greedy(6))
        assert engine.waiting == 1
        with pytest.raises(QueueFull, match="queue is full") as err:
            engine.submit(Request(prompt, greedy(6), chat=False), Rec())
        assert err.value.kind == "queue_full" and err.value.retry_after_s >= 1
        assert "1 waiting" in str(err.value)
        with pytest.raises(QueueFull):
            engine.submit(Request(prompt, greedy(6), chat=False, n=2), Rec(2))
        assert observer.errors.count("queue_full") == 2
    finally:
        release.set()
    assert running.generations()[0].finish_reason == "length"
    assert waiting.generations()[0].token_ids == running.generations()[0].token_ids
    wait_until(lambda: engine.waiting == 0, "the queue drains")
    # Drained: the queue takes requests again.
    again = run(engine, prompt, greedy(6))
    assert again.generations()[0].token_ids == running.generations()[0].token_ids
    # max_queue=0: nothing can ever wait, but a request a free slot takes at once is not waiting.
    no_queue = make_engine(max_batch=1, max_queue=0)
    no_queue.submit(Request(prompt, greedy(2), chat=False), Rec())
    with pytest.raises(QueueFull):
        no_queue.submit(Request(prompt, greedy(2), chat=False), Rec())  # the slot is taken (or about to be)


def test_invalid_requests_are_rejected_at_submit(make_engine, chat):
    engine = make_engine(max_batch=1)
    with pytest.raises(ValueError, match="context"):
        engine.submit(Request([1] * BLOCK, greedy(2), chat=False), Rec())  # no room for one reply token
    with pytest.raises(ValueError, match="context"):
        engine.submit(Request([], greedy(2), chat=False), Rec())
    with pytest.raises(ValueError, match="token ids"):
        engine.submit(Request([1, chat.model.config.vocab_size], greedy(2), chat=False), Rec())
    with pytest.raises(ValueError, match="logit_bias"):
        engine.submit(Request([1, 2], greedy(2, logit_bias={10_000: 1.0}), chat=False), Rec())
    assert engine.waiting == 0
    with pytest.raises(ValueError):
        ServingEngine(chat, max_batch=0)


# --------------------------------------------------------------------------- 5. extreme knobs


def test_extreme_but_valid_knobs(make_engine, chat):
    engine = make_engine(max_batch=8)
    prompts = [text_prompt(chat, 6), text_prompt(chat, 17), chat_prompt(chat, "A cat")]
    tiny = 5e-324  # the smallest positive float: 0.0 once in float32
    special = chat.tok.special_ids
    forced = chat.tok.encode(" fox")[-1]
    assert forced not in special
    for k, prompt in enumerate(prompts):
        is_chat = k == 2
        ref = static(chat, prompt, greedy(10, logprobs=2), is_chat)
        cases = {
            "rep0_greedy": greedy(10, repetition_penalty=tiny, logprobs=2),
            "rep0_sampled": SamplingParams(max_new_tokens=10, repetition_penalty=tiny, seed=k, logprobs=2),
            "top_p0": SamplingParams(max_new_tokens=10, top_p=tiny, seed=k, logprobs=3),
            "temp1e-6": SamplingParams(max_new_tokens=10, temperature=1e-6, seed=k),
            "temp1e-40": SamplingParams(max_new_tokens=10, temperature=1e-40, seed=k),
            "temp1e-300": SamplingParams(max_new_tokens=10, temperature=1e-300, seed=k),
            "bias+100": SamplingParams(max_new_tokens=10, logit_bias={forced: 100.0}, seed=k),
            "bias+100_greedy": greedy(10, logit_bias={forced: 100.0}),
            "bias-100": greedy(10, logit_bias={ref.token_ids[0]: -100.0}),
            "all_at_once": SamplingParams(
                max_new_tokens=10,
                temperature=1e-6,
                top_k=1,
                top_p=tiny,
                min_p=1.0,
                repetition_penalty=tiny,
                presence_penalty=2.0,
                frequency_penalty=-2.0,
                logit_bias={forced: -100.0, 0: 100.0},
                seed=k,
                logprobs=1,
            ),
        }
        recs = {
            name: run(engine, prompt, params, chat=is_chat, stream=k == 1) for name, params in cases.items()
        }
        got = {name: rec.generations()[0] for name, rec in recs.items()}
        for name, gen in got.items():
            valid_reply(gen, chat, cases[name], is_chat)
            # The cache-free reference survives the same knobs.
            valid_reply(static(chat, prompt, cases[name], is_chat), chat, cases[name], is_chat)

        # top_p at its smallest keeps only the top token: greedy, with logprob 0 and no alternatives.
        assert got["top_p0"].token_ids == ref.token_ids
        assert got["top_p0"].logprobs == [0.0] * len(ref.token_ids)
        assert all(len(top) == 1 for top in got["top_p0"].top_logprobs)
        # A vanishing temperature is greedy, however small (float32 overflow and underflow included).
        for name in ("temp1e-6", "temp1e-40", "temp1e-300"):
            assert got[name].token_ids == ref.token_ids, name
            assert static(chat, prompt, cases[name], is_chat).token_ids == ref.token_ids, name
        # +100 on an ordinary token forces it every step; -100 on the greedy token steers away from it.
        for name in ("bias+100", "bias+100_greedy"):
            assert got[name].token_ids == [forced] * 10 and got[name].finish_reason == "length"
        assert got["bias-100"].token_ids != ref.token_ids
        assert ref.token_ids[0] not in got["bias-100"].token_ids
        # Repetition penalty -> 0 sends every seen positive logit to the float32 maximum: never NaN.
        assert got["rep0_greedy"].token_ids == static(chat, prompt, cases["rep0_greedy"], is_chat).token_ids


def test_presence_and_frequency_penalties_reduce_repeats(make_engine, looping_chat):
    engine = make_engine(over=looping_chat, max_batch=4)
    prompt = looping_chat.prompt_ids("The fox liked to run and")
    plain = greedy(16)
    penalized = greedy(16, presence_penalty=2.0, frequency_penalty=2.0)
    presence_only = greedy(16, presence_penalty=2.0)
    recs = [run(engine, prompt, p) for p in (plain, penalized, presence_only)]
    free, pen, pres = (r.generations()[0] for r in recs)

    def most_repeated(ids: list[int]) -> int:
        return max(ids.count(t) for t in set(ids))

    # This model loops on one token; the penalties break the loop.
    assert len(free.token_ids) == 16 and most_repeated(free.token_ids) == 16
    assert pen.token_ids != free.token_ids and pres.token_ids != free.token_ids
    assert most_repeated(pen.token_ids) < most_repeated(free.token_ids)
    assert len(set(pen.token_ids)) > len(set(free.token_ids))
    assert most_repeated(pres.token_ids) < most_repeated(free.token_ids)
    # ... exactly as the cache-free reference does it.
    for params, gen in ((penalized, pen), (presence_only, pres)):
        assert gen.token_ids == static(looping_chat, prompt, params).token_ids


# --------------------------------------------------------------------------- 6. chunked prefill vs decode


def test_chunked_prefill_does_not_starve_a_running_stream(make_engine, chat):
    engine = make_engine(max_batch=2, prefill_chunk=4)
    long_prompt = text_prompt(chat, 40)  # 10 chunks of 4
    log: list[tuple[str, int]] = []  # (who, prefill chunks run so far), in event order (engine thread)

    def on_stream(index: int, event: object) -> None:
        log.append(("stream", engine.stats["prefill_chunks"]))
        if isinstance(event, StreamChunk) and len(stream.chunks()) == 2:
            # Submitted from the engine thread: it is queued before the next loop iteration, for sure.
            log.append(("submit", engine.stats["prefill_chunks"]))
            engine.submit(Request(long_prompt, greedy(3), chat=False, stream=True), long)

    def on_long(index: int, event: object) -> None:
        log.append(("long", engine.stats["prefill_chunks"]))

    stream = Rec(on_event=on_stream)
    long = Rec(on_event=on_long)
    short_prompt = text_prompt(chat, 3)  # one chunk
    engine.submit(Request(short_prompt, greedy(40), chat=False, stream=True), stream)
    long_gen = long.generations()[0]
    stream_gen = stream.generations()[0]

    submitted = log.index(("submit", 1))
    first_long = next(i for i, (who, _) in enumerate(log) if who == "long")
    during = [chunks for who, chunks in log[submitted + 1 : first_long] if who == "stream"]
    # The stream got a token after every one of the first 9 of the long prompt's 10 chunks ...
    assert during == list(range(2, 11)), log[:40]
    # ... and the long prompt's first token came out of its 10th chunk.
    assert log[first_long] == ("long", 11) and engine.stats["prefill_chunks"] == 11
    # Interleaving changed nothing: both replies are the static sampler's.
    assert stream_gen.token_ids == static(chat, short_prompt, greedy(40)).token_ids
    assert long_gen.token_ids == static(chat, long_prompt, greedy(3)).token_ids


# --------------------------------------------------------------------------- 7. timeouts


def test_tiny_timeout_gives_request_timeout_not_a_hang(make_engine, chat):
    engine = make_engine(max_batch=2, timeout_s=1e-9)
    started = time.monotonic()
    recs = [run(engine, text_prompt(chat, 8), greedy(30), stream=s) for s in (False, True)]
    for rec in recs:
        (final,) = rec.wait()
        assert isinstance(final, RequestTimeout) and final.kind == "timeout"
    assert time.monotonic() - started < 5
    wait_until(lambda: engine.running == 0 and engine.waiting == 0, "the engine is idle")


def test_timeouts_while_running_and_while_waiting(make_engine, chat):
    timeout = 1.0
    observer = LoadObserver()
    engine = make_engine(max_batch=1, timeout_s=timeout, observer=observer)
    queued_in = threading.Event()

    def stall(index: int, event: object) -> None:
        if isinstance(event, StreamChunk) and len(running.chunks()) == 1:
            queued_in.wait(WAIT_S)
            time.sleep(timeout * 1.2)  # both requests' deadlines pass while the engine is stuck here

    running = Rec(on_event=stall)
    engine.submit(Request(text_prompt(chat, 5), greedy(40), chat=False, stream=True), running)
    waiting = run(engine, text_prompt(chat, 7), greedy(5))
    queued_in.set()
    (r,), (w,) = running.wait(), waiting.wait()
    assert isinstance(r, RequestTimeout) and "during generation" in str(r)
    assert len(running.chunks()) <= 2  # the stalled step's decode token at most; none after the deadline
    assert isinstance(w, RequestTimeout) and "waiting" in str(w)
    assert observer.errors.count("timeout") == 2
    wait_until(lambda: engine.running == 0, "the engine is idle")
    # The engine keeps serving.
    assert run(engine, text_prompt(chat, 5), greedy(2)).generations()[0].finish_reason == "length"


# --------------------------------------------------------------------------- 8. close()


def test_close_fails_waiting_lets_running_finish(make_engine, chat):
    engine = make_engine(max_batch=1)
    waiter_failed = threading.Event()

    def hold(index: int, event: object) -> None:
        if isinstance(event, StreamChunk) and len(running.chunks()) == 1:
            waiter_failed.wait(WAIT_S)  # still running when close() starts

    running = Rec(on_event=hold)
    waiting = Rec(on_event=lambda i, e: waiter_failed.set())
    engine.submit(Request(text_prompt(chat, 5), greedy(30), chat=False, stream=True), running)
    wait_until(lambda: len(running.chunks()) == 1, "the first request runs")
    engine.submit(Request(text_prompt(chat, 7), greedy(5), chat=False), waiting)
    engine.close(grace_s=WAIT_S)  # returns once the running row is done

    (w,) = waiting.wait()
    assert isinstance(w, EngineClosed) and w.kind == "shutdown" and "not started" in str(w)
    (r,) = running.wait()
    assert isinstance(r, Finished) and r.generation.finish_reason == "length"
    assert r.generation.token_ids == static(chat, text_prompt(chat, 5), greedy(30)).token_ids
    assert not engine.alive and thread_done(engine)
    with pytest.raises(EngineClosed):
        engine.submit(Request(text_prompt(chat, 5), greedy(2), chat=False), Rec())


def test_close_past_grace_ends_running_rows(make_engine, chat):
    engine = make_engine(max_batch=2)

    def hold(index: int, event: object) -> None:
        if isinstance(event, StreamChunk) and len(running.chunks()) == 1:
            deadline = time.monotonic() + WAIT_S
            while engine.alive and time.monotonic() < deadline:  # until close() has begun
                time.sleep(0.002)

    running = Rec(on_event=hold)
    engine.submit(Request(text_prompt(chat, 5), greedy(50), chat=False, stream=True), running)
    wait_until(lambda: len(running.chunks()) == 1, "the request runs")
    started = time.monotonic()
    engine.close(grace_s=0.0)
    assert time.monotonic() - started < 5
    (r,) = running.wait()
    assert isinstance(r, EngineClosed) and "before this reply finished" in str(r)
    assert len(running.chunks()) < 50
    assert thread_done(engine)
    with pytest.raises(EngineClosed):
        engine.submit(Request(text_prompt(chat, 5), greedy(2), chat=False), Rec())


# --------------------------------------------------------------------------- 9. prompt scoring


def _reference_logprobs(chat: ChatEngine, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return chat.model(torch.tensor([prompt]))[0].float().log_softmax(-1)


def _check_scores(scored, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    assert scored is not None and len(scored) == len(prompt)
    assert scored[0] is None
    for t in range(1, len(prompt)):
        token, logprob, top = scored[t]
        assert token == prompt[t]
        assert logprob == pytest.approx(ref[t - 1, token].item(), abs=1e-4)
        assert len(top) == k
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        want_v, want_i = ref[t - 1].topk(k)
        assert values == pytest.approx(want_v.tolist(), abs=1e-4)
        assert {i for i, _ in top} == set(want_i.tolist()) or k == 0


@pytest.mark.parametrize("prefill_chunk", [512, 8, 5])
def test_prompt_scoring_matches_a_full_forward(make_engine, chat, prefill_chunk):
    prompts = [text_prompt(chat, n) for n in (2, 6, 23, 41)] + [text_prompt(chat, BLOCK)]
    refs = [_reference_logprobs(chat, p) for p in prompts]
    engine = make_engine(max_batch=3, prefill_chunk=prefill_chunk)
    k = 3
    # All at once: several prompts share (right-padded) prefill chunks; the longest fills the context.
    recs = [run(engine, p, greedy(1), prompt_logprobs=k, score_only=True) for p in prompts]
    for prompt, ref, rec in zip(prompts, refs, recs, strict=True):
        (f,) = rec.wait()
        assert isinstance(f, Finished)
        assert f.generation.token_ids == [] and f.generation.finish_reason == "length"
        _check_scores(f.prompt_logprobs, prompt, ref, k)
    if prefill_chunk < BLOCK:
        assert engine.stats["prefill_chunks"] >= math.ceil(BLOCK / prefill_chunk)
    # Echo + generation: the prompt is scored and the reply is still the greedy one.
    prompt = prompts[3]
    (f,) = run(engine, prompt, greedy(6), prompt_logprobs=0).wait()
    assert isinstance(f, Finished)
    _check_scores(f.prompt_logprobs, prompt, refs[3], 0)
    assert f.generation.token_ids == static(chat, prompt, greedy(6)).token_ids
    # Without prompt_logprobs there are none.
    (f,) = run(engine, prompt, greedy(2)).wait()
    assert isinstance(f, Finished) and f.prompt_logprobs is None


def test_full_context_scoring_beside_running_streams(make_engine, chat):
    """A scored prompt that fills the whole context finishes in its prefill; the decode step of the
    same iteration must not try to feed it a position past the context (which failed every row)."""
    engine = make_engine(max_batch=3, prefill_chunk=16)
    full = text_prompt(chat, BLOCK)
    ref = _reference_logprobs(chat, full)
    scored = Rec()

    def submit_scoring(index: int, event: object) -> None:
        if isinstance(event, StreamChunk) and len(stream.chunks()) == 2:
            engine.submit(Request(full, greedy(1), chat=False, prompt_logprobs=2, score_only=True), scored)

    stream = Rec(on_event=submit_scoring)
    short = text_prompt(chat, 4)
    engine.submit(Request(short, greedy(30), chat=False, stream=True), stream)
    (f,) = scored.wait()
    assert isinstance(f, Finished)
    _check_scores(f.prompt_logprobs, full, ref, 2)
    gen = stream.generations()[0]
    assert gen.token_ids == static(chat, short, greedy(30)).token_ids


# --------------------------------------------------------------------------- 10. n > 1


def test_n_choices_with_a_seed(make_engine, chat):
    engine = make_engine(max_batch=4, prefill_chunk=8)
    prompt = text_prompt(chat, 12)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=2024)
    four = run(engine, prompt, params, n=4).generations()
    one = run(engine, prompt, params).generations()[0]
    again = run(engine, prompt, params, n=4, stream=True).generations()
    ids = [tuple(g.token_ids) for g in four]
    assert len(set(ids)) == 4  # the choices differ
    assert four[0].token_ids == one.token_ids  # choice 0 is the n=1 reply
    assert [tuple(g.token_ids) for g in again] == ids  # and the whole set is reproducible
    other_seed = run(engine, prompt, SamplingParams(max_new_tokens=10, seed=2025, top_p=0.95), n=4)
    assert [tuple(g.token_ids) for g in other_seed.generations()] != ids
    for g in four:
        valid_reply(g, chat, params)
    # Greedy choices are all the same.
    g3 = run(engine, prompt, greedy(6), n=3).generations()
    assert g3[0].token_ids == g3[1].token_ids == g3[2].token_ids == static(chat, prompt, greedy(6)).token_ids


# --------------------------------------------------------------------------- 11. asyncio helpers


class GateObserver(LoadObserver):
    """Counts inter-token hooks; while ``gate`` is an unset event, holds the engine thread in them
    (that is, before a row's second and later tokens are sent)."""

    gate: threading.Event | None = None
    inter_tokens = 0

    def inter_token(self, seconds: float) -> None:
        self.inter_tokens += 1
        gate = self.gate
        if gate is not None:
            gate.wait(WAIT_S)


def test_aio_generate_and_open_stream(make_engine, chat):
    observer = GateObserver()
    engine = make_engine(max_batch=1, observer=observer)
    prompt = text_prompt(chat, 9)
    ref = static(chat, prompt, greedy(8))

    async def main() -> None:
        rows = await aio.generate(engine, prompt, greedy(8), chat=False)
        assert len(rows) == 1 and isinstance(rows[0], Finished)
        assert rows[0].generation.token_ids == ref.token_ids
        seeded = SamplingParams(max_new_tokens=6, seed=5)
        two = await aio.generate(engine, prompt, seeded, chat=False, n=2)
        assert [r.index for r in two] == [0, 1]
        one = await aio.generate(engine, prompt, seeded, chat=False)
        assert two[0].generation.token_ids == one[0].generation.token_ids

        # Concurrent coroutines on one loop.
        many = await asyncio.gather(*(aio.generate(engine, prompt, greedy(8), chat=False) for _ in range(4)))
        assert all(m[0].generation.token_ids == ref.token_ids for m in many)

        bursts = [burst async for burst in aio.open_stream(engine, prompt, greedy(8), chat=False)]
        assert bursts and all(isinstance(b, list) and b for b in bursts)
        events = [e for b in bursts for e in b]
        assert isinstance(events[-1], Finished)
        assert all(isinstance(e, StreamChunk) for e in events[:-1])
        chunks = events[:-1]
        assert [c.token_id for c in chunks if c.token_id is not None] == ref.token_ids
        assert "".join(c.text or "" for c in chunks) == ref.text == events[-1].generation.text

        # Leaving a stream early cancels its row: it stops at once and the only slot frees up. The
        # engine is held before the row's second token until the stream has been left.
        for dropped in (False, True):
            gate = observer.gate = threading.Event()
            before = observer.inter_tokens  # the previous requests are finished: no more of theirs
            if dropped:  # the iterator is simply dropped after `break`: the loop's asyncgen finalizer
                async for _burst in aio.open_stream(engine, prompt, greedy(50), chat=False):
                    break
                for _ in range(20):
                    await asyncio.sleep(0)
            else:
                async with contextlib.aclosing(aio.open_stream(engine, prompt, greedy(50), chat=False)) as it:
                    async for burst in it:
                        assert burst and isinstance(burst[0], StreamChunk)
                        break
            observer.gate = None
            gate.set()
            for _ in range(int(WAIT_S / 0.005)):
                if not engine.running:
                    break
                await asyncio.sleep(0.005)
            assert engine.running == 0
            # The token held at the gate, then nothing: not the 49 more of an uncancelled row.
            assert observer.inter_tokens - before == 1, dropped
        rows = await aio.generate(engine, prompt, greedy(8), chat=False)
        assert rows[0].generation.token_ids == ref.token_ids

        # Errors surface as exceptions.
        with pytest.raises(ValueError):
            await aio.generate(engine, [], greedy(2), chat=False)

    asyncio.run(main())
    wait_until(lambda: engine.running == 0 and engine.waiting == 0, "the engine is idle")


def test_aio_cancelled_generate_never_runs(make_engine, chat):
    engine = make_engine(max_batch=1)
    prompt = text_prompt(chat, 5)
    release = threading.Event()

    def hold(index: int, event: object) -> None:
        if isinstance(event, StreamChunk) and len(blocker.chunks()) == 1:
            release.wait(WAIT_S)

    blocker = Rec(on_event=hold)
    engine.submit(Request(prompt, greedy(4), chat=False, stream=True), blocker)
    wait_until(lambda: len(blocker.chunks()) == 1, "the slot is taken")

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aio.generate(engine, prompt, greedy(4), chat=False), 0.05)
        assert engine.waiting == 1  # cancelled, not yet dropped: it is skipped at admission

    try:
        asyncio.run(main())
    finally:
        release.set()
    blocker.wait()
    wait_until(lambda: engine.running == 0 and engine.waiting == 0, "the engine is idle")
    assert engine.stats["rows"] == 1  # the cancelled request never took the slot

    # A stream whose engine shuts down before it starts raises the engine's error.
    async def stream_error() -> None:
        hold_all = threading.Event()
        blocker2 = Rec(on_event=lambda i, e: hold_all.wait(WAIT_S) if isinstance(e, StreamChunk) else None)
        engine.submit(Request(prompt, greedy(4), chat=False, stream=True), blocker2)
        events: list[object] = []
        it = aio.open_stream(engine, prompt, greedy(4), chat=False)  # queued behind the blocker
        closer = threading.Thread(target=engine.close, kwargs={"grace_s": WAIT_S})
        closer.start()
        with pytest.raises(EngineClosed):
            async for burst in it:
                events.extend(burst)
        assert events == []
        hold_all.set()
        await asyncio.to_thread(closer.join, WAIT_S)

    asyncio.run(stream_error())


# --------------------------------------------------------------------------- 8. a failing row fails alone


def test_a_row_whose_work_raises_fails_alone_and_the_engine_serves_on(make_engine, chat, monkeypatch):
    """Issue 22: each request's processing is guarded. Faults injected into three rows of one mixed
    batch (the forward pass of a prompt with a poisoned token, the logits processing of one row's
    knobs, the bookkeeping of one row's tokens) fail those rows with GenerationFailed naming the
    stage; the other rows' replies are exactly those of a clean run, and the engine serves on."""
    import lmforge.generation.reply as reply_module
    from lmforge.generation import steps as engine_module
    from lmforge.generation.interface import GenerationFailed

    V = chat.model.config.vocab_size
    poison = V - 1
    good = [
        (text_prompt(chat, 9), greedy(10)),
        (
            chat_prompt(chat, "the fox"),
            SamplingParams(max_new_tokens=10, temperature=0.9, seed=3, logprobs=3),
        ),
        (text_prompt(chat, 17), greedy(10, repetition_penalty=1.2)),
    ]
    bad = [
        ([*text_prompt(chat, 5), poison, 7], greedy(10)),  # the forward pass raises on its chunk
        (
            text_prompt(chat, 6),
            SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.25, seed=1),
        ),  # sampling
        (text_prompt(chat, 7), greedy(10, stop_strings=("BOOM",))),  # its bookkeeping raises
    ]

    def run_all(engine, requests):
        recs = [run(engine, p, params) for p, params in requests]
        return [rec.wait() for rec in recs]

    clean = run_all(make_engine(), good)

    forward, process, push = (
        chat.model.forward_slots,
        engine_module.rowwise.process,
        reply_module.Reply.push,
    )

    def poisoned_forward(idx, view, **kw):
        if bool((idx == poison).any()):
            raise RuntimeError("poisoned token in the batch")
        return forward(idx, view, **kw)

    def fragile_process(logits, knobs, *args):
        if bool((knobs.top_p == 0.25).any()):
            raise ValueError("a knob this processor cannot take")
        return process(logits, knobs, *args)

    def fragile_push(self, token, *args, **kwargs):
        if "BOOM" in self.params.stop_strings and len(self.tokens) == 3:
            raise KeyError("bookkeeping bug")
        return push(self, token, *args, **kwargs)

    monkeypatch.setattr(chat.model, "forward_slots", poisoned_forward)
    monkeypatch.setattr(engine_module.rowwise, "process", fragile_process)
    monkeypatch.setattr(reply_module.Reply, "push", fragile_push)
    engine = make_engine()
    mixed = [good[0], bad[0], good[1], bad[1], good[2], bad[2]]
    results = run_all(engine, mixed)
    got_good = [results[i] for i in (0, 2, 4)]
    got_bad = [results[i][0] for i in (1, 3, 5)]
    for (final,), (want,) in zip(got_good, clean, strict=True):
        assert isinstance(final, Finished), final
        got, ref = final.generation, want.generation
        assert (got.token_ids, got.text, got.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
        if ref.logprobs is not None:  # a row sampled alone rounds its floats as a batch of one
            assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    for error, stage, cause in zip(
        got_bad,
        ("prefilling", "sampling", "sampling"),
        ("poisoned token", "cannot take", "bookkeeping bug"),
        strict=True,
    ):
        assert isinstance(error, GenerationFailed), error
        assert f"while {stage} this request" in str(error) and cause in str(error), error
    # The last events reach their listeners a moment before the engine frees the rows' slots.
    wait_until(lambda: engine.idle, "the failed and finished rows left their slots")
    assert engine.alive
    (again,) = run(engine, *good[0]).wait()
    assert isinstance(again, Finished) and again.generation.token_ids == clean[0][0].generation.token_ids
