"""Property: nothing a request carries can kill the continuous-batching engine.

Hypothesis drives :class:`lmforge.generation.engine.ServingEngine` directly (no HTTP, no engine
thread: ``thread=False`` and the test calls ``iterate()`` itself, with an iteration cap so a hang is
a failure). Each example submits a mixed batch of 1-8 requests before the first iteration, each with

* a prompt of 0 up to block_size + 1 token ids: any id of the vocabulary, the tokenizer's special
  ids (bos, eos, pad, end, role tokens) often, and now and then an id outside [0, vocab);
* every :class:`~lmforge.generation.sampling_params.SamplingParams` field drawn within its documented bounds
  (``__post_init__``), extremes included: max_new_tokens 1..8 or far past the context (10**6),
  temperature 0, 5e-324, 1e-45, 1e-30, 1e-6 ... 1e6, 1e30, 1e39 and inf, top_k None/0/1/vocab/2**63-1,
  top_p down to 5e-324, min_p 0 and 1, repetition_penalty 5e-324 ... 1e300, presence/frequency
  penalties in [-2, 2], logit_bias of +-100, stop strings (unicode, U+FFFD, newlines), stop token
  ids, seeds up to 2**63-1, logprobs None, 0..20 (the HTTP API's MAX_TOP_LOGPROBS) or past the
  vocabulary size;
* the submit options: chat, stream, n in 1..3, prompt_logprobs (None, 0..20, past the vocabulary),
  score_only; and a cancel at a random iteration for some of them.

The engine has 4 slots, a prefill chunk of 8 tokens (a full-context prompt prefills over four
iterations while other rows decode) and usually a queue of 64 rows (sometimes 5, so that
``QueueFull`` is exercised too). Asserted for every example:

* ``submit`` refuses synchronously with ``ValueError`` exactly the requests that cannot run (empty,
  too long, ids out of range; the message names the problem), with ``QueueFull`` exactly when the
  queue cannot take the rows, and with nothing else;
* ``iterate()`` never raises, the engine drains within the cap, nothing is logged as a failed step,
  and afterwards the engine is idle, alive and still usable: a plain greedy request gives the very
  tokens a brand-new engine gives;
* every accepted row gets exactly one terminal event and nothing after it: ``Finished`` for every
  row that was not cancelled (a valid request succeeds: never ``GenerationFailed``), ``Finished`` or
  ``Cancelled`` for a cancelled one;
* a ``Finished`` reply keeps its budget (``len(token_ids) <= min(max_new_tokens, block_size -
  len(prompt))``, exactly the budget when the reason is "length", nothing for score_only), has
  finish_reason "stop" or "length", holds no stop token and no stop string, has one logprob and one
  list of at most ``logprobs`` alternatives per token when logprobs were asked, and one scored entry
  per prompt token when prompt_logprobs were asked;
* a streaming row's chunks concatenate to the ``Finished`` text, only the last carries a
  finish_reason, and their token ids begin with the reply's; a non-streaming row gets no chunks.

The corners of the bug report (a one-token prompt with logprobs=20 at temperature 0 and 1, a prompt
filling the whole context scored with prompt_logprobs=20) are ``@example``s and a plain test.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import tiny_gpt
from lmforge.generation.chat import ChatEngine
from lmforge.generation.engine import ServingEngine
from lmforge.generation.interface import Cancelled, EngineError, Finished, QueueFull, Request
from lmforge.generation.outputs import StreamChunk
from lmforge.generation.sampling_params import SamplingParams
from lmforge.tokenizer import ChatTokenizer, train_bpe
from test_service import CORPUS as SERVICE_CORPUS

BLOCK = 32
MAX_BATCH = 4
PREFILL_CHUNK = 8
MAX_ITERATIONS = 3000  # a batch needs a few hundred at most: past this the engine hangs
# The HTTP tests' corpus plus multi-byte text (tokens that split UTF-8 characters).
CORPUS = [
    *SERVICE_CORPUS,
    *["Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9: \u20ac5 \U0001f98a \u65e5\u672c."] * 20,
]


# --------------------------------------------------------------------------- model, tokenizer


@functools.cache
def chat_engine() -> ChatEngine:
    tok = ChatTokenizer(train_bpe(CORPUS, vocab_size=300))
    model = tiny_gpt(tok.vocab_size, block_size=BLOCK, n_head=2, n_kv_head=2, tie_embeddings=False).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(5.0)  # sharper logits, as tests/test_serving_engine.py does
        model.lm_head.weight.mul_(20.0)
    return ChatEngine(model, tok)


def vocab() -> int:
    return chat_engine().model.config.vocab_size


def specials() -> list[int]:
    return sorted(chat_engine().tok.special_ids)


PROBE_PROMPT = [1, 40, 41, 42, 43]  # the plain greedy request run after every batch
PROBE_PARAMS = SamplingParams(max_new_tokens=6, temperature=0.0)


def new_engine(max_queue: int = 64) -> ServingEngine:
    return ServingEngine(
        chat_engine(),
        thread=False,
        max_batch=MAX_BATCH,
        max_queue=max_queue,
        prefill_chunk=PREFILL_CHUNK,
        timeout_s=None,  # no timeouts: every row that is not cancelled must finish
    )


# --------------------------------------------------------------------------- recording events


class Rec:
    """An ``emit`` callback recording each row's events. It never raises (the engine would swallow
    an exception and cancel the request): violations are recorded and asserted afterwards."""

    def __init__(self, n: int) -> None:
        self.events: list[list[object]] = [[] for _ in range(n)]
        self.final: list[Finished | EngineError | None] = [None] * n
        self.after_terminal: list[tuple[int, object]] = []
        self.bad_index: list[int] = []

    def __call__(self, index: int, event: object) -> None:
        if not 0 <= index < len(self.events):
            self.bad_index.append(index)
            return
        if self.final[index] is not None:
            self.after_terminal.append((index, event))
            return
        self.events[index].append(event)
        if isinstance(event, Finished | EngineError):
            self.final[index] = event


class StepFailures(logging.Handler):
    """Collects the engine's warnings and errors: a failed step or row is logged with its
    traceback, and a batch that raised (even if its rows then succeeded one by one) is a warning."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def report(self) -> str:
        fmt = logging.Formatter()
        return "\n".join(fmt.format(r) for r in self.records)


