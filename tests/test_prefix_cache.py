"""Automatic prefix caching (lmforge.generation.prefix_cache and the engine's use of it): replies are
the same with the cache on and off, a prompt that shares a prefix with an earlier one prefills only
the rest, the store keeps to its budget (least recently used blocks go first), and compaction or a
cancellation while a row runs on cached blocks disturbs no other row. Also the hit counters, in
the engine's stats and through the engine process's observer replay.

What "the same" means: token ids, text and finish reasons are identical. Log-probabilities (asked
for everywhere: this random model's greedy tokens hardly depend on the context, its logprobs do, so
they are what catches a wrong key or value) agree to ~1e-6, not bit for bit: a prompt whose prefix came from the cache runs its remaining tokens as a
shorter chunk, and CPU matmuls round differently with the number of rows (oneDNN/MKL pick another
kernel for small M; ``Linear`` on 1 row vs the same row among 120 differs by ~1e-7). The engine
without the cache already differs by as much between prefill chunk sizes or batch compositions
(see tests/test_serving_engine.py, which compares logprobs to 1e-4).

The engines here run with ``thread=False``: the test drives ``iterate()`` and knows exactly which
rows share a step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from conftest import tiny_gpt
from lmforge.generation.chat import ChatEngine
from lmforge.generation.engine import ServingEngine
from lmforge.generation.interface import Finished, NullObserver, Request
from lmforge.generation.outputs import Generation
from lmforge.generation.prefix_cache import PrefixCache, block_keys
from lmforge.generation.sampling_params import SamplingParams
from lmforge.kv_cache import SlotKVCache
from lmforge.tokenizer import ChatTokenizer, train_bpe
from test_service import CORPUS

CONTEXT = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: a tiny model's ops are too small to split, and on a busy 2-core machine
    two spinning threads make each decode step 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat() -> ChatEngine:
    tok = ChatTokenizer(train_bpe(CORPUS, vocab_size=300))
    model = tiny_gpt(tok.vocab_size, block_size=CONTEXT, n_head=2, n_kv_head=2, tie_embeddings=False).eval()
    with torch.no_grad():  # sharper logits: no near-ties between greedy paths
        model.lm_head.weight.mul_(20.0)
    return ChatEngine(model, tok)


@pytest.fixture
def engines() -> Iterator[list[ServingEngine]]:
    made: list[ServingEngine] = []
    yield made
    for engine in made:
        engine.close(grace_s=1.0)


def make(engines: list[ServingEngine], chat: ChatEngine, **kw) -> ServingEngine:
    engine = ServingEngine(chat, thread=False, **{"max_batch": 4, "max_queue": 64, **kw})
    engines.append(engine)
    return engine


class Got:
    """Every row's last event, by request and choice."""

    def __init__(self) -> None:
        self.final: dict[tuple[int, int], object] = {}

    def emit(self, rid: int):
        def emit(index: int, event: object) -> None:
            if isinstance(event, Finished | Exception):
                self.final[(rid, index)] = event

        return emit

    def generation(self, rid: int, index: int = 0) -> Generation:
        event = self.final[(rid, index)]
        assert isinstance(event, Finished), event
        return event.generation


def drain(engine: ServingEngine, limit: int = 10_000) -> None:
    with torch.inference_mode():
        for _ in range(limit):
            if engine.idle:
                return
            engine.iterate()
    raise AssertionError("the engine did not finish")


_TEXT: dict[int, list[int]] = {}


def text_ids(chat: ChatEngine, n: int, start: int = 0) -> list[int]:
    """Tokens ``start .. start + n`` of the corpus as one raw text (BOS first)."""
    ids = _TEXT.setdefault(id(chat), chat.prompt_ids(" ".join(CORPUS)))
    assert len(ids) >= start + n
    return ids[start : start + n]


def prompts(chat: ChatEngine) -> list[list[int]]:
    """Prompts around one 40-token prefix: other suffixes (one diverging inside a block), prompts of
    exactly 2 and 3 blocks of 16 (and of 8), the same prompt twice, one shorter than a block, a
    prompt that is a prefix of another, and chat prompts (the template's shared start)."""
    prefix = text_ids(chat, 40)
    other = text_ids(chat, 40, start=50)
    return [
        prefix + other[:7],
        prefix + other[10:15],
        prefix[:36] + other[:9],  # diverges in the third block of 16
        prefix[:32],  # exactly 2 blocks of 16 (4 of 8)
        prefix + other[:8],  # exactly 3 blocks of 16 (6 of 8)
        prefix + other[:8],  # the same again
        prefix[:32],
        prefix[:5],  # under one block
        prefix,
        other[:30],
        chat.chat_ids([{"role": "user", "content": "the fox ran over the hill"}]),
        chat.chat_ids([{"role": "user", "content": "the fox ran over the hill and the cat"}]),
    ]


