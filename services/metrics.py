"""lmforge's Prometheus metrics, served by BentoML's ``/metrics`` next to its own.

Created on first use, inside the worker: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` after importing
the service module, and ``prometheus_client`` must see it when it first loads (see BentoML's note in
``bentoml/metrics.py``). Created once per process, so a second service instance (tests) reuses them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

# Latency buckets (seconds): from sub-millisecond inter-token gaps to long queues.
TTFT_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@cache
def _metrics() -> dict[str, Any]:
    import prometheus_client as prom

    return {
        "queue": prom.Gauge(
            "lmforge_queue_depth", "requests (rows) waiting for a KV slot", multiprocess_mode="livesum"
        ),
        "running": prom.Gauge(
            "lmforge_running_rows", "rows in the running batch", multiprocess_mode="livesum"
        ),
        "occupancy": prom.Gauge(
            "lmforge_batch_occupancy", "running rows / KV slots (0..1)", multiprocess_mode="livemax"
        ),
        "ttft": prom.Histogram(
            "lmforge_time_to_first_token_seconds", "submit -> first generated token", buckets=TTFT_BUCKETS
        ),
        "itl": prom.Histogram(
            "lmforge_inter_token_latency_seconds",
            "gap between a row's consecutive tokens",
            buckets=ITL_BUCKETS,
        ),
        "tokens": prom.Counter("lmforge_generated_tokens", "tokens generated"),
        # Prefix cache hit rate = rate(hit_tokens_total) / rate(queried_tokens_total).
        "prefix_queried": prom.Counter(
            "lmforge_prefix_cache_queried_tokens",
            "prompt tokens looked up in the prefix cache (prompts that may reuse it)",
        ),
        "prefix_hit": prom.Counter(
            "lmforge_prefix_cache_hit_tokens",
            "prompt tokens whose keys and values came from the prefix cache instead of a prefill",
        ),
        "errors": prom.Counter("lmforge_errors", "failed or refused requests by kind", ["kind"]),
        "restarts": prom.Counter(
            "lmforge_engine_restarts", "engine process restarts by how the old one ended", ["cause"]
        ),
        "reloads": prom.Counter(
            "lmforge_model_reloads",
            "versions loaded because the served alias moved (swapped), or whose load failed (failed)",
            ["outcome"],
        ),
    }


class PrometheusObserver:
    """:class:`lmforge.serving.Observer` writing to the metrics above."""

    def __init__(self) -> None:
        m = _metrics()
        self._queue, self._running, self._occupancy = m["queue"], m["running"], m["occupancy"]
        self._ttft, self._itl, self._tokens, self._errors = m["ttft"], m["itl"], m["tokens"], m["errors"]
        self._restarts, self._reloads = m["restarts"], m["reloads"]
        self._prefix_queried, self._prefix_hit = m["prefix_queried"], m["prefix_hit"]
        self._last: tuple[int, int] | None = None

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def tokens(self, count: int) -> None:
        self._tokens.inc(count)

    def error(self, kind: str) -> None:
        self._errors.labels(kind=kind).inc()

    def engine_restart(self, cause: str) -> None:
        self._restarts.labels(cause=cause).inc()

    def prefix_cache(self, queried: int, hit: int) -> None:
        self._prefix_queried.inc(queried)
        if hit:
            self._prefix_hit.inc(hit)

    def model_reload(self, outcome: str) -> None:
        self._reloads.labels(outcome=outcome).inc()

    def load(self, waiting: int, running: int, slots: int) -> None:
        if self._last == (waiting, running):
            return  # gauges in multiprocess mode write a file entry: only on change
        self._last = (waiting, running)
        self._queue.set(waiting)
        self._running.set(running)
        self._occupancy.set(running / slots if slots else 0.0)