# --------------------------------------------------------------------------- requests


@dataclass
class Case:
    prompt: list[int]
    params: SamplingParams
    chat: bool = False
    stream: bool = False
    n: int = 1
    prompt_logprobs: int | None = None
    score_only: bool = False
    cancel_at: int | None = None  # cancel before this iteration (0: before the first)

    def request(self) -> Request:
        """What the engine is given (everything but the cancel, which the test does)."""
        fields = ("prompt", "params", "chat", "stream", "n", "prompt_logprobs", "score_only")
        return Request(**{name: getattr(self, name) for name in fields})

    def refusal_reasons(self, V: int) -> list[str]:
        """Why the engine must refuse this request (empty: it can run)."""
        reasons = []
        room = BLOCK if self.score_only else BLOCK - 1
        if not 1 <= len(self.prompt) <= room:
            reasons.append("length")
        elif min(self.prompt) < 0 or max(self.prompt) >= V:
            reasons.append("ids")
        if self.params.logit_bias and max(self.params.logit_bias) >= V:
            reasons.append("bias")
        return reasons


def message_names(reason: str, msg: str, req: Case, V: int) -> bool:
    """The ValueError's message says what is wrong (loosely: the wording may change)."""
    low = msg.lower()
    if reason == "length":
        return "prompt" in low and str(len(req.prompt)) in msg and str(BLOCK) in msg
    if reason == "ids":
        return "token" in low and str(V) in msg
    return "logit_bias" in low and str(V) in msg


STOP_ALPHABET = "abcdefghijklmnopqrstuvwxyz AEIOST.,;?!'\n\u00e9\u20ac\U0001f98a\u65e5\ufffd<|>"


@st.composite
def token_ids(draw, allow_invalid: bool) -> int:
    V = vocab()
    kind = draw(st.integers(0, 19))
    if allow_invalid and kind == 0:
        return draw(st.sampled_from([-1, V, V + 1, 2**31, -(2**40)]))
    if kind < 7:
        return draw(st.sampled_from(specials()))
    return draw(st.integers(0, V - 1))


@st.composite
def prompts(draw) -> list[int]:
    invalid = draw(st.integers(0, 11)) == 0  # now and then a request the engine must refuse
    if invalid:
        length = draw(st.sampled_from([0, BLOCK - 1, BLOCK, BLOCK + 1, 1, 3]))
    else:
        length = draw(st.one_of(st.integers(1, BLOCK), st.sampled_from([1, BLOCK - 1, BLOCK])))
    return draw(st.lists(token_ids(allow_invalid=invalid), min_size=length, max_size=length))