PARAMS = [
    SamplingParams(max_new_tokens=10, temperature=0.0, logprobs=2),
    SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, logprobs=0),
    SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=11, repetition_penalty=1.3),
]


def replies(engine: ServingEngine, chat: ChatEngine, *, together: bool, n: int = 1) -> list[Generation]:
    """Every prompt under every PARAMS; one request at a time, or all submitted at once."""
    got, rid = Got(), 0
    asked = [(p, params) for params in PARAMS for p in prompts(chat)]
    for prompt, params in asked:
        engine.submit(Request(prompt, params, chat=False, n=n), got.emit(rid))
        rid += 1
        if not together:
            drain(engine)
    drain(engine)
    return [got.generation(r, i) for r in range(rid) for i in range(n)]


def assert_same(with_cache: list[Generation], without: list[Generation]) -> None:
    assert len(with_cache) == len(without)
    for i, (a, b) in enumerate(zip(with_cache, without, strict=True)):
        assert a.token_ids == b.token_ids, f"reply {i}"
        assert a.text == b.text and a.finish_reason == b.finish_reason, f"reply {i}"
        if b.logprobs is not None:
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


# --------------------------------------------------------------------------- (a) the same replies


@pytest.mark.parametrize("block", [16, 8])
@pytest.mark.parametrize("together", [False, True], ids=["one_after_another", "concurrently"])
@pytest.mark.parametrize("chunk", [512, 6])
def test_replies_are_the_same_with_the_cache_on_and_off(engines, chat, block, together, chunk):
    off = replies(make(engines, chat, prefill_chunk=chunk), chat, together=together)
    engine = make(engines, chat, prefill_chunk=chunk, prefix_cache_mb=4, prefix_block=block)
    on = replies(engine, chat, together=together)
    assert_same(on, off)
    stats = engine.stats
    assert stats["prefix_cache_hit_tokens"] > 0
    assert stats["prefill_tokens"] == stats["prefix_cache_queried_tokens"] - stats["prefix_cache_hit_tokens"]
    assert stats["prefix_cache_queried_tokens"] == sum(len(p) for p in prompts(chat)) * len(PARAMS)


def test_choices_of_one_request_and_a_warm_cache(engines, chat):
    """n > 1 rows of one prompt prefill together; a second pass over the same requests is all hits
    but each prompt's last token."""
    off = replies(make(engines, chat, max_queue=256), chat, together=True, n=3)
    engine = make(engines, chat, max_queue=256, prefix_cache_mb=4)
    cold = replies(engine, chat, together=True, n=3)
    hits = engine.stats["prefix_cache_hit_tokens"]
    warm = replies(engine, chat, together=True, n=3)
    assert_same(cold, off)
    assert_same(warm, off)
    assert engine.stats["prefix_cache_hit_tokens"] > hits


def test_replies_match_the_cache_free_reference(engines, chat):
    """Greedy replies through cached blocks equal the whole-sequence forward pass (no KV cache)."""
    from test_serving_engine import static

    engine = make(engines, chat, prefix_cache_mb=4, prefill_chunk=5)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=2)
    got = Got()
    for rid, prompt in enumerate(prompts(chat)):
        engine.submit(Request(prompt, params, chat=False), got.emit(rid))
        drain(engine)
    assert engine.stats["prefix_cache_hit_tokens"] > 0
    for rid, prompt in enumerate(prompts(chat)):
        assert_same([got.generation(rid)], [static(chat, prompt, params)])


# --------------------------------------------------------------------------- (b) hits and saved prefill


class PrefixObserver(NullObserver):
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def prefix_cache(self, queried: int, hit: int) -> None:
        self.calls.append((queried, hit))


