"""The serving engine in its own process (lmforge.serving.process.EngineProcess): same results as in
process, events read on the caller's event loop or a thread, cancel, the queue bound, graceful close,
and a child that dies."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest
import torch

from conftest import tiny_gpt
from lmforge.engine import ChatEngine
from lmforge.model_folder import save_model_dir
from lmforge.sampling import SamplingParams
from lmforge.serving import EngineClosed, Finished, GenerationFailed, QueueFull, ServingEngine, aio
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
        first = proc.submit(prompt(chat, "the"), long, listener(0), chat=True, stream=True)
        proc.submit(
            prompt(chat, "fox"), SamplingParams(max_new_tokens=4, temperature=0), listener(1), chat=True
        )
        with pytest.raises(QueueFull, match="queue is full"):  # one running + one waiting
            proc.submit(prompt(chat, "cat"), long, lambda i, e: None, chat=True)
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

    proc.submit(prompt(chat, "the fox"), SamplingParams(max_new_tokens=20, temperature=0), emit, chat=True)
    proc.close(10)  # running rows get the grace period
    assert done.wait(10) and isinstance(result[0], Finished)
    with pytest.raises(EngineClosed):
        proc.submit(prompt(chat, "x"), SamplingParams(max_new_tokens=2), emit, chat=True)

    proc = start(model_dir, chat)
    failed = threading.Event()
    errors: list = []

    def on_error(i, event):
        if isinstance(event, Exception):
            errors.append(event)
            failed.set()

    proc.submit(prompt(chat, "the"), SamplingParams(max_new_tokens=60, temperature=1.0), on_error, chat=True)
    os.kill(proc._proc.pid, signal.SIGKILL)  # the engine dies mid-request
    assert failed.wait(20)
    assert isinstance(errors[0], GenerationFailed) and "engine process stopped" in str(errors[0])
    proc.close(1)