@st.composite
def stop_strings(draw) -> str:
    """A non-empty stop string: random characters (unicode, U+FFFD, newlines) or a piece of a
    token's text, which the tiny model's replies actually contain now and then."""
    if draw(st.booleans()):
        return draw(st.text(alphabet=STOP_ALPHABET, min_size=1, max_size=3))
    text = chat_engine().decode([draw(st.integers(len(specials()), vocab() - 1))])
    start = draw(st.integers(0, max(0, len(text) - 1)))
    piece = text[start : start + draw(st.integers(1, 3))]
    return piece or "e"


@st.composite
def sampling_params(draw) -> SamplingParams:
    V = vocab()
    tiny = 5e-324
    bias_ids = st.one_of(st.sampled_from(specials()), st.integers(0, V - 1))
    if draw(st.integers(0, 19)) == 0:
        bias_ids = st.one_of(bias_ids, st.sampled_from([V, V + 7, 2**31]))  # refused by submit
    return SamplingParams(
        max_new_tokens=draw(st.one_of(st.integers(1, 8), st.sampled_from([10**6, BLOCK - 1, BLOCK]))),
        temperature=draw(
            st.one_of(
                # Not above float32's max (3.4e38): see test_temperature_past_float32_max_gives_no_nan.
                st.sampled_from(
                    [0.0, 1.0, tiny, 1e-45, 1e-30, 1e-6, 0.5, 2.0, 10.0, 1e6, 1e30, 1e39, float("inf")]
                ),
                st.floats(0.0, 10.0),
            )
        ),
        top_k=draw(
            st.one_of(st.none(), st.sampled_from([0, 1, 2, V - 1, V, V + 1, 2**63 - 1]), st.integers(0, 50))
        ),
        top_p=draw(st.one_of(st.sampled_from([1.0, tiny, 1e-9, 0.5]), st.floats(0.0, 1.0, exclude_min=True))),
        min_p=draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))),
        repetition_penalty=draw(
            st.one_of(st.sampled_from([1.0, tiny, 1e-40, 1e-6, 10.0, 1e6, 1e300]), st.floats(1e-3, 10.0))
        ),
        presence_penalty=draw(st.one_of(st.sampled_from([0.0, -2.0, 2.0]), st.floats(-2.0, 2.0))),
        frequency_penalty=draw(st.one_of(st.sampled_from([0.0, -2.0, 2.0]), st.floats(-2.0, 2.0))),
        logit_bias=draw(
            st.one_of(
                st.none(),
                st.dictionaries(
                    bias_ids,
                    st.one_of(st.sampled_from([-100.0, 100.0, 0.0]), st.floats(-100.0, 100.0)),
                    max_size=4,
                ),
            )
        ),
        stop_strings=tuple(draw(st.lists(stop_strings(), max_size=3))),
        stop_token_ids=tuple(
            draw(st.lists(st.one_of(st.sampled_from(specials()), st.integers(0, V - 1)), max_size=3))
        ),
        seed=draw(st.one_of(st.none(), st.sampled_from([0, 2**63 - 1]), st.integers(0, 2**63 - 1))),
        logprobs=draw(
            st.one_of(st.none(), st.integers(0, 20), st.sampled_from([20, V - 1, V, V + 1, 10**6]))
        ),
    )


@st.composite
def requests(draw) -> Case:
    V = vocab()
    return Case(
        prompt=draw(prompts()),
        params=draw(sampling_params()),
        chat=draw(st.booleans()),
        stream=draw(st.booleans()),
        n=draw(st.integers(1, 3)),
        prompt_logprobs=draw(st.one_of(st.none(), st.integers(0, 20), st.sampled_from([V, 10**6]))),
        score_only=draw(st.booleans()),
        cancel_at=draw(st.integers(0, 12)) if draw(st.integers(0, 4)) == 0 else None,
    )


# --------------------------------------------------------------------------- the property


@functools.cache
def probe_reference() -> list[int]:
    """The probe's reply from a brand-new engine (the same code path, so bit-identical)."""
    engine = new_engine()
    rec = Rec(1)
    engine.submit(Request(PROBE_PROMPT, PROBE_PARAMS, chat=False), rec)
    drain(engine)
    (final,) = rec.final
    assert isinstance(final, Finished), final
    return final.generation.token_ids


