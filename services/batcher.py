"""Cross-request batching in front of one :class:`lmforge.engine.ChatEngine`.

One worker thread owns the model. Requests queue up while it is busy; each time it is free it takes
everything queued (waiting ``wait_s`` for stragglers) and merges the non-streaming jobs that can share
a decode loop into one ``ChatEngine.generate_ids`` call (KV-cached, left-padded batch):

* jobs merge when their sampling parameters are identical and they are of the same kind (chat or
  raw prompt, which decides the stop tokens), up to ``max_rows`` rows per call;
* the ``n`` choices of one request are always rows of the same call;
* a job with a ``seed`` is never merged with other requests: its random draws then depend only on
  its own rows, so the same seed gives the same output however busy the server is;
* streams run one at a time through ``ChatEngine.stream_ids`` (token streaming does not fit a shared
  batch here); a client that disconnects stops its stream at the next token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("bentoml.lmforge.batcher")

END = object()  # marks the end of a stream


@dataclass(eq=False)
class BatchJob:
    prompts: list[list[int]]
    params: Any  # lmforge.sampling.SamplingParams
    chat: bool
    future: Future = field(default_factory=Future)

    def key(self) -> tuple:
        if self.params.seed is not None:
            return ("own", id(self))
        return ("shared", self.chat, dataclasses.astuple(self.params))


@dataclass(eq=False)
class StreamJob:
    prompt: list[int]
    params: Any
    chat: bool
    emit: Callable[[Any], None]  # gets each StreamChunk, then END or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class EngineWorker:
    def __init__(self, engine: Any, *, max_rows: int = 32, wait_s: float = 0.002) -> None:
        self.engine, self.max_rows, self.wait_s = engine, max(1, max_rows), max(0.0, wait_s)
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self.stats = {"calls": 0, "requests": 0, "rows": 0, "largest_batch": 0, "streams": 0, "busy_s": 0.0}
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    # ---- client side -------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed.is_set()

    def submit(self, prompts: list[list[int]], params: Any, chat: bool) -> Future:
        """Future of ``list[Generation]``, one per prompt row, in order."""
        job = BatchJob(prompts, params, chat)
        self._queue.put(job)
        return job.future

    def stream(self, prompt: list[int], params: Any, chat: bool, emit: Callable[[Any], None]) -> StreamJob:
        job = StreamJob(prompt, params, chat, emit)
        self._queue.put(job)
        return job

    def close(self, timeout: float = 5.0) -> None:
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- worker side -------------------------------------------------------------------
    def _collect(self, first: Any) -> list[Any]:
        jobs, deadline = [first], time.monotonic() + self.wait_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is None:
                self._queue.put(None)  # seen again by the main loop, after this round
                return jobs
            jobs.append(job)

    def _run(self) -> None:
        while not self._closed.is_set():
            first = self._queue.get()
            if first is None:
                break
            jobs = self._collect(first)
            groups: dict[tuple, list[BatchJob]] = {}
            streams: list[StreamJob] = []
            for job in jobs:
                if isinstance(job, StreamJob):
                    streams.append(job)
                elif job.future.set_running_or_notify_cancel():  # skip requests already abandoned
                    groups.setdefault(job.key(), []).append(job)
            for group in groups.values():
                for part in self._split(group):
                    self._run_batch(part)
            for job in streams:
                self._run_stream(job)

    def _split(self, group: list[BatchJob]) -> list[list[BatchJob]]:
        parts: list[list[BatchJob]] = [[]]
        rows = 0
        for job in group:
            if parts[-1] and rows + len(job.prompts) > self.max_rows:
                parts.append([])
                rows = 0
            parts[-1].append(job)
            rows += len(job.prompts)
        return parts

    def _run_batch(self, jobs: list[BatchJob]) -> None:
        prompts = [p for job in jobs for p in job.prompts]
        started = time.perf_counter()
        try:
            gens = self.engine.generate_ids(prompts, jobs[0].params, chat=jobs[0].chat)
        except Exception as exc:  # surfaced to each waiting request
            log.exception("generation failed")
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.stats["busy_s"] += time.perf_counter() - started
        self.stats["calls"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["rows"] += len(prompts)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(prompts))
        at = 0
        for job in jobs:
            job.future.set_result(gens[at : at + len(job.prompts)])
            at += len(job.prompts)

    def _run_stream(self, job: StreamJob) -> None:
        if job.cancelled.is_set():
            return
        self.stats["streams"] += 1
        chunks = self.engine.stream_ids(job.prompt, job.params, chat=job.chat)
        try:
            for chunk in chunks:
                if job.cancelled.is_set():
                    return
                job.emit(chunk)
            job.emit(END)
        except Exception as exc:
            log.exception("stream failed")
            with contextlib.suppress(Exception):  # the client's event loop may be gone
                job.emit(exc)
        finally:
            chunks.close()  # releases the engine lock at once, also when abandoned
