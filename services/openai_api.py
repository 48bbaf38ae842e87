"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from lmforge.generation.grammar import Constraint
from lmforge.generation.interface import Finished
from lmforge.generation.outputs import StreamChunk
from lmforge.generation.sampling_params import SamplingParams
from lmforge.serving import aio
from services import structured
from services.app import EVENT_STREAM, ChunkEvents, backend, event_stream, sse
from services.backend import Backend
from services.errors import ApiError
from services.openapi import GENERATION, INVALID, MODEL_NOT_FOUND, errors
from services.schemas import ChatCompletionRequest, CompletionRequest
from services.shaping import Entry, Logprobs, chunk_entries, generation_entries, usage

router = APIRouter()
Served = Depends(backend)


@router.get("/v1/models", responses=errors())
def list_models(b: Backend = Served) -> dict:
    return {"object": "list", "data": [b.meta()]}


@router.get("/v1/models/{model_id:path}", responses=errors(MODEL_NOT_FOUND, INVALID))
def get_model(model_id: str, b: Backend = Served) -> dict:
    b.check_model(model_id)
    return b.meta()


def _head(b: Backend, prefix: str, obj: str) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": b.model_name,
        "system_fingerprint": b.fingerprint(),
    }


def _stream(
    b: Backend,
    head: dict,
    ids: list[int],
    params: SamplingParams,
    req: CompletionRequest | ChatCompletionRequest,
    *,
    chat: bool,
    choice_of: Callable[[StreamChunk], dict | None],
    opening: dict | None = None,
    constraint: Constraint | None = None,
) -> StreamingResponse:
    """OpenAI server-sent events: one chunk per ``choice_of(step)`` (None: nothing to send yet),
    ``usage`` on the last, an optional usage-only chunk, then ``[DONE]``; errors become an event."""
    # A full queue is a 503 here, not mid-stream.
    stream = aio.open_stream(b.engine, ids, params, chat=chat, constraint=constraint)

    chunk_event = ChunkEvents(head)

    def render(c: StreamChunk, count: int) -> str | None:
        choice = choice_of(c)
        if choice is None:
            return None
        return chunk_event(choice, usage(len(ids), count) if c.finish_reason else None)

    def last(count: int) -> str | None:
        if req.stream_options and req.stream_options.include_usage:
            return chunk_event(None, usage(len(ids), count))
        return None

    events = event_stream(stream, render, first=None if opening is None else sse(opening), last=last)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------- completions


@router.post("/v1/completions", responses={**EVENT_STREAM, **errors(*GENERATION)})
async def completions(req: CompletionRequest, b: Backend = Served) -> Any:
    b.check_model(req.model)
    want = structured.plan(b, req, chat=False)
    prompts = req.prompts()
    score_only = req.max_tokens == 0
    fields = ["prompt"] if len(prompts) == 1 else [f"prompt.{i}" for i in range(len(prompts))]
    all_ids = [b.ids(prompt=p, field=f, score_only=score_only) for p, f in zip(prompts, fields, strict=True)]
    params = b.params(
        req,
        max_new_tokens=max(req.max_tokens, 1) if req.max_tokens is not None else None,
        stop=req.stop,
        logprobs=req.logprobs,
        logit_bias=req.logit_bias,
    )
    head = _head(b, "cmpl", "text_completion")
    if req.stream:
        if len(all_ids) != 1 or req.n != 1:
            raise ApiError(400, "n: streaming supports one prompt and n=1", param="n")
        if req.echo or score_only:
            raise ApiError(400, "echo: not supported with stream (score prompts without it)", param="echo")
        return _stream(
            b,
            head,
            all_ids[0],
            params,
            req,
            chat=False,
            choice_of=_completion_choice(b),
            constraint=want.constraint,
        )
    scoring = req.echo and req.logprobs is not None
    try:
        async with asyncio.TaskGroup() as group:  # one failure (a full queue) cancels the rest
            tasks = [
                group.create_task(
                    aio.generate(
                        b.engine,
                        ids,
                        params,
                        chat=False,
                        n=req.n,
                        prompt_logprobs=req.logprobs if scoring else None,
                        score_only=score_only,
                        constraint=want.constraint,
                    )
                )
                for ids in all_ids
            ]
    except ExceptionGroup as group:  # the first engine error (a full queue...) answers
        raise group.exceptions[0] from None
    choices = []
    for p, ids, task in zip(prompts, all_ids, tasks, strict=True):
        for f in task.result():
            choices.append(_completion(b, req, p, ids, f, index=len(choices)))
    completion_tokens = sum(len(f.generation.token_ids) for t in tasks for f in t.result())
    return {**head, "choices": choices, "usage": usage(sum(map(len, all_ids)), completion_tokens)}