def test_a_shared_prefix_is_prefilled_once(engines, chat):
    prefix = text_ids(chat, 50)
    first, second = prefix + text_ids(chat, 6, start=60), prefix + text_ids(chat, 9, start=70)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    observer = PrefixObserver()
    engine = make(engines, chat, prefix_cache_mb=1, prefix_block=16, prefill_chunk=8, observer=observer)
    got = Got()
    engine.submit(Request(first, greedy, chat=False), got.emit(0))
    drain(engine)
    assert engine.stats["prefill_tokens"] == len(first)
    assert engine.stats["prefix_cache_blocks"] == len(first) // 16
    chunks = engine.stats["prefill_chunks"]
    engine.submit(Request(second, greedy, chat=False), got.emit(1))
    drain(engine)
    assert engine.stats["prefix_cache_hit_tokens"] == 48  # the 3 whole blocks of 16 of the shared 50
    assert engine.stats["prefill_tokens"] == len(first) + len(second) - 48
    assert engine.stats["prefill_chunks"] - chunks == -(-(len(second) - 48) // 8)  # 2 chunks, not 8
    assert observer.calls == [(len(first), 0), (len(second), 48)]
    # A prompt the cache holds whole still prefills its last token (for the first token's logits).
    engine.submit(Request(first[:48], greedy, chat=False), got.emit(2))
    drain(engine)
    assert observer.calls[-1] == (48, 47)


def test_scored_prompts_bypass_the_cache(engines, chat):
    prompt = text_ids(chat, 40)
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0, logprobs=1)
    engine = make(engines, chat, prefix_cache_mb=1)
    got = Got()
    engine.submit(Request(prompt, greedy, chat=False), got.emit(0))
    drain(engine)
    queried = engine.stats["prefix_cache_queried_tokens"]
    engine.submit(Request(prompt, greedy, chat=False, prompt_logprobs=1), got.emit(1))
    engine.submit(Request(prompt, greedy, chat=False, score_only=True), got.emit(2))
    drain(engine)
    assert engine.stats["prefix_cache_queried_tokens"] == queried  # neither looked it up
    scored = got.final[(1, 0)].prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None and all(s is not None for s in scored[1:])
    assert isinstance(got.final[(2, 0)], Finished)
    assert_same([got.generation(1)], [got.generation(0)])


def test_off_by_default_and_with_a_zero_budget(engines, chat):
    for engine in (make(engines, chat), make(engines, chat, prefix_cache_mb=0)):
        assert engine.prefix_cache is None
        got = Got()
        for rid in range(2):
            engine.submit(Request(text_ids(chat, 40), PARAMS[0], chat=False), got.emit(rid))
            drain(engine)
        assert engine.stats["prefix_cache_queried_tokens"] == 0
        assert engine.stats["prefill_tokens"] == 80
    with pytest.raises(ValueError):
        ServingEngine(chat, thread=False, prefix_cache_mb=-1)


# --------------------------------------------------------------------------- (c) the budget, LRU


def slot_cache(slots: int = 2, max_len: int = 64) -> SlotKVCache:
    torch.manual_seed(0)
    cache = SlotKVCache(2, slots, 2, max_len, 4)
    for buf in (*cache.keys, *cache.values):
        buf.copy_(torch.randn_like(buf))
    return cache


def store_for(blocks: int, block: int = 4) -> PrefixCache:
    probe = PrefixCache(n_layer=2, n_kv_head=2, head_dim=4, budget_bytes=0, block=block)
    return PrefixCache(
        n_layer=2, n_kv_head=2, head_dim=4, budget_bytes=blocks * probe.block_bytes, block=block
    )


def test_blocks_round_trip_and_keys_name_the_whole_prefix():
    cache = slot_cache()
    store = store_for(16)
    assert store.block_bytes == 2 * 2 * 2 * 4 * 4 * 4  # k+v, layers, heads, block, head_dim, fp32
    prompt = list(range(10, 24))  # 14 tokens: 3 whole blocks of 4
    assert store.insert(prompt, cache, slot=0) == 3 and store.blocks == 3
    assert store.insert(prompt, cache, slot=0) == 0  # nothing new
    n, blocks = store.lookup(prompt + [99])
    assert n == 12 and len(blocks) == 3
    store.load(blocks, cache, slot=1)
    for buf in (*cache.keys, *cache.values):
        assert torch.equal(buf[1, :, :12], buf[0, :, :12])
    # A key names the prefix up to it: the same third block after another first block is no hit.
    assert store.lookup([0] + prompt[1:]) == (0, [])
    assert store.lookup(prompt[:4] + [0] + prompt[5:])[0] == 4
    assert store.lookup(prompt, max_blocks=2)[0] == 8
    keys = block_keys(prompt, 4)
    assert len(keys) == 3 and len(set(keys)) == 3 and block_keys(prompt[:8], 4) == keys[:2]


