"""lmforge's own routes: /info, /tokenize, /detokenize, /generate and /generate_stream."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from lmforge.generation.outputs import StreamChunk
from lmforge.generation.sampling_params import SamplingParams
from lmforge.serving import aio
from services.app import EVENT_STREAM, backend, event_stream, sse
from services.backend import Backend
from services.errors import ApiError
from services.openapi import BAD_REQUEST, GENERATION, INVALID, TIMEOUT, errors
from services.schemas import DetokenizeRequest, GenerateRequest, TokenizeRequest
from services.shaping import Logprobs, chunk_entries, generation_entries, usage

router = APIRouter()
Served = Depends(backend)


@router.get("/info", responses=errors())
def info(b: Backend = Served) -> dict:
    return b.info()


@router.post("/tokenize", responses=errors(BAD_REQUEST, INVALID, TIMEOUT))
def tokenize(req: TokenizeRequest, b: Backend = Served) -> dict:
    tok = b.chat.tok
    if req.messages is not None:
        ids = tok.render_chat([m.as_dict() for m in req.messages], req.add_generation_prompt).ids
    else:
        ids = b.chat.prompt_ids(req.text or "") if req.add_bos else tok.encode(req.text or "")
    return {
        "ids": ids,
        "tokens": tok.token_strings(ids),
        "count": len(ids),
        "context_length": b.chat.context_length,
    }


@router.post("/detokenize", responses=errors(BAD_REQUEST, INVALID, TIMEOUT))
def detokenize(req: DetokenizeRequest, b: Backend = Served) -> dict:
    vocab = b.chat.tok.vocab_size
    if bad := [i for i in req.ids if i >= vocab]:
        raise ApiError(422, f"ids: {bad[:5]} outside the vocabulary [0, {vocab})", param="ids")
    return {"text": b.chat.tok.decode(req.ids, skip_special=req.skip_special)}


def _native(req: GenerateRequest, b: Backend) -> tuple[list[int], SamplingParams, bool]:
    chat = req.messages is not None
    ids = b.ids(prompt=req.prompt, messages=req.messages, field="messages" if chat else "prompt")
    want = req.logprobs or req.top_logprobs > 0
    params = b.params(
        req,
        max_new_tokens=req.max_new_tokens,
        stop=req.stop,
        logprobs=req.top_logprobs if want else None,
        logit_bias=req.logit_bias,
    )
    return ids, params, chat


def _logprobs(b: Backend, gen: Any) -> list[dict] | None:
    items = generation_entries(gen)
    return None if items is None else Logprobs(b.chat.tok, items).native()


@router.post("/generate", responses=errors(*GENERATION))
async def generate(req: GenerateRequest, b: Backend = Served) -> dict:
    ids, params, chat = _native(req, b)
    done = await aio.generate(b.engine, ids, params, chat=chat, n=req.n)
    gens = [f.generation for f in done]
    choices = [
        {
            "index": i,
            "text": g.text,
            "token_ids": g.token_ids,
            "finish_reason": g.finish_reason,
            "stop_string": g.stop_string,
            "logprobs": _logprobs(b, g),
        }
        for i, g in enumerate(gens)
    ]
    return {
        "id": f"gen-{uuid.uuid4().hex}",
        "model": b.model_name,
        "version": b.version,
        "choices": choices,
        "usage": usage(len(ids), sum(len(g.token_ids) for g in gens)),
    }


@router.post(
    "/generate_stream",
    response_class=StreamingResponse,
    responses={
        200: {"description": "server-sent events", "content": EVENT_STREAM[200]["content"]},
        **errors(*GENERATION),
    },
)
async def generate_stream(req: GenerateRequest, b: Backend = Served) -> StreamingResponse:
    """Server-sent events: one ``{"index", "text", "token_id", "logprobs"?}`` per token, a last event
    with ``finish_reason`` and ``usage``, then ``data: [DONE]``."""
    if req.n != 1:
        raise ApiError(400, "n: streaming returns one choice; use n=1 or /generate", param="n")
    ids, params, chat = _native(req, b)
    stream = aio.open_stream(b.engine, ids, params, chat=chat)

    def render(c: StreamChunk, count: int) -> str:
        event: dict[str, Any] = {"index": 0, "text": c.text or "", "token_id": c.token_id}
        if items := chunk_entries(c):
            event["logprobs"] = Logprobs(b.chat.tok, items).native()[0]
        if c.finish_reason:
            event.update(
                finish_reason=c.finish_reason,
                usage=usage(len(ids), count),
                model=b.model_name,
                version=b.version,
            )
        return sse(event)

    return StreamingResponse(
        event_stream(stream, render), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