def drain(engine: ServingEngine, cancels: dict[int, list] | None = None) -> int:
    """Iterate until idle (cancelling tickets at their iteration); returns the iterations run."""
    iterations = 0
    with torch.inference_mode():
        while not engine.idle:
            for ticket in (cancels or {}).get(iterations, []):
                ticket.cancel()
            assert iterations < MAX_ITERATIONS, (
                f"the engine did not drain in {MAX_ITERATIONS} iterations: "
                f"{engine.running} running, {engine.waiting} waiting, {len(engine._prefilling)} prefilling"
            )
            engine.iterate()  # must never raise
            iterations += 1
    return iterations


def check_finished(req: Case, index: int, fin: Finished, events: list[object]) -> None:
    chat, V = chat_engine(), vocab()
    params = req.params
    gen = fin.generation
    where = f"row {index} of {req}"
    assert fin.index == index, where
    budget = min(params.max_new_tokens, BLOCK - len(req.prompt))
    assert gen.finish_reason in ("stop", "length"), where
    if req.score_only:
        assert gen.token_ids == [] and gen.finish_reason == "length", where
    else:
        assert len(gen.token_ids) <= budget, where
        if gen.finish_reason == "length":
            assert len(gen.token_ids) == budget, where
    stops = set(params.stop_token_ids) | set(chat.tok.stop_ids(req.chat))
    assert all(0 <= t < V and t not in stops for t in gen.token_ids), where
    if gen.stop_token_id is not None:
        assert gen.stop_token_id in stops and gen.finish_reason == "stop", where
    assert isinstance(gen.text, str), where
    if gen.stop_string is not None:
        assert gen.stop_string in params.stop_strings and gen.finish_reason == "stop", where
    assert not any(s in gen.text for s in params.stop_strings), where

    if params.logprobs is None:
        assert gen.logprobs is None and gen.top_logprobs is None, where
    else:
        assert gen.logprobs is not None and gen.top_logprobs is not None, where
        assert len(gen.logprobs) == len(gen.token_ids) == len(gen.top_logprobs), where
        for lp, top in zip(gen.logprobs, gen.top_logprobs, strict=True):
            assert not math.isnan(lp) and lp <= 1e-4, (where, lp)
            assert len(top) <= min(params.logprobs, V), where
            assert all(0 <= t < V and not math.isnan(v) and v <= 1e-4 for t, v in top), (where, top)

    if req.prompt_logprobs is None:
        assert fin.prompt_logprobs is None, where
    else:
        scored = fin.prompt_logprobs
        assert scored is not None and len(scored) == len(req.prompt), where
        assert scored[0] is None, where
        for t, entry in enumerate(scored[1:], start=1):
            assert entry is not None, where
            token, lp, top = entry
            assert token == req.prompt[t] and math.isfinite(lp) and lp <= 1e-4, (where, t, entry)
            assert len(top) == min(req.prompt_logprobs, V), where

    chunks = events[:-1]
    if not req.stream:
        assert chunks == [], where
        return
    assert all(isinstance(c, StreamChunk) for c in chunks), where
    assert "".join(c.text or "" for c in chunks) == gen.text, (where, chunks, gen.text)
    if req.score_only:
        assert chunks == [], where
        return
    assert chunks and chunks[-1].finish_reason == gen.finish_reason, (where, chunks)
    assert all(c.finish_reason is None for c in chunks[:-1]), where
    streamed = [c.token_id for c in chunks if c.token_id is not None]
    assert streamed[: len(gen.token_ids)] == gen.token_ids, (where, streamed)
    if gen.stop_string is None:
        assert streamed == gen.token_ids, (where, streamed)


