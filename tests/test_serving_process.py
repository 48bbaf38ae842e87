"""The serving engine in its own process (lmforge.serving.process.EngineProcess): same results as in
process, events read on the caller's event loop or a thread, cancel, the queue bound, graceful close;
step messages larger than the pipe read whole on uvloop (issue 22's crash); and supervision: a
killed, stalled or unrestartable engine, and shutdown with a wedged one."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest
import torch

from conftest import tiny_gpt, wait_for
from lmforge.generation.chat import ChatEngine
from lmforge.generation.engine import ServingEngine
from lmforge.generation.interface import (
    EngineClosed,
    EngineDied,
    EngineUnavailable,
    Finished,
    NullObserver,
    QueueFull,
    Request,
)
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model_folder import save_model_dir
from lmforge.serving import aio
from lmforge.serving.process import EngineProcess
from lmforge.tokenizer import ChatTokenizer, train_bpe

CORPUS = ["the fox ran over the hill and the cat sat by the tree in the sun"] * 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("proc")
    tok = ChatTokenizer(train_bpe(CORPUS, vocab_size=280))
    tok.save(root / "tokenizer")
    model = tiny_gpt(tok.vocab_size, block_size=64, n_head=2, n_kv_head=2).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(5.0)
    return save_model_dir(model, model.config, root / "tokenizer", root / "model")


@pytest.fixture(scope="module")
def chat(model_dir):
    return ChatEngine.from_dir(model_dir)


def start(model_dir, chat, **kw) -> EngineProcess:
    cfg = chat.model.config
    return EngineProcess(
        model_dir, block_size=cfg.block_size, vocab_size=cfg.vocab_size, torch_threads=1, **kw
    )


def prompt(chat, text: str) -> list[int]:
    return chat.chat_ids([{"role": "user", "content": text}])


def test_same_outputs_as_in_process_and_events_on_the_loop(model_dir, chat):
    proc = start(model_dir, chat)
    local = ServingEngine(chat)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    seeded = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    texts = ["the fox", "a cat by the tree", "sun"]

    async def run(engine):
        out = []
        for t in texts:
            for p in (greedy, seeded):
                (f,) = await aio.generate(engine, prompt(chat, t), p, chat=True)
                out.append(f.generation.token_ids)
        bursts = [b async for b in aio.open_stream(engine, prompt(chat, "the fox"), greedy, chat=True)]
        return out, bursts

    try:
        got, bursts = asyncio.run(run(proc))
        want, _ = asyncio.run(run(local))
        assert got == want
        assert isinstance(proc._reader, asyncio.AbstractEventLoop)  # read on the loop, no thread
        events = [e for b in bursts for e in b]
        assert isinstance(events[-1], Finished)
        streamed = "".join(e.text or "" for e in events[:-1])
        assert streamed == events[-1].generation.text
    finally:
        proc.close(5)
        local.close(5)
    assert not proc.alive


def test_thread_reader_cancel_and_queue_bound(model_dir, chat):
    proc = start(model_dir, chat, max_batch=1, max_queue=1)
    long = SamplingParams(max_new_tokens=60, temperature=0.8, seed=1)
    got: dict[int, list] = {0: [], 1: []}
    ended = threading.Event()

    def listener(k):
        def emit(i, event):
            got[k].append(event)
            if k == 1 and isinstance(event, Finished | Exception):
                ended.set()

        return emit

    try:
        first = proc.submit(Request(prompt(chat, "the"), long, chat=True, stream=True), listener(0))
        proc.submit(
            Request(prompt(chat, "fox"), SamplingParams(max_new_tokens=4, temperature=0), chat=True),
            listener(1),
        )
        with pytest.raises(QueueFull, match="queue is full"):  # one running + one waiting
            proc.submit(Request(prompt(chat, "cat"), long, chat=True), lambda i, e: None)
        deadline = time.monotonic() + 30
        while not got[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        first.cancel()  # frees the only slot: the waiting request runs
        assert ended.wait(30)
        assert isinstance(got[1][-1], Finished) and got[1][-1].generation.token_ids
        assert isinstance(proc._reader, threading.Thread)  # no event loop: a thread reads
        while proc.running or proc.waiting:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.close(5)


def test_close_is_graceful_and_a_dead_child_fails_what_is_pending(model_dir, chat):
    proc = start(model_dir, chat)
    done = threading.Event()
    result: list = []

    def emit(i, event):
        if isinstance(event, Finished | Exception):
            result.append(event)
            done.set()

    proc.submit(
        Request(prompt(chat, "the fox"), SamplingParams(max_new_tokens=20, temperature=0), chat=True), emit
    )
    proc.close(10)  # running rows get the grace period
    assert done.wait(10) and isinstance(result[0], Finished)
    with pytest.raises(EngineClosed):
        proc.submit(Request(prompt(chat, "x"), SamplingParams(max_new_tokens=2), chat=True), emit)

    proc = start(model_dir, chat)
    failed = threading.Event()
    errors: list = []

    def on_error(i, event):
        if isinstance(event, Exception):
            errors.append(event)
            failed.set()

    os.kill(proc.pid, signal.SIGSTOP)  # held, so the request is surely in flight when it dies
    proc.submit(
        Request(prompt(chat, "the"), SamplingParams(max_new_tokens=60, temperature=1.0), chat=True), on_error
    )
    os.kill(proc.pid, signal.SIGKILL)  # the engine dies mid-request
    assert failed.wait(20)
    assert isinstance(errors[0], EngineDied) and "killed by SIGKILL" in str(errors[0])
    proc.close(1)


# --------------------------------------------------------------------------- issue 22: reading and supervision


class Observed(NullObserver):
    """An observer that keeps the restarts and error kinds it is told of."""

    def __init__(self) -> None:
        self.restarts: list[str] = []
        self.errors: list[str] = []

    def error(self, kind: str) -> None:
        self.errors.append(kind)

    def engine_restart(self, cause: str) -> None:
        self.restarts.append(cause)


def test_step_messages_larger_than_the_pipe_are_read_whole_on_uvloop(model_dir, chat):
    """Issue 22's root cause. uvloop (BentoML's loop) makes a reader's descriptor non-blocking, and a
    step whose rows all finish together, each with 20 alternatives per token, is a message of
    hundreds of KB: more than a pipe holds, so a read sees part of it. ``Connection.recv`` then raised
    BlockingIOError, taken for the engine's death (500 "engine process stopped") while the engine ran
    on unheard: every later request hung and /readyz still said 200."""
    uvloop = pytest.importorskip("uvloop")
    proc = start(model_dir, chat, max_batch=16)
    params = SamplingParams(max_new_tokens=60, temperature=0, logprobs=20)
    prompts = [[5], *[prompt(chat, w) for w in ("the", "fox", "cat", "sun", "hill", "tree", "ran")]]

    async def run():
        jobs = [aio.generate(proc, p, params, chat=False, n=2) for p in prompts]
        return await asyncio.gather(*jobs)

    try:
        results = uvloop.run(run())
        for done in results:
            assert [len(f.generation.top_logprobs) for f in done] == [
                len(f.generation.token_ids) for f in done
            ]
            assert all(len(top) == 20 for f in done for top in f.generation.top_logprobs)
        assert proc.alive and proc.restarts == 0
        # and the engine still answers a plain request after it
        (f,) = uvloop.run(
            aio.generate(proc, [5, 6], SamplingParams(max_new_tokens=3, temperature=0), chat=False)
        )
        assert len(f.generation.token_ids) == 3
    finally:
        proc.close(5)


def test_a_killed_engine_fails_in_flight_requests_restarts_and_serves_held_ones(model_dir, chat):
    observed = Observed()
    proc = start(model_dir, chat, observer=observed, restart_backoff_s=0.2)
    events: list = []
    ended = threading.Event()

    def emit(i, event):
        events.append(event)
        if isinstance(event, Finished | Exception):
            ended.set()

    try:
        first_pid = proc.pid
        os.kill(first_pid, signal.SIGSTOP)  # held, so the request is surely in flight when it dies
        proc.submit(
            Request(prompt(chat, "the"), SamplingParams(max_new_tokens=60), chat=True, stream=True), emit
        )
        time.sleep(0.2)
        os.kill(first_pid, signal.SIGKILL)
        assert ended.wait(20)
        assert isinstance(events[-1], EngineDied) and "killed by SIGKILL" in str(events[-1])
        assert "restarted" in str(events[-1])
        wait_for(lambda: not proc.alive, 10, "readiness to drop")  # not ready while it restarts
        assert proc.live
        # A request that arrives during the restart waits for the new engine, then runs.
        held: list = []
        done = threading.Event()
        proc.submit(
            Request(prompt(chat, "fox"), SamplingParams(max_new_tokens=4, temperature=0), chat=True),
            lambda i, e: (held.append(e), done.set()),
        )
        assert done.wait(60), "the held request never ended"
        assert isinstance(held[-1], Finished), held
        assert proc.alive and proc.pid != first_pid and proc.restarts == 1
        assert observed.restarts == ["SIGKILL"] and "engine_died" in observed.errors
    finally:
        proc.close(5)
    assert not proc.alive


def test_an_engine_that_cannot_restart_gives_up_and_is_no_longer_live(model_dir, chat, tmp_path):
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    proc = start(folder, chat, restart_backoff_s=0.05, max_restarts=1)
    try:
        shutil.rmtree(folder)  # the next engine cannot load its weights
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: not proc.live, 120, "the supervisor to give up")
        assert not proc.alive
        with pytest.raises(EngineUnavailable, match="could not be restarted"):
            proc.submit(Request([5, 6], SamplingParams(max_new_tokens=2), chat=False), lambda i, e: None)
    finally:
        proc.close(1)


def test_a_stalled_engine_is_killed_and_replaced(model_dir, chat):
    proc = start(model_dir, chat, stall_s=1.0, restart_backoff_s=0.1)
    errors: list = []
    failed = threading.Event()
    try:
        pid = proc.pid
        os.kill(pid, signal.SIGSTOP)  # wedged: alive, never answers
        proc.submit(
            Request([5, 6], SamplingParams(max_new_tokens=4, temperature=0), chat=False),
            lambda i, e: (errors.append(e), failed.set()),
        )
        assert failed.wait(30)
        assert isinstance(errors[0], EngineDied) and "killed by SIGKILL" in str(errors[0])
        wait_for(lambda: proc.alive, 60, "the replacement engine")
        assert proc.pid != pid and proc.restarts == 1
    finally:
        proc.close(1)


@pytest.mark.parametrize("state", ["wedged", "dead"])
def test_close_finishes_with_a_wedged_or_dead_engine(model_dir, chat, state):
    proc = start(model_dir, chat, stall_s=None, max_restarts=0)
    ended = threading.Event()
    pid = proc.pid
    proc.submit(
        Request([5, 6], SamplingParams(max_new_tokens=60, temperature=1.0), chat=False),
        lambda i, e: ended.set(),
    )
    os.kill(pid, signal.SIGSTOP if state == "wedged" else signal.SIGKILL)
    started = time.monotonic()
    proc.close(1)
    took = time.monotonic() - started
    assert took < 1 + 2 + 3, f"close took {took:.1f} s"
    assert ended.wait(5), "the in-flight request was never ended"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_submit_never_blocks_on_a_wedged_engine(model_dir, chat):
    """Requests to an engine that reads nothing (SIGSTOP) fill its pipe; submit must still return at
    once (it runs on the web server's event loop), and close must end every one of them."""
    proc = start(model_dir, chat, stall_s=None, max_queue=1000)
    ended = []
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        long_prompt = [5, 6, 7, 8] * 15  # 60 tokens: 300 requests are far more than a pipe holds
        started = time.monotonic()
        for _ in range(300):
            proc.submit(
                Request(long_prompt, SamplingParams(max_new_tokens=2), chat=False),
                lambda i, e: ended.append(e),
            )
        took = time.monotonic() - started
        assert took < 2.0, f"300 submits to a wedged engine took {took:.1f} s"
    finally:
        proc.close(0.5)
    wait_for(lambda: len(ended) == 300, 10, "every request to end")
    assert all(isinstance(e, EngineClosed) for e in ended)


def test_both_engines_implement_the_declared_interface(model_dir, chat):
    from lmforge.generation.interface import Engine

    proc = start(model_dir, chat)
    local = ServingEngine(chat)
    try:
        for engine in (proc, local):
            assert isinstance(engine, Engine)
            assert engine.alive and engine.live and engine.state == "running"
    finally:
        proc.close(1)
        local.close(1)
    assert proc.state == local.state == "closing"


def test_a_request_right_after_the_engine_exits_waits_for_the_next_one(model_dir, chat):
    """Once the engine has exited, readiness is False at once, even before the event reader has
    seen the pipe close; a request submitted in that window must wait for the restarted engine,
    not be sent to the dead one and fail with it (seen in CI: /readyz said 503, then the next
    request got engine_died)."""
    proc = start(model_dir, chat, restart_backoff_s=0.1)
    greedy = SamplingParams(max_new_tokens=3, temperature=0)
    try:
        first = threading.Event()
        proc.submit(Request([5, 6], greedy, chat=False), lambda i, e: first.set())  # the reader runs
        assert first.wait(20)
        with proc._lock:  # hold the reader off the pipe's end while the engine dies
            os.kill(proc.pid, signal.SIGKILL)
            wait_for(lambda: not proc._child.proc.is_alive(), 10, "the engine to exit")
            assert not proc.alive
            got: list = []
            done = threading.Event()
            proc.submit(Request([5, 6], greedy, chat=False), lambda i, e: (got.append(e), done.set()))
        assert done.wait(60)
        assert isinstance(got[0], Finished), got
        assert proc.restarts == 1
    finally:
        proc.close(1)


def test_an_engine_idle_past_the_stall_limit_is_not_taken_for_stalled(model_dir, chat):
    """The stall clock runs only while the engine has work: an engine that sat idle for longer than
    stall_s and then gets a request is not killed for the silence before it (the supervisor checks
    once a second, so it could otherwise strike between a request and the engine's first step)."""
    proc = start(model_dir, chat, stall_s=1.5)
    try:
        time.sleep(2.0)  # idle past the limit: no steps, no messages
        os.kill(proc.pid, signal.SIGSTOP)  # the request below is in hand, not yet answered
        done = threading.Event()
        proc.submit(
            Request([5, 6], SamplingParams(max_new_tokens=3, temperature=0), chat=False),
            lambda i, e: done.set(),
        )
        assert not proc._stalled(proc._child)
        os.kill(proc.pid, signal.SIGCONT)
        assert done.wait(20)
        assert proc.restarts == 0 and proc.alive
        # Idle again: the engine's last step said so (the stall check also counts the engine's load,
        # other workers' rows on a shared engine), and silence past the limit is no stall.
        time.sleep(2.0)
        assert (proc.waiting, proc.running) == (0, 0) and not proc._stalled(proc._child)
    finally:
        proc.close(1)


def test_the_engine_process_serves_in_the_dtype_asked(model_dir, chat, monkeypatch):
    """Issue 25: a server ran fp32 weights and an fp32 KV cache even on CUDA. The engine process loads
    in `serving_dtype` (bfloat16 on CUDA; $LMFORGE_DTYPE overrides), reports it, and replies in it
    as an in-process engine in the same dtype does."""
    monkeypatch.setenv("LMFORGE_DTYPE", "bfloat16")
    proc = start(model_dir, chat)
    local = ServingEngine(ChatEngine.from_dir(model_dir, dtype=torch.bfloat16))
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    try:
        assert proc.dtype == local.dtype == "bfloat16"
        assert local.cache.keys[0].dtype == torch.bfloat16  # the KV cache follows the weights

        async def run(engine):
            (f,) = await aio.generate(engine, prompt(chat, "the fox"), greedy, chat=True)
            return f.generation.token_ids

        assert asyncio.run(run(proc)) == asyncio.run(run(local))
    finally:
        proc.close(5)
        local.close(5)