def _completion(
    b: Backend, req: CompletionRequest, prompt: str | list[int], ids: list[int], f: Finished, index: int
) -> dict:
    gen = f.generation
    text = gen.text or ""
    items: list[Entry] = []
    if req.echo:
        own_bos = isinstance(prompt, str)  # text prompts got <|bos|>; it is not echoed
        text = (prompt if isinstance(prompt, str) else b.chat.tok.decode(ids)) + text
        if f.prompt_logprobs is not None:
            scored = [s if s is not None else (ids[0], None, None) for s in f.prompt_logprobs]
            items += scored[1:] if own_bos else scored
    logprobs = None
    if req.logprobs is not None:
        items += generation_entries(gen) or []
        logprobs = Logprobs(b.chat.tok, items).legacy()
    finish = gen.finish_reason if req.max_tokens != 0 else "length"
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _completion_choice(b: Backend) -> Callable[[StreamChunk], dict]:
    def choice_of(c: StreamChunk) -> dict:
        items = chunk_entries(c)
        return {
            "index": 0,
            "text": c.text or "",
            "logprobs": Logprobs(b.chat.tok, items).legacy() if items else None,
            "finish_reason": c.finish_reason,
        }

    return choice_of


# --------------------------------------------------------------------------- chat


@router.post("/v1/chat/completions", responses={**EVENT_STREAM, **errors(*GENERATION)})
async def chat_completions(req: ChatCompletionRequest, b: Backend = Served) -> Any:
    b.check_model(req.model)
    want = structured.plan(b, req, chat=True)
    ids = b.ids(messages=req.messages, field="messages", tools=want.tools)
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = b.params(
        req,
        max_new_tokens=req.max_completion_tokens or req.max_tokens,
        stop=req.stop,
        logprobs=k,
        logit_bias=req.logit_bias,
    )
    head = _head(b, "chatcmpl", "chat.completion")
    if req.stream:
        if req.n != 1:
            raise ApiError(400, "n: streaming supports n=1", param="n")
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
        return _stream(
            b,
            head,
            ids,
            params,
            req,
            chat=True,
            choice_of=_chat_choice(b, structured.ToolStream() if want.calls else None),
            opening=opening,
            constraint=want.constraint,
        )
    done = await aio.generate(b.engine, ids, params, chat=True, n=req.n, constraint=want.constraint)
    gens = [f.generation for f in done]
    choices = []
    for i, g in enumerate(gens):
        items = generation_entries(g)
        message, finish = {"role": "assistant", "content": g.text}, g.finish_reason
        if want.calls:
            message, finish = structured.tool_message(g.text, g.finish_reason)
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": Logprobs(b.chat.tok, items).chat() if items is not None else None,
                "finish_reason": finish,
            }
        )
    return {**head, "choices": choices, "usage": usage(len(ids), sum(len(g.token_ids) for g in gens))}


def _chat_choice(
    b: Backend, tools: structured.ToolStream | None = None
) -> Callable[[StreamChunk], dict | None]:
    def choice_of(c: StreamChunk) -> dict | None:
        items = chunk_entries(c)
        delta, finish = ({"content": c.text} if c.text else {}), c.finish_reason
        if tools is not None:
            delta, finish = tools.delta(c.text, c.finish_reason)
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": Logprobs(b.chat.tok, items).chat() if items else None,
            "finish_reason": finish,
        }
        if not choice["delta"] and not c.finish_reason and choice["logprobs"] is None:
            return None  # text held back (possible stop string): nothing to send yet
        return choice

    return choice_of
