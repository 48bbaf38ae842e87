"""BentoML service: the registered lmforge chat model behind a continuous-batching sampling API.

At startup it resolves ``models:/<LMFORGE_MODEL_NAME>@<LMFORGE_MODEL_ALIAS>`` (default
``lmforge-chat@champion``) in the MLflow registry at ``MLFLOW_TRACKING_URI`` (default: the
project's store, :func:`lmforge.tracking.tracking_uri`), loads that version with
``mlflow.pyfunc.load_model`` and puts its :class:`~lmforge.generation.chat.ChatEngine` behind a
:class:`~lmforge.serving.ServingEngine` (continuous batching). The routes live in one FastAPI app
(``services/app.py``; ``services/native.py`` and ``services/openai_api.py``) mounted at ``/``;
BentoML keeps its own ``/livez``, ``/healthz``, ``/readyz`` and ``/metrics`` (``/readyz`` is 200 only
once the model is loaded and the engine runs; ``/metrics`` carries ``lmforge_*`` metrics too).

Environment: LMFORGE_MODEL_NAME, LMFORGE_MODEL_ALIAS, MLFLOW_TRACKING_URI, LMFORGE_DEVICE (cpu, cuda,
cuda:1; default cuda when available), LMFORGE_API_KEY (bearer key required on all routes but the
health probes), LMFORGE_MAX_BATCH (KV slots = rows decoded together, 32), LMFORGE_MAX_QUEUE (rows
waiting for a slot before 503, 256), LMFORGE_PREFILL_CHUNK (prompt tokens prefilled per step, 512),
LMFORGE_PREFIX_CACHE_MB (memory for reused prompt-prefix KV blocks, 64; 0: off) and
LMFORGE_PREFIX_CACHE_BLOCK (tokens per block, 16),
LMFORGE_HTTP_WORKERS (HTTP worker processes, 1; more than one share one engine process, the first
worker to start it owns it: ``lmforge.serving.sharing``),
LMFORGE_REQUEST_TIMEOUT_S (600), LMFORGE_SHUTDOWN_GRACE_S (10), LMFORGE_TORCH_THREADS (torch
intra-op threads of the engine; default: torch's, one per core), LMFORGE_ENGINE_PROCESS (1: the
engine runs in its own process, as vLLM's engine core; 0: on a thread of the server process), and
for the engine process's supervisor LMFORGE_ENGINE_RESTART_BACKOFF_S (0.5, doubling per quick
failure up to 30), LMFORGE_ENGINE_MAX_RESTARTS (5 quick failures in a row, then /livez fails; 0:
never restart), LMFORGE_ENGINE_STALL_S (120: an engine with requests in hand and no step for this
long is killed and restarted; 0: never), LMFORGE_FOLLOW_ALIAS_S (poll the registry every this many
seconds and serve the version the alias names when it moves, ``services/follow.py``; 0, the default:
serve the version found at startup). See services/README.md.

Health: ``/readyz`` is 503 while the model loads and while no engine can take requests (it died and
is restarting); ``/livez`` is 503 once the engine could not be restarted, so the orchestrator
replaces the replica. SIGTERM always ends the worker within LMFORGE_SHUTDOWN_GRACE_S plus 5 s
(``services/shutdown.py``).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path

try:
    import lmforge  # noqa: F401
except ImportError:  # inside a built Bento the package ships as src/lmforge
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bentoml

from lmforge.generation.chat import ChatEngine, ChatFront
from lmforge.model import GPTConfig
from lmforge.registry import CHAMPION, MODEL_NAME
from services import introspect_api, native, openai_api
from services.app import ApiKeyMiddleware, app, attach
from services.backend import Backend, model_folder
from services.follow import AliasFollower
from services.openapi import OpenAPIService
from services.shutdown import stop_on_signals

log = logging.getLogger("bentoml.lmforge")  # under BentoML's configured logger

app.include_router(native.router)
app.include_router(openai_api.router)
app.include_router(introspect_api.router)


# Fewer young-generation collections: every request and streamed token allocates short-lived objects.
GC_THRESHOLDS = (20_000, 20, 100)
# OpenTelemetry's ASGI middleware records a span per ASGI message, that is per streamed token. BentoML
# records spans even when none are exported (trace ids in logs), so the generation routes are left out
# unless LMFORGE_TRACE_GENERATION=1.
TRACED = os.environ.get("LMFORGE_TRACE_GENERATION", "") == "1"
UNTRACED_ROUTES = [] if TRACED else ["/generate", "/v1/completions", "/v1/chat/completions"]


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


# HTTP worker processes: each runs its own event loop (routes, SSE); with the engine in its own
# process (the default) they all share one engine, so rows of every worker batch together.
WORKERS = int(_env("LMFORGE_HTTP_WORKERS", "1"))


def _engine_placement(engine: object) -> str:
    if getattr(engine, "share", None) is not None:
        owner = engine.owns_shared_engine
        role = "started by this worker" if owner else f"started by another worker, pid {engine.pid}"
        return f"in its own process, shared by {WORKERS} HTTP workers ({role})"
    return "in its own process" if _env("LMFORGE_ENGINE_PROCESS", "1") == "1" else "in-process"


def _model_card(client: object, mv: object) -> dict:
    """What the registry says of the served version: its tags (gates, lineage: the stages' runs and the
    data's DVC hashes, environment) and the metrics of the run that registered it."""
    card: dict = {"tags": dict(mv.tags or {}), "metrics": {}, "run_id": mv.run_id, "experiment_id": None}
    try:
        run = client.get_run(mv.run_id)
        card["metrics"] = dict(run.data.metrics)
        card["experiment_id"] = run.info.experiment_id
    except Exception as exc:  # a card without metrics still serves
        log.warning("no metrics for run %s: %s", mv.run_id, exc)
    ui = os.environ.get("LMFORGE_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")
    if card["experiment_id"] is not None:
        card["mlflow_url"] = f"{ui}/#/experiments/{card['experiment_id']}/runs/{mv.run_id}"
    return card


def _load_engine(model_uri: str, observer: object) -> tuple[ChatFront, GPTConfig, object, Path]:
    """The registered version's chat front (tokenizer, context), model config and serving engine.

    By default the engine runs in its own process (LMFORGE_ENGINE_PROCESS=1), which loads the
    weights itself; this process never holds them. LMFORGE_ENGINE_PROCESS=0 runs the engine on a
    thread here.
    """
    import torch

    from lmforge.generation.chat import default_device
    from lmforge.generation.engine import ServingEngine
    from lmforge.model_folder import read_config
    from lmforge.serving.process import EngineProcess
    from lmforge.serving.sharing import EngineShare
    from lmforge.tokenizer import ChatTokenizer

    folder = model_folder(model_uri)
    threads = int(_env("LMFORGE_TORCH_THREADS", "0")) or None
    knobs = {
        "max_batch": int(_env("LMFORGE_MAX_BATCH", "32")),
        "max_queue": int(_env("LMFORGE_MAX_QUEUE", "256")),
        "prefill_chunk": int(_env("LMFORGE_PREFILL_CHUNK", "512")),
        "timeout_s": float(_env("LMFORGE_REQUEST_TIMEOUT_S", "600")) or None,
        "observer": observer,
        "prefix_cache_mb": float(_env("LMFORGE_PREFIX_CACHE_MB", "64")),
        "prefix_block": int(_env("LMFORGE_PREFIX_CACHE_BLOCK", "16")),
    }
    device = str(default_device())
    if _env("LMFORGE_ENGINE_PROCESS", "1") != "1":
        if WORKERS > 1:
            log.warning(
                "LMFORGE_ENGINE_PROCESS=0 with %d HTTP workers: each worker loads its own model", WORKERS
            )
        if threads:
            torch.set_num_threads(threads)  # intra-op threads; 1 is best for small models on shared CPUs
        chat = ChatEngine.from_dir(folder, device=device)
        return chat, chat.model.config, ServingEngine(chat, **knobs), folder
    config = GPTConfig.from_dict(read_config(folder)["model"])
    chat = ChatFront(ChatTokenizer.load(folder), config.block_size)
    stall_s = float(_env("LMFORGE_ENGINE_STALL_S", "120"))
    # Several HTTP workers share one engine: the first to start it owns it (lmforge.serving.sharing).
    share = EngineShare.for_server(folder) if WORKERS > 1 else None
    engine = EngineProcess(
        folder,
        block_size=config.block_size,
        vocab_size=config.vocab_size,
        device=device,
        torch_threads=threads,
        restart_backoff_s=float(_env("LMFORGE_ENGINE_RESTART_BACKOFF_S", "0.5")),
        max_restarts=int(_env("LMFORGE_ENGINE_MAX_RESTARTS", "5")),
        stall_s=stall_s or None,
        share=share,
        **knobs,
    )
    return chat, config, engine, folder


@bentoml.service(
    name="lmforge",
    workers=WORKERS,
    traffic={"timeout": 600},
    tracing={"excluded_urls": UNTRACED_ROUTES},
    service_class=OpenAPIService,  # /docs.json: FastAPI's OpenAPI 3.1, each route's errors declared on it
)
@bentoml.asgi_app(app, path="/")
class LmforgeService:
    def __init__(self) -> None:
        import mlflow

        from lmforge.tracking import tracking_uri
        from services.metrics import PrometheusObserver

        self.model_name = _env("LMFORGE_MODEL_NAME", MODEL_NAME)
        self.alias = _env("LMFORGE_MODEL_ALIAS", CHAMPION)
        mlflow.set_tracking_uri(tracking_uri())
        self.observer = PrometheusObserver()
        # Resolve the alias once and load that exact version, so the version we report is the one served
        # even if the alias moves while we load.
        self.backend = self._load_backend(self._alias_version())
        engine = self.backend.engine
        self.grace_s = float(_env("LMFORGE_SHUTDOWN_GRACE_S", "10"))
        attach(self.backend, on_error=self.observer.error)
        stop_on_signals(_ServedEngine(self), self.grace_s)
        self.follower = None
        if (period := float(_env("LMFORGE_FOLLOW_ALIAS_S", "0"))) > 0:
            self.follower = AliasFollower(
                current=lambda: self.backend.version,
                resolve=self._alias_version,
                load=self._load_backend,
                swap=self._swap,
                period_s=period,
                drain_s=float(_env("LMFORGE_REQUEST_TIMEOUT_S", "600")),
                outcome=self.observer.model_reload,
            ).start()
        # The startup heap (mlflow, torch, pandas) is large and long-lived: moving it out of the
        # collector's reach turns 250-290 ms full collections under load into a few ms.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        log.info(
            "serving %s@%s = version %s on %s (loaded in %.1fs; %d KV slots; engine %s)",
            self.model_name,
            self.alias,
            self.backend.version,
            engine.device,
            self.backend.load_seconds,
            engine.max_batch,
            _engine_placement(engine),
        )

    def _alias_version(self) -> str:
        from mlflow import MlflowClient

        return str(MlflowClient().get_model_version_by_alias(self.model_name, self.alias).version)

    def _load_backend(self, version: str) -> Backend:
        """A registered version loaded behind an engine of its own, with its model card."""
        from mlflow import MlflowClient

        from lmforge.tracking import tracking_uri

        started = time.perf_counter()
        client = MlflowClient()
        mv = client.get_model_version(self.model_name, version)
        model_uri = f"models:/{self.model_name}/{mv.version}"
        chat, config, engine, folder = _load_engine(model_uri, self.observer)
        if not engine.alive:
            engine.close(0)
            raise RuntimeError(f"{model_uri}: its engine did not start")
        backend = Backend(
            chat=chat,
            config=config,
            engine=engine,
            model_dir=folder,
            model_name=self.model_name,
            alias=self.alias,
            version=str(mv.version),
            model_uri=model_uri,
            run_id=mv.run_id,
            created=int((mv.creation_timestamp or 0) / 1000),
            tracking_uri=tracking_uri(),
            load_seconds=round(time.perf_counter() - started, 2),
        )
        backend.card = _model_card(client, mv)
        return backend

    def _swap(self, new: Backend) -> Backend:
        """Serve `new` from the next request on; returns the backend it replaces."""
        old, self.backend = self.backend, new
        attach(new, on_error=self.observer.error)
        return old

    # ---- BentoML hooks -----------------------------------------------------------------
    def __is_ready__(self) -> bool:
        return getattr(self, "backend", None) is not None and self.backend.ready

    def __is_alive__(self) -> bool:
        return getattr(self, "backend", None) is None or self.backend.live

    @bentoml.on_shutdown
    def _stop_engine(self) -> None:
        """Graceful: no new requests; running rows finish within the grace period, else end with an error event."""
        if self.follower is not None:
            self.follower.stop()
        self.backend.engine.close(self.grace_s)


class _ServedEngine:
    """The engine of the version served now, for the signal handlers (the alias follower swaps it)."""

    def __init__(self, service: LmforgeService) -> None:
        self._service = service

    def close(self, grace_s: float) -> None:
        self._service.backend.engine.close(grace_s)

    def kill(self) -> None:
        if (kill := getattr(self._service.backend.engine, "kill", None)) is not None:
            kill()


LmforgeService.add_asgi_middleware(ApiKeyMiddleware)