def run_batch(batch: list[Case], max_queue: int = 64) -> None:
    V = vocab()
    reference = probe_reference()
    failures = StepFailures()
    logger = logging.getLogger("lmforge.serving")
    logger.addHandler(failures)
    try:
        engine = new_engine(max_queue)
        accepted: list[tuple[Case, Rec, object]] = []
        cancels: dict[int, list] = {}
        queued_rows = 0
        for req in batch:
            rec = Rec(req.n)
            reasons = req.refusal_reasons(V)
            try:
                ticket = engine.submit(req.request(), rec)
            except QueueFull:
                assert not reasons, f"QueueFull for a request that cannot run ({reasons}): {req}"
                assert queued_rows + req.n > max_queue + MAX_BATCH, f"QueueFull with room: {req}"
                continue
            except ValueError as exc:
                assert reasons, f"a valid request was refused: {exc!r}: {req}"
                assert any(message_names(r, str(exc), req, V) for r in reasons), (
                    f"unclear refusal {str(exc)!r} for {reasons}: {req}"
                )
                continue
            assert not reasons, f"a request that cannot run was accepted ({reasons}): {req}"
            assert queued_rows + req.n <= max_queue + MAX_BATCH, "accepted past the queue bound"
            queued_rows += req.n
            accepted.append((req, rec, ticket))
            if req.cancel_at is not None:
                cancels.setdefault(req.cancel_at, []).append(ticket)

        drain(engine, cancels)
        assert not failures.records, f"the engine logged a failure:\n{failures.report()}"

        for req, rec, ticket in accepted:
            assert not rec.bad_index, (rec.bad_index, req)
            assert not rec.after_terminal, f"events after a terminal event: {rec.after_terminal} ({req})"
            for index, (final, events) in enumerate(zip(rec.final, rec.events, strict=True)):
                assert final is not None, f"row {index} never ended: {events} ({req})"
                if isinstance(final, Finished):
                    check_finished(req, index, final, events)
                    continue
                assert ticket.cancelled and isinstance(final, Cancelled), (
                    f"row {index} of a request that should succeed ended with {final!r}: {req}"
                )
                assert all(isinstance(e, StreamChunk) for e in events[:-1]), (events, req)
                if not req.stream:
                    assert events == [final], (events, req)

        # Still alive, idle, and usable: a plain request gets what a brand-new engine gives.
        assert engine.alive and engine.idle and engine.running == 0 and engine.waiting == 0
        assert not engine._prefilling
        probe = Rec(1)
        engine.submit(Request(PROBE_PROMPT, PROBE_PARAMS, chat=False), probe)
        drain(engine)
        (final,) = probe.final
        assert isinstance(final, Finished), final
        assert final.generation.token_ids == reference
        assert not failures.records, f"the engine logged a failure:\n{failures.report()}"
    finally:
        logger.removeHandler(failures)


# --------------------------------------------------------------------------- the bug report's corners


BOS_ID = 0  # train_bpe gives the special tokens ids 0..6, <|bos|> first (checked below)


def corner_requests() -> list[Case]:
    """Built without the model (``@example`` arguments are evaluated at import)."""
    full = [BOS_ID, *[(7 * i + 11) % 250 for i in range(1, BLOCK)]]
    return [
        Case([BOS_ID], SamplingParams(max_new_tokens=4, temperature=0.0, logprobs=20)),
        Case([BOS_ID], SamplingParams(max_new_tokens=4, temperature=1.0, logprobs=20, seed=3)),
        Case([42], SamplingParams(max_new_tokens=10**6, temperature=1.0, logprobs=20), stream=True),
        Case(full, SamplingParams(max_new_tokens=1, temperature=0.0), score_only=True, prompt_logprobs=20),
        Case(full, SamplingParams(max_new_tokens=1, logprobs=20), score_only=True, prompt_logprobs=20, n=2),
        Case(full[:-1], SamplingParams(max_new_tokens=5, logprobs=20), prompt_logprobs=20, stream=True),
    ]


def test_bug_report_corners_each_alone():
    assert chat_engine().tok.bos_id == BOS_ID and vocab() > 250
    for req in corner_requests():
        run_batch([req])


def test_bug_report_corners_together():
    run_batch(corner_requests())


def test_temperature_past_float32_max_gives_no_nan():
    """SamplingParams takes any temperature >= 0 (the HTTP API caps it at 10), and lmforge.generation.logits
    promises that extreme but valid knobs never produce NaN."""
    prompt = [BOS_ID, *range(7, 7 + BLOCK - 2)]  # 30 seen tokens: several have a positive logit
    params = SamplingParams(max_new_tokens=3, temperature=1e39, repetition_penalty=5e-324, seed=1, logprobs=2)
    engine = new_engine()
    rec = Rec(1)
    engine.submit(Request(prompt, params, chat=False), rec)
    drain(engine)
    (final,) = rec.final
    assert isinstance(final, Finished), final  # the engine survives: the row does finish
    gen = final.generation
    assert not any(math.isnan(lp) for lp in gen.logprobs), gen


SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(batch=st.lists(requests(), min_size=1, max_size=8), max_queue=st.sampled_from([64, 64, 64, 5]))
@example(batch=corner_requests(), max_queue=64)
@example(batch=corner_requests()[:3], max_queue=64)
@example(batch=corner_requests()[3:], max_queue=64)
def test_nothing_a_request_carries_kills_the_engine(batch, max_queue):
    run_batch(batch, max_queue)