def test_lru_eviction_keeps_the_store_within_its_budget():
    cache = slot_cache()
    store = store_for(5)
    assert store.capacity == 5
    a, b, c = list(range(0, 12)), list(range(100, 112)), list(range(200, 212))  # 3 blocks each
    store.insert(a, cache, 0)
    store.insert(b, cache, 0)  # 6 blocks wanted, 5 fit: a's last block goes first
    assert store.blocks == 5 and store.evictions == 1 and store.bytes <= 5 * store.block_bytes
    assert store.lookup(a)[0] == 8  # a's first two blocks survived (a prompt's tail goes first)
    assert store.lookup(b)[0] == 12
    store.lookup(a)  # a is now the most recently used
    store.insert(c, cache, 0)
    assert store.blocks == 5 and store.bytes == 5 * store.block_bytes
    assert store.lookup(c)[0] == 12 and store.lookup(a)[0] == 8 and store.lookup(b)[0] == 0
    # A prompt longer than the whole store keeps its first blocks.
    store.insert(list(range(300, 340)), cache, 0)
    assert store.blocks == 5 and store.lookup(list(range(300, 340)))[0] == 20
    assert store.evictions == 1 + 3 + 5


def test_the_engine_keeps_its_store_within_budget_and_replies_stay_right(engines, chat):
    off = make(engines, chat)
    probe = make(engines, chat, prefix_cache_mb=1, prefix_block=8).prefix_cache
    assert probe is not None
    blocks = 6
    engine = make(engines, chat, prefix_cache_mb=blocks * probe.block_bytes / 2**20, prefix_block=8)
    assert engine.prefix_cache is not None and engine.prefix_cache.capacity == blocks
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=1)
    # 5 prefixes of 2-3 blocks cycle through 6 blocks: each is evicted before it comes round again,
    # but one asked again after another prompt (which took the slot since) hits.
    other = text_ids(chat, 24, start=100)
    asked = []
    for i in range(10):
        prompt = text_ids(chat, 20 + 3 * (i % 4), start=7 * (i % 5))
        asked += [prompt, other, prompt]
    got_on, got_off = Got(), Got()
    for rid, prompt in enumerate(asked):
        for eng, got in ((engine, got_on), (off, got_off)):
            eng.submit(Request(prompt, greedy, chat=False), got.emit(rid))
            drain(eng)
        assert engine.stats["prefix_cache_bytes"] <= blocks * probe.block_bytes
        assert engine.stats["prefix_cache_blocks"] <= blocks
    assert engine.stats["prefix_cache_evictions"] > 0 and engine.stats["prefix_cache_hit_tokens"] > 0
    for rid in range(len(asked)):
        assert_same([got_on.generation(rid)], [got_off.generation(rid)])


# --------------------------------------------------------------------------- (d) compaction, cancellation


