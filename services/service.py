"""BentoML service: the registered lmforge chat model behind a sampling API.

At startup it resolves ``models:/<LMFORGE_MODEL_NAME>@<LMFORGE_MODEL_ALIAS>`` (default
``lmforge-chat@champion``) in the MLflow registry at ``MLFLOW_TRACKING_URI`` (default: the
project's store, :func:`lmforge.tracking.tracking_uri`), loads that version with
``mlflow.pyfunc.load_model`` and serves its :class:`~lmforge.engine.ChatEngine` directly, so every
route runs lmforge's KV-cached sampler. Routes live in one FastAPI app mounted at ``/``; BentoML keeps
its own ``/livez``, ``/healthz``, ``/readyz`` and ``/metrics`` (``/readyz`` is 200 only once the model
is loaded and the engine worker is running). See services/README.md.

Environment: LMFORGE_MODEL_NAME, LMFORGE_MODEL_ALIAS, MLFLOW_TRACKING_URI, LMFORGE_DEVICE (cpu, cuda,
cuda:1; default cuda when available), LMFORGE_API_KEY (bearer key required on all routes but the
health probes), LMFORGE_MAX_BATCH (rows per decode call, 32), LMFORGE_BATCH_WAIT_MS (2),
LMFORGE_TORCH_THREADS (torch intra-op threads; default: torch's, one per core).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

try:
    import lmforge  # noqa: F401
except ImportError:  # inside a built Bento the package ships as src/lmforge
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bentoml
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from lmforge.registry import CHAMPION, MODEL_NAME
from services.batcher import END, EngineWorker
from services.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    Sampling,
    TokenizeRequest,
)

log = logging.getLogger("bentoml.lmforge")  # under BentoML's configured logger

DEFAULT_MODEL_NAME = MODEL_NAME
DEFAULT_ALIAS = CHAMPION
OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(
    message: str, *, param: str | None, code: str | None, kind: str = "invalid_request_error"
) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """'temperature: Input should be greater than or equal to 0 (got -1)'; the first field as param."""
    lines, first = [], None
    for err in errors:
        where = _loc(tuple(err.get("loc", ())))
        first = first or where or None
        got = err.get("input")
        shown = (
            f" (got {got!r})" if where and err.get("type") != "missing" and not isinstance(got, dict) else ""
        )
        msg = err.get("msg", "invalid value")
        lines.append(f"{where}: {msg}{shown}" if where else msg)
    return "; ".join(lines), first


# --------------------------------------------------------------------------- auth


class ApiKeyMiddleware:
    """Bearer key check when LMFORGE_API_KEY is set (read per request); health probes stay open."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        key = os.environ.get("LMFORGE_API_KEY")
        if scope["type"] != "http" or not key or scope.get("path", "") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
            return await self.app(scope, receive, send)
        response = JSONResponse(
            error_body(
                "missing or invalid API key (send `Authorization: Bearer <key>`)",
                param=None,
                code="invalid_api_key",
                kind="authentication_error",
            ),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


# --------------------------------------------------------------------------- the FastAPI app

app = FastAPI(title="lmforge", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)


@app.exception_handler(RequestValidationError)
async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = jsonable_encoder(exc.errors())
    message, param = validation_message(errors)
    return JSONResponse({**error_body(message, param=param, code="invalid_value"), "detail": errors}, 422)


@app.exception_handler(ApiError)
async def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return JSONResponse(error_body(exc.message, param=exc.param, code=exc.code, kind=kind), exc.status)


def sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@bentoml.service(name="lmforge", workers=1, traffic={"timeout": 600})
@bentoml.asgi_app(app, path="/")
class LmforgeService:
    def __init__(self) -> None:
        import mlflow
        import torch
        from mlflow import MlflowClient

        from lmforge.tracking import tracking_uri

        self.model_name = os.environ.get("LMFORGE_MODEL_NAME", DEFAULT_MODEL_NAME)
        self.alias = os.environ.get("LMFORGE_MODEL_ALIAS", DEFAULT_ALIAS)
        self.tracking_uri = tracking_uri()
        mlflow.set_tracking_uri(self.tracking_uri)
        started = time.perf_counter()
        # Resolve the alias once and load that exact version, so the version we report is the one served
        # even if the alias moves while we load.
        mv = MlflowClient().get_model_version_by_alias(self.model_name, self.alias)
        self.version = str(mv.version)
        self.model_uri = f"models:/{self.model_name}/{self.version}"
        loaded = mlflow.pyfunc.load_model(self.model_uri)
        self.engine = loaded.unwrap_python_model().engine
        if threads := os.environ.get("LMFORGE_TORCH_THREADS"):
            torch.set_num_threads(int(threads))  # intra-op threads; 1 is best for small models on shared CPUs
        if device := os.environ.get("LMFORGE_DEVICE"):
            self.engine.device = torch.device(device)
            self.engine.model.to(self.engine.device)
        self.run_id, self.created = mv.run_id, int((mv.creation_timestamp or 0) / 1000)
        self.load_seconds = round(time.perf_counter() - started, 2)
        self.worker = EngineWorker(
            self.engine,
            max_rows=int(os.environ.get("LMFORGE_MAX_BATCH", "32")),
            wait_s=float(os.environ.get("LMFORGE_BATCH_WAIT_MS", "2")) / 1000,
        )
        log.info(
            "serving %s@%s = version %s on %s (loaded in %.1fs)",
            self.model_name,
            self.alias,
            self.version,
            self.engine.device,
            self.load_seconds,
        )

    # ---- BentoML hooks -----------------------------------------------------------------
    def __is_ready__(self) -> bool:
        return getattr(self, "engine", None) is not None and self.worker.alive

    @bentoml.on_shutdown
    def _stop_worker(self) -> None:
        self.worker.close()

    # ---- helpers -----------------------------------------------------------------------
    def _ids(self, *, prompt: str | None = None, messages: list | None = None, field: str) -> list[int]:
        ids = (
            self.engine.chat_ids([m.as_dict() for m in messages])
            if messages
            else self.engine.prompt_ids(prompt)
        )
        try:
            self.engine.check_fits(ids)
        except ValueError as exc:  # PromptTooLongError
            raise ApiError(400, f"{field}: {exc}", param=field, code="context_length_exceeded") from exc
        return ids

    def _params(
        self, s: Sampling, *, max_new_tokens: int | None, stop: list[str] | None, logprobs: int | None
    ) -> Any:
        from lmforge.sampling import SamplingParams

        try:
            return SamplingParams(
                max_new_tokens=max_new_tokens or self.engine.context_length,
                temperature=s.temperature,
                top_k=s.top_k or None,
                top_p=s.top_p,
                min_p=s.min_p,
                repetition_penalty=s.repetition_penalty,
                stop_strings=tuple(stop or ()),
                seed=s.seed,
                logprobs=logprobs,
            )
        except ValueError as exc:  # the schemas should have caught it; still a client error
            raise ApiError(422, str(exc), code="invalid_value") from exc

    def _check_model(self, requested: str | None) -> None:
        known = {self.model_name, f"{self.model_name}@{self.alias}", f"{self.model_name}/{self.version}"}
        if requested and requested not in known:
            raise ApiError(
                404,
                f"model: {requested!r} is not served here; this server serves "
                f"{self.model_name!r} (version {self.version}, alias {self.alias!r})",
                param="model",
                code="model_not_found",
            )

    async def _generate(self, prompts: list[list[int]], params: Any, chat: bool) -> list:
        return await asyncio.wrap_future(self.worker.submit(prompts, params, chat))

    async def _stream(self, prompt: list[int], params: Any, chat: bool) -> AsyncIterator[Any]:
        """StreamChunks of one generation, from the engine worker thread."""
        loop, chunks = asyncio.get_running_loop(), asyncio.Queue()
        job = self.worker.stream(
            prompt, params, chat, lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item)
        )
        try:
            while (item := await chunks.get()) is not END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancel()  # client gone or done: the worker stops at the next token

    def _token_lp(self, token_id: int, lp: float, top: list[tuple[int, float]] | None) -> dict:
        strings = self.engine.tok.token_strings([token_id, *(t for t, _ in top or [])])
        return {
            "token": strings[0],
            "token_id": token_id,
            "logprob": lp,
            "top_logprobs": [
                {"token": s, "token_id": t, "logprob": v}
                for s, (t, v) in zip(strings[1:], top or [], strict=True)
            ],
        }

    def _native_logprobs(self, gen: Any) -> list[dict] | None:
        if gen.logprobs is None:
            return None
        return [
            self._token_lp(t, lp, top)
            for t, lp, top in zip(gen.token_ids, gen.logprobs, gen.top_logprobs, strict=False)
        ]

    def _stream_error(self, exc: Exception) -> str:
        return sse(error_body(str(exc), param=None, code="generation_failed", kind="server_error"))

    def _meta(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "lmforge",
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
        }

    # ---- service info ------------------------------------------------------------------
    @app.get("/info")
    def info(self) -> dict:
        import torch

        cfg = self.engine.model.config
        return {
            "ready": self.__is_ready__(),
            "model": self.model_name,
            "alias": self.alias,
            "version": self.version,
            "model_uri": self.model_uri,
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "device": str(self.engine.device),
            "torch_threads": torch.get_num_threads(),
            "context_length": self.engine.context_length,
            "vocab_size": cfg.vocab_size,
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "load_seconds": self.load_seconds,
            "batching": {"max_rows": self.worker.max_rows, **self.worker.stats},
        }

    @app.get("/v1/models")
    def list_models(self) -> dict:
        return {"object": "list", "data": [self._meta()]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._meta()

    # ---- tokenizer ---------------------------------------------------------------------
    @app.post("/tokenize")
    def tokenize(self, req: TokenizeRequest) -> dict:
        tok = self.engine.tok
        if req.messages is not None:
            ids = tok.render_chat([m.as_dict() for m in req.messages], req.add_generation_prompt).ids
        else:
            ids = self.engine.prompt_ids(req.text) if req.add_bos else tok.encode(req.text)
        return {
            "ids": ids,
            "tokens": tok.token_strings(ids),
            "count": len(ids),
            "context_length": self.engine.context_length,
        }

    @app.post("/detokenize")
    def detokenize(self, req: DetokenizeRequest) -> dict:
        vocab = self.engine.tok.vocab_size
        if bad := [i for i in req.ids if i >= vocab]:
            raise ApiError(422, f"ids: {bad[:5]} outside the vocabulary [0, {vocab})", param="ids")
        return {"text": self.engine.tok.decode(req.ids, skip_special=req.skip_special)}

    # ---- native generation -------------------------------------------------------------
    def _native(self, req: GenerateRequest) -> tuple[list[int], Any, bool]:
        chat = req.messages is not None
        ids = self._ids(prompt=req.prompt, messages=req.messages, field="messages" if chat else "prompt")
        want = req.logprobs or req.top_logprobs > 0
        params = self._params(
            req, max_new_tokens=req.max_new_tokens, stop=req.stop, logprobs=req.top_logprobs if want else None
        )
        return ids, params, chat

    @app.post("/generate")
    async def generate(self, req: GenerateRequest) -> dict:
        ids, params, chat = self._native(req)
        gens = await self._generate([ids] * req.n, params, chat)
        choices = [
            {
                "index": i,
                "text": g.text,
                "token_ids": g.token_ids,
                "finish_reason": g.finish_reason,
                "stop_string": g.stop_string,
                "logprobs": self._native_logprobs(g),
            }
            for i, g in enumerate(gens)
        ]
        return {
            "id": f"gen-{uuid.uuid4().hex}",
            "model": self.model_name,
            "version": self.version,
            "choices": choices,
            "usage": usage(len(ids), sum(len(g.token_ids) for g in gens)),
        }

    @app.post("/generate_stream")
    async def generate_stream(self, req: GenerateRequest) -> StreamingResponse:
        """Server-sent events: one ``{"index", "text", "token_id", "logprob"?}`` per token, a last event with
        ``finish_reason`` and ``usage``, then ``data: [DONE]``."""
        if req.n != 1:
            raise ApiError(400, "n: streaming returns one choice; use n=1 or /generate", param="n")
        ids, params, chat = self._native(req)

        async def events() -> AsyncIterator[str]:
            count = 0
            try:
                async for c in self._stream(ids, params, chat):
                    event: dict[str, Any] = {"index": 0, "text": c.text or "", "token_id": c.token_id}
                    if c.token_id is not None:
                        count += 1
                        if c.logprob is not None:
                            event["logprobs"] = self._token_lp(c.token_id, c.logprob, c.top_logprobs)
                    if c.finish_reason:
                        event.update(
                            finish_reason=c.finish_reason,
                            usage=usage(len(ids), count),
                            model=self.model_name,
                            version=self.version,
                        )
                    yield sse(event)
            except Exception as exc:
                yield self._stream_error(exc)
            yield sse("[DONE]")

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    # ---- OpenAI-compatible -------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Any:
        self._check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        field = "prompt" if isinstance(req.prompt, str) else None
        all_ids = [self._ids(prompt=p, field=field or f"prompt.{i}") for i, p in enumerate(prompts)]
        params = self._params(req, max_new_tokens=req.max_tokens, stop=req.stop, logprobs=req.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": self.model_name,
            "system_fingerprint": f"{self.model_name}-v{self.version}",
        }
        if req.stream:
            if len(all_ids) != 1 or req.n != 1:
                raise ApiError(400, "n: streaming supports one prompt and n=1", param="n")
            return self._completion_stream(head, all_ids[0], params, req)
        gens = await self._generate([ids for ids in all_ids for _ in range(req.n)], params, chat=False)
        choices = [
            {
                "index": i,
                "text": g.text,
                "logprobs": self._legacy_logprobs(g),
                "finish_reason": g.finish_reason,
            }
            for i, g in enumerate(gens)
        ]
        n_prompt = sum(len(ids) for ids in all_ids)
        return {**head, "choices": choices, "usage": usage(n_prompt, sum(len(g.token_ids) for g in gens))}

    def _legacy_logprobs(self, gen: Any) -> dict | None:
        if gen.logprobs is None:
            return None
        tok = self.engine.tok
        tokens = tok.token_strings(gen.token_ids)
        offsets, at = [], 0
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": gen.logprobs,
            "top_logprobs": [self._top_dict(top) for top in gen.top_logprobs],
            "text_offset": offsets,
        }

    def _top_dict(self, top: list) -> dict[str, float]:
        """OpenAI's legacy top_logprobs entry: {token string: logprob}."""
        strings = self.engine.tok.token_strings([t for t, _ in top])
        return {s: v for s, (_, v) in zip(strings, top, strict=True)}

    def _completion_stream(
        self, head: dict, ids: list[int], params: Any, req: CompletionRequest
    ) -> StreamingResponse:
        def choice_of(c: Any) -> dict:
            choice = {"index": 0, "text": c.text or "", "logprobs": None, "finish_reason": c.finish_reason}
            if c.token_id is not None and c.logprob is not None:
                choice["logprobs"] = {
                    "tokens": self.engine.tok.token_strings([c.token_id]),
                    "token_logprobs": [c.logprob],
                    "top_logprobs": [self._top_dict(c.top_logprobs or [])],
                }
            return choice

        return self._openai_stream(head, ids, params, req, chat=False, choice_of=choice_of)

    def _openai_stream(
        self,
        head: dict,
        ids: list[int],
        params: Any,
        req: CompletionRequest | ChatCompletionRequest,
        *,
        chat: bool,
        choice_of: Any,
        opening: dict | None = None,
    ) -> StreamingResponse:
        """OpenAI server-sent events: one chunk per `choice_of(step)` (None: nothing to send yet),
        `usage` on the last, an optional usage-only chunk, then `[DONE]`; errors become an event."""

        async def events() -> AsyncIterator[str]:
            count = 0
            if opening is not None:
                yield sse(opening)
            try:
                async for c in self._stream(ids, params, chat=chat):
                    count += c.token_id is not None
                    choice = choice_of(c)
                    if choice is None:
                        continue
                    chunk = {**head, "choices": [choice]}
                    if c.finish_reason:
                        chunk["usage"] = usage(len(ids), count)
                    yield sse(chunk)
                if req.stream_options and req.stream_options.include_usage:
                    yield sse({**head, "choices": [], "usage": usage(len(ids), count)})
            except Exception as exc:
                yield self._stream_error(exc)
            yield sse("[DONE]")

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def _chat_logprobs(self, token_ids: list[int], lps: list[float], tops: list) -> dict:
        content = []
        for t, lp, top in zip(token_ids, lps, tops, strict=False):
            d = self._token_lp(t, lp, top)
            content.append(
                {
                    "token": d["token"],
                    "logprob": lp,
                    "bytes": list(d["token"].encode()),
                    "top_logprobs": [
                        {"token": a["token"], "logprob": a["logprob"], "bytes": list(a["token"].encode())}
                        for a in d["top_logprobs"]
                    ],
                }
            )
        return {"content": content}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest) -> Any:
        self._check_model(req.model)
        ids = self._ids(messages=req.messages, field="messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(
            req, max_new_tokens=req.max_completion_tokens or req.max_tokens, stop=req.stop, logprobs=k
        )
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {
            "id": rid,
            "created": created,
            "model": self.model_name,
            "system_fingerprint": f"{self.model_name}-v{self.version}",
        }
        if req.stream:
            if req.n != 1:
                raise ApiError(400, "n: streaming supports n=1", param="n")
            return self._chat_stream(head, ids, params, req)
        gens = await self._generate([ids] * req.n, params, chat=True)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": self._chat_logprobs(g.token_ids, g.logprobs, g.top_logprobs)
                if g.logprobs is not None
                else None,
                "finish_reason": g.finish_reason,
            }
            for i, g in enumerate(gens)
        ]
        return {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": usage(len(ids), sum(len(g.token_ids) for g in gens)),
        }

    def _chat_stream(
        self, head: dict, ids: list[int], params: Any, req: ChatCompletionRequest
    ) -> StreamingResponse:
        head = {**head, "object": "chat.completion.chunk"}
        opening = {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }

        def choice_of(c: Any) -> dict | None:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": c.text} if c.text else {},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            if c.token_id is not None and c.logprob is not None:
                choice["logprobs"] = self._chat_logprobs([c.token_id], [c.logprob], [c.top_logprobs or []])
            if not choice["delta"] and not c.finish_reason and choice["logprobs"] is None:
                return None  # text held back (possible stop string): nothing to send yet
            return choice

        return self._openai_stream(head, ids, params, req, chat=True, choice_of=choice_of, opening=opening)


LmforgeService.add_asgi_middleware(ApiKeyMiddleware)
