# ruff: noqa: F811  (the fixtures model_dir and chat come from test_serving_process)
"""One engine process shared by several web processes (lmforge.serving.sharing): the first worker
owns and starts it, the others connect over its Unix socket. Same outputs as a lone engine, rows of
all workers in one batch, metrics counted once; a restarted engine is reconnected to; when the owner
goes, another worker takes the engine over; a worker that hangs up has its rows cancelled; a wrong
key is refused. Workers here are EngineProcess objects in the test process (the file lock is per
open file, so they contend as processes do); tests/test_service_workers.py runs real HTTP workers."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from multiprocessing.connection import Client

import pytest

from conftest import tiny_gpt, wait_for
from lmforge.generation.engine import ServingEngine
from lmforge.generation.interface import (
    EngineClosed,
    EngineDied,
    EngineError,
    Finished,
    NullObserver,
    Request,
)
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model_folder import save_model_dir
from lmforge.serving import aio
from lmforge.serving.messages import Submit
from lmforge.serving.process import EngineProcess
from lmforge.serving.sharing import EngineShare, NoEngine, connect
from test_serving_process import chat, model_dir  # noqa: F401  (module fixtures: the tiny model folder)

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
SEEDED = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)


class Counting(NullObserver):
    def __init__(self) -> None:
        self.first_tokens = 0
        self.restarts: list[str] = []

    def first_token(self, seconds: float) -> None:
        self.first_tokens += 1

    def engine_restart(self, cause: str) -> None:
        self.restarts.append(cause)


@pytest.fixture
def share_of(tmp_path):
    """A fresh share name per test; each worker gets its own EngineShare object (own lock file)."""
    name = f"engine-test-{os.getpid()}-{time.monotonic_ns()}"
    return lambda: EngineShare(EngineShare.for_server(tmp_path).folder, name)


def worker(model_dir, chat, share, **kw) -> EngineProcess:
    cfg = chat.model.config
    kw.setdefault("restart_backoff_s", 0.1)
    return EngineProcess(
        model_dir, block_size=cfg.block_size, vocab_size=cfg.vocab_size, torch_threads=1, share=share, **kw
    )


def prompt(chat, text: str) -> list[int]:
    return chat.chat_ids([{"role": "user", "content": text}])


def test_workers_share_one_engine_with_the_same_outputs_and_metrics_counted_once(model_dir, chat, share_of):
    owner_seen, other_seen = Counting(), Counting()
    a = worker(model_dir, chat, share_of(), observer=owner_seen)
    b = worker(model_dir, chat, share_of(), observer=other_seen)
    lone = ServingEngine(chat)
    texts = ["the fox", "a cat by the tree", "sun", "the hill"]

    async def run(engines):
        jobs = [
            aio.generate(engines[i % len(engines)], prompt(chat, t), p, chat=True)
            for i, t in enumerate(texts)
            for p in (GREEDY, SEEDED)
        ]
        return [f[0].generation.token_ids for f in await asyncio.gather(*jobs)]

    try:
        assert a.owns_shared_engine and not b.owns_shared_engine
        assert b.pid == a.pid and b._child.remote and not a._child.remote  # one engine process
        shared = asyncio.run(run([a, b]))
        assert shared == asyncio.run(run([lone]))
        # every row of both workers is observed once, by the owner
        assert owner_seen.first_tokens == len(shared) and other_seen.first_tokens == 0
    finally:
        b.close(5)
        a.close(5)
        lone.close(5)
    assert not a.alive and not b.alive


def test_a_restarted_engine_is_reconnected_and_in_flight_rows_fail_cleanly(model_dir, chat, share_of):
    owner_seen = Counting()
    a = worker(model_dir, chat, share_of(), observer=owner_seen)
    b = worker(model_dir, chat, share_of())
    long = SamplingParams(max_new_tokens=60, temperature=0.8, seed=1)
    first_pid = a.pid

    async def scenario():
        stream = aio.open_stream(b, prompt(chat, "the fox"), long, chat=True)
        got = await anext(stream)  # running on the shared engine
        assert got
        os.kill(first_pid, signal.SIGSTOP)  # hold it so the row is surely in flight
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(EngineDied, match="hung up"):
            async for _ in stream:
                pass
        # a request sent while the engine restarts waits for it, on the new engine
        (done,) = await aio.generate(b, prompt(chat, "the cat"), GREEDY, chat=True)
        return done

    try:
        done = asyncio.run(scenario())
        assert isinstance(done, Finished) and done.generation.token_ids
        assert a.pid != first_pid and b.pid == a.pid
        assert owner_seen.restarts == ["SIGKILL"]  # counted by the owner only
    finally:
        b.close(5)
        a.close(5)


def test_when_the_owner_goes_another_worker_takes_the_engine_over(model_dir, chat, share_of):
    a = worker(model_dir, chat, share_of())
    b = worker(model_dir, chat, share_of())
    try:
        old = a.pid
        a.close(5)  # the owner worker stops: its engine goes with it
        wait_for(lambda: b.owns_shared_engine and b.alive)
        assert b.pid != old and not b._child.remote
        c = worker(model_dir, chat, share_of())  # a worker started later joins the new owner
        try:
            assert c.pid == b.pid and c._child.remote

            async def both():
                return await asyncio.gather(
                    aio.generate(b, prompt(chat, "sun"), GREEDY, chat=True),
                    aio.generate(c, prompt(chat, "sun"), GREEDY, chat=True),
                )

            (x,), (y,) = asyncio.run(both())
            assert x.generation.token_ids == y.generation.token_ids
        finally:
            c.close(5)
    finally:
        b.close(5)


def test_a_worker_that_hangs_up_has_its_rows_cancelled(model_dir, chat, share_of):
    """24 rows of one worker wait for 2 slots; the worker hangs up: the engine cancels the rest
    instead of running them for nobody."""
    a = worker(model_dir, chat, share_of(), max_batch=2)
    b = worker(model_dir, chat, share_of(), max_batch=2, max_queue=32)
    long = SamplingParams(max_new_tokens=10_000, temperature=0.8, seed=2)  # to the end of the context
    try:
        for k in range(24):
            b.submit(Request(prompt(chat, f"the fox {k}"), long, True, stream=True), lambda i, e: None)
        wait_for(lambda: a.running == 2 and a.waiting > 0)  # the owner sees the engine's load
        b.close(0)  # hangs up with 2 rows running and the rest waiting
        wait_for(lambda: a.running == 0 and a.waiting == 0, timeout_s=10)
        assert a.stats["rows"] < 24  # the rows still waiting never ran
        (done,) = asyncio.run(aio.generate(a, prompt(chat, "sun"), GREEDY, chat=True))
        assert done.generation.token_ids
    finally:
        a.close(5)


def test_a_connection_without_the_key_is_refused(model_dir, chat, share_of):
    a = worker(model_dir, chat, share_of())
    try:
        share = a.share
        with pytest.raises(Exception):  # noqa: B017 - multiprocessing's AuthenticationError or a hang-up
            conn = Client(share.address()[0], family="AF_UNIX", authkey=b"not the key")
            conn.recv()
        link, requests, events, ready = connect(share)  # the right key still joins
        assert ready.pid == a.pid
        requests.close()
        events.close()
        (done,) = asyncio.run(aio.generate(a, prompt(chat, "sun"), GREEDY, chat=True))
        assert done.generation.token_ids
        assert oct(share.folder.stat().st_mode & 0o777) == "0o700"
    finally:
        a.close(5)
    with pytest.raises(NoEngine):
        connect(share)  # the engine took its socket with it


def read_until_finished(events, rids: set[int], timeout_s: float) -> dict[int, object]:
    """Read Steps from a raw events connection until every request in ``rids`` ended."""
    ended: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    while set(ended) != rids:
        left = deadline - time.monotonic()
        assert left > 0 and events.poll(left), f"ended {sorted(ended)} of {sorted(rids)}"
        step = events.recv()
        for rid, event in zip(step.rids, step.events, strict=True):
            if isinstance(event, Finished | EngineError):
                ended[rid] = event
    return ended


def test_a_worker_that_reads_late_still_gets_every_event_after_the_engine_went_idle(
    model_dir, chat, share_of
):
    """A worker whose loop falls behind: its events wait in the engine's backlog, and are delivered
    even once the engine has nothing left to run (the backlog is written on idle passes too)."""
    a = worker(model_dir, chat, share_of())
    link, requests, events, _ = connect(a.share)
    wide = SamplingParams(max_new_tokens=50, temperature=1.0, seed=4, logprobs=20)  # big events
    try:
        for rid in range(8):
            requests.send(Submit(rid, Request(prompt(chat, "the fox"), wide, True, stream=True)))
        wait_for(lambda: a.running > 0)
        wait_for(lambda: a.running == 0 and a.waiting == 0)  # all done in the engine; nothing read yet
        time.sleep(0.3)
        ended = read_until_finished(events, set(range(8)), timeout_s=10)
        assert all(isinstance(e, Finished) for e in ended.values()), ended
    finally:
        requests.close()
        events.close()
        a.close(5)


@pytest.fixture(scope="module")
def long_model_dir(model_dir, chat):
    """The same tokenizer, a model with a 1024-token context: rows that run for seconds."""
    model = tiny_gpt(chat.tok.vocab_size, block_size=1024, n_head=2, n_kv_head=2).eval()
    return save_model_dir(model, model.config, model_dir.parent / "tokenizer", model_dir.parent / "long")


def test_a_closing_engine_refuses_other_workers_new_requests_at_once(long_model_dir, chat, share_of):
    """The owner closes (grace 10 s) while another worker's row runs: that worker's new request is
    refused at once with EngineClosed, not left unread until the engine exits."""
    cfg = {"block_size": 1024, "vocab_size": chat.tok.vocab_size}
    a = EngineProcess(long_model_dir, **cfg, torch_threads=1, share=share_of())
    link, requests, events, _ = connect(a.share)
    long = SamplingParams(max_new_tokens=1000, temperature=0.8, seed=2, logprobs=20)
    closer = None
    try:
        requests.send(Submit(0, Request(prompt(chat, "the fox"), long, True, stream=True)))
        wait_for(lambda: a.running == 1)
        closer = threading.Thread(target=a.close, args=(10.0,))  # running rows get 10 s
        closer.start()
        time.sleep(0.1)
        started = time.monotonic()
        requests.send(Submit(1, Request(prompt(chat, "the cat"), GREEDY, True)))
        ended = read_until_finished(events, {1}, timeout_s=2)
        assert isinstance(ended[1], EngineClosed), ended
        assert time.monotonic() - started < 2  # not held until the grace period ends
        ended = read_until_finished(events, {0}, timeout_s=20)  # the running row finishes in its grace
        assert isinstance(ended[0], Finished | EngineClosed), ended
    finally:
        if closer is not None:
            closer.join(15)
        requests.close()
        events.close()
        a.close(1)