def test_compaction_and_cancellation_around_a_row_on_cached_blocks(engines, chat):
    """A row reading cached blocks is moved to another slot (the row before it finishes) while still
    prefilling, and a cancelled row's slot is refilled meanwhile: its reply and every other row's
    are what they are alone."""
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=1)
    one = SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=1)
    prefix = text_ids(chat, 48)
    cached = prefix + text_ids(chat, 20, start=60)  # 48 tokens from the cache, 20 prefilled
    short, other = text_ids(chat, 3, start=90), text_ids(chat, 2, start=95)
    solo = make(engines, chat)
    alone = Got()
    for rid, prompt in enumerate((short, other, cached)):
        solo.submit(Request(prompt, greedy, chat=False), alone.emit(rid))
        drain(solo)
    engine = make(engines, chat, max_batch=3, prefill_chunk=6, prefix_cache_mb=1, prefix_block=16)
    warm = Got()
    engine.submit(Request(prefix, one, chat=False), warm.emit(0))
    drain(engine)
    assert engine.stats["prefix_cache_blocks"] == 3
    got = Got()
    engine.submit(Request(other, one, chat=False), got.emit(1))  # slot 0, done after its first chunk
    doomed = engine.submit(
        Request(short, SamplingParams(max_new_tokens=50, temperature=0.0), chat=False), got.emit(9)
    )
    engine.submit(Request(cached, greedy, chat=False), got.emit(2))  # slot 2
    engine.submit(Request(short, greedy, chat=False), got.emit(0))  # waits for a slot
    with torch.inference_mode():
        # Chunk of 6: other's 2, doomed's 3, and cached's first (after 48 from the cache). Other
        # then finishes and the last row, cached, moves into its slot with 49 positions.
        engine.iterate()
        row = next(r for r in engine._rows if r.prompt == cached)
        assert row.looked_up and row.prefilled == 49 and row in engine._prefilling
        assert engine._rows.index(row) == 0
        engine.iterate()  # short takes the free slot (2); cached prefills 6 more
        doomed.cancel()
        engine.iterate()  # doomed (slot 1) leaves: short moves into its slot
        assert [r.prompt for r in engine._rows] == [cached, short] and row in engine._prefilling
    drain(engine)
    assert engine.stats["prefix_cache_hit_tokens"] == 48 + 0 + 0
    assert_same([got.generation(0), got.generation(2)], [alone.generation(0), alone.generation(2)])
    assert got.generation(1).token_ids == alone.generation(1).token_ids[:1]
    assert got.generation(1).logprobs == pytest.approx(alone.generation(1).logprobs[:1], abs=1e-4)
    assert not isinstance(got.final[(9, 0)], Finished)  # cancelled


def test_a_threaded_engine_under_concurrent_submits(chat):
    """The engine's own thread, clients on several threads, shared and unshared prefixes."""
    off = ServingEngine(chat, max_batch=3, prefill_chunk=10)
    on = ServingEngine(chat, max_batch=3, prefill_chunk=10, prefix_cache_mb=2, prefix_block=8)
    asked = [(p, params) for params in PARAMS[:2] for p in prompts(chat)]
    try:
        results = {}
        for name, engine in (("off", off), ("on", on)):
            got, done = Got(), threading.Semaphore(0)

            def emit(rid: int, got=got, done=done):
                inner = got.emit(rid)

                def wrapped(index: int, event: object) -> None:
                    inner(index, event)
                    if isinstance(event, Finished | Exception):
                        done.release()

                return wrapped

            def client(part: list[int], engine=engine, emit=emit) -> None:
                for rid in part:
                    prompt, params = asked[rid]
                    engine.submit(Request(prompt, params, chat=False), emit(rid))

            threads = [
                threading.Thread(target=client, args=(list(range(k, len(asked), 3)),)) for k in range(3)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for _ in asked:
                assert done.acquire(timeout=60)
            results[name] = [got.generation(rid) for rid in range(len(asked))]
        assert_same(results["on"], results["off"])
        assert on.stats["prefix_cache_hit_tokens"] > 0
    finally:
        off.close(1)
        on.close(1)


# --------------------------------------------------------------------------- the engine process


def test_hits_reach_the_parent_observer_and_stats_from_the_engine_process(tmp_path, chat):
    from lmforge.model_folder import save_model_dir
    from lmforge.serving.process import EngineProcess

    chat.tok.save(tmp_path / "tokenizer")
    folder = save_model_dir(chat.model, chat.model.config, tmp_path / "tokenizer", tmp_path / "model")
    observer = PrefixObserver()
    cfg = chat.model.config
    proc = EngineProcess(
        folder, block_size=cfg.block_size, vocab_size=cfg.vocab_size, torch_threads=1, observer=observer
    )
    try:
        prompt = text_ids(chat, 40)
        for _ in range(2):
            done = threading.Event()
            proc.submit(
                Request(prompt, SamplingParams(max_new_tokens=3, temperature=0.0), chat=False),
                lambda i, e, done=done: done.set() if isinstance(e, Finished | Exception) else None,
            )
            assert done.wait(60)
        for _ in range(200):  # the step that carries the observations may come after the event
            if len(observer.calls) == 2 and proc.stats.get("prefix_cache_hit_tokens"):
                break
            time.sleep(0.05)
        assert observer.calls == [(40, 0), (40, 32)]  # the default: 64 MB in blocks of 16
        assert proc.stats["prefix_cache_hit_tokens"] == 32 and proc.stats["prefix_cache_queried_tokens"] == 80
    finally:
        proc.close(5)
