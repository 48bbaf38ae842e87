"""Introspection routes (the playground's data, documented JSON):

* ``POST /v1/introspect``: tokens with ids, byte spans and specials; per position the top-k next tokens,
  their probabilities and the entropy; attention weights of chosen layers; the logit lens;
* ``POST /v1/sampling/distribution``: the next-token distribution before and after each sampling
  stage, computed by the sampler's own code, and optionally one token drawn as the engine draws it;
* ``GET /v1/tokens/{token_id}/nearest``: the nearest tokens in the embedding table.

The web server computes these with its own CPU copy of the weights (loaded on first use). Sizes are
bounded: a request over a bound gets a 413 naming the limit.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from fastapi import APIRouter, Depends, Query

from lmforge.generation import introspect as insight
from lmforge.generation.sampling_params import SamplingParams
from services import structured
from services.app import backend
from services.backend import Backend
from services.errors import ApiError
from services.openapi import (
    BAD_REQUEST,
    COMPARE_OFF,
    GENERATION_FAILED,
    INVALID,
    MODEL_NOT_FOUND,
    OVERLOADED,
    TIMEOUT,
    TOKEN_NOT_FOUND,
    TOO_LARGE,
    errors,
)
from services.schemas import CompareRequest, DistributionRequest, IntrospectRequest, TextInput

router = APIRouter()
Served = Depends(backend)


def _limit(name: str, default: int) -> int:
    return int(os.environ.get(name, "").strip() or default)


def _ids(req: TextInput, b: Backend) -> list[int]:
    if req.messages is not None:
        ids = b.chat.chat_ids([m.as_dict() for m in req.messages])
    elif req.ids is not None:
        ids = list(req.ids)
        vocab = b.config.vocab_size
        if bad := [i for i in ids if i >= vocab]:
            raise ApiError(422, f"ids: {bad[:5]} outside the vocabulary [0, {vocab})", param="ids")
    else:
        ids = b.chat.prompt_ids(req.text or "") if req.add_bos else b.chat.tok.encode(req.text or "")
    if not ids:
        raise ApiError(422, "text: no tokens to look at", param="text")
    context = b.chat.context_length
    if len(ids) > context:
        raise ApiError(
            400,
            f"tokens: {len(ids)} tokens, past the model's context window of {context}",
            param="text",
            code="context_length_exceeded",
        )
    return ids


def _too_large(param: str, message: str) -> ApiError:
    """A 413: the request asks for more than an introspection limit allows (the message names it)."""
    return ApiError(413, message, param=param, code="too_large")


def _token(b: Backend, token_id: int, p: float | None = None) -> dict:
    piece, special = b.chat.tok.token_bytes([token_id])[0]
    out: dict[str, Any] = {"id": token_id, "token": piece.decode("utf-8", "replace"), "special": special}
    if p is not None:
        out["p"] = p
    return out


def _chips(b: Backend, ids: list[int]) -> list[dict]:
    chips, at = [], 0
    for token_id, (piece, special) in zip(ids, b.chat.tok.token_bytes(ids), strict=True):
        chips.append(
            {
                "id": token_id,
                "token": piece.decode("utf-8", "replace"),
                "bytes": list(piece),
                "start": at,
                "end": at + len(piece),
                "special": special,
            }
        )
        at += len(piece)
    return chips


@router.get("/v1/model_card", responses=errors())
def model_card(b: Backend = Served) -> dict:
    """The served version: name, version, alias, and the registry's tags (gates, lineage) and metrics."""
    return {"model": b.model_name, "version": b.version, "alias": b.alias, **b.card}


@router.post("/v1/introspect", responses=errors(BAD_REQUEST, TOO_LARGE, INVALID, TIMEOUT))
def introspect(req: IntrospectRequest, b: Backend = Served) -> dict:
    ids = _ids(req, b)
    n_layer, n_head = b.config.n_layer, b.config.n_head
    if bad := [i for i in req.attention_layers if i >= n_layer]:
        raise ApiError(422, f"attention_layers: {bad} not in 0..{n_layer - 1}", param="attention_layers")
    max_tokens = _limit("LMFORGE_INTROSPECT_MAX_TOKENS", 512)
    if len(ids) > max_tokens:
        limit = f"the introspection limit of {max_tokens} (LMFORGE_INTROSPECT_MAX_TOKENS)"
        raise _too_large("text", f"tokens: {len(ids)} over {limit}")
    cells = len(set(req.attention_layers)) * n_head * len(ids) ** 2
    max_cells = _limit("LMFORGE_INTROSPECT_MAX_ATTENTION", 2_000_000)
    if cells > max_cells:
        limit = f"the limit of {max_cells} (LMFORGE_INTROSPECT_MAX_ATTENTION)"
        message = f"attention_layers: {cells} attention weights over {limit}; ask for fewer layers or a shorter text"
        raise _too_large("attention_layers", message)
    out = insight.introspect(
        b.inspector(), ids, top_k=req.top_k, attention_layers=req.attention_layers, logit_lens=req.logit_lens
    )
    return {
        "model": b.model_name,
        "version": b.version,
        "tokens": _chips(b, ids),
        "count": len(ids),
        "context_length": b.chat.context_length,
        "next": [
            {"top": [_token(b, t, p) for t, p in row["top"]], "entropy": row["entropy"]}
            for row in out["next"]
        ],
        "attention": {str(layer): heads for layer, heads in out["attention"].items()},
        "logit_lens": [[_token(b, t, p) for t, p in layer] for layer in out.get("logit_lens", [])],
    }


@router.post(
    "/v1/sampling/distribution", responses=errors(BAD_REQUEST, TOO_LARGE, INVALID, GENERATION_FAILED, TIMEOUT)
)
def distribution(req: DistributionRequest, b: Backend = Served) -> dict:
    ids = _ids(req, b)
    if req.position is not None and req.position >= len(ids):
        raise ApiError(
            422, f"position: {req.position} past the last token ({len(ids) - 1})", param="position"
        )
    knobs = req.model_dump(include={"temperature", "top_p", "min_p", "repetition_penalty", "seed"})
    params = SamplingParams(**knobs, top_k=req.top_k or None)
    model = b.inspector()
    allowed = _grammar_mask(req, b, ids, model.config.vocab_size)
    dist = insight.next_token_distribution(
        model,
        ids,
        params,
        position=req.position,
        top=req.top,
        allowed=allowed,
        seed=(req.seed or 0) if req.sample and allowed is not None else None,
    )
    for t in dist["tokens"]:
        t.update(_token(b, t["id"]))
    if req.sample:
        upto = ids if req.position is None else ids[: req.position + 1]
        drawn = dist.pop("sampled_id", None)
        dist["sampled"] = _token(
            b, drawn if drawn is not None else insight.step(model, upto, params, req.seed)
        )
    return {"model": b.model_name, "version": b.version, **dist}


def _grammar_mask(req: DistributionRequest, b: Backend, ids: list[int], vocab: int) -> Any:
    """The tokens the request's grammar allows after ``position``, the reply so far (the ids from
    ``reply_start``) fed through its matcher; None without a grammar."""
    if req.structured_outputs is None:
        return None
    constraint, where = structured.constraint_of(req.structured_outputs)
    chat = req.text is None
    b.constraint(constraint, chat=chat, field=where)
    matcher = b.chat.grammars.matcher(constraint, b.chat.tok.stop_ids(chat))
    upto = len(ids) - 1 if req.position is None else req.position
    start = upto + 1 if req.reply_start is None else req.reply_start
    if start > upto + 1:
        raise ApiError(422, f"reply_start: {start} is past position + 1 ({upto + 1})", param="reply_start")
    for i in range(start, upto + 1):
        if not matcher.consume_token(ids[i]):
            raise ApiError(
                422, f"reply_start: token {ids[i]} at {i} does not match the grammar", param="reply_start"
            )
    try:
        return b.chat.grammars.allowed([matcher], vocab, torch.device("cpu"))
    except ValueError as exc:  # the reply so far completes the grammar: only a stop token is left
        raise ApiError(422, f"structured_outputs: {exc}", param="structured_outputs") from exc


@router.get("/v1/tokens/{token_id}/nearest", responses=errors(TOKEN_NOT_FOUND, INVALID))
def nearest(token_id: int, k: int = Query(10, ge=1, le=100), b: Backend = Served) -> dict:
    if not 0 <= token_id < b.config.vocab_size:
        raise ApiError(404, f"token_id: {token_id} not in [0, {b.config.vocab_size})", param="token_id")
    near = insight.nearest_tokens(b.inspector(), token_id, k)
    return {"token": _token(b, token_id), "nearest": [{**_token(b, t), "cosine": c} for t, c in near]}


@router.post(
    "/v1/compare",
    responses=errors(
        BAD_REQUEST, COMPARE_OFF, MODEL_NOT_FOUND, INVALID, GENERATION_FAILED, OVERLOADED, TIMEOUT
    ),
)
def compare(req: CompareRequest, b: Backend = Served) -> dict:
    """The prompt through the served version and ``other``, each with its own tokenizer; every reply
    token with its probability."""
    params = SamplingParams(
        max_new_tokens=req.max_new_tokens, temperature=req.temperature, seed=req.seed, logprobs=0
    )
    sides = []
    for ref in (b.version, req.other):
        version, engine = b.other_version(ref)
        if req.messages is not None:
            ids = engine.chat_ids([m.as_dict() for m in req.messages])
        else:
            ids = engine.prompt_ids(req.text or "")
        try:
            engine.check_fits(ids)
        except ValueError as exc:
            raise ApiError(400, f"text: {exc}", param="text", code="context_length_exceeded") from exc
        (gen,) = engine.generate_ids([ids], params, chat=req.messages is not None)
        pieces = engine.tok.token_bytes(gen.token_ids)
        sides.append(
            {
                "version": version,
                "text": gen.text,
                "finish_reason": gen.finish_reason,
                "tokens": [
                    {"id": t, "token": piece.decode("utf-8", "replace"), "p": math.exp(lp)}
                    for t, (piece, _), lp in zip(gen.token_ids, pieces, gen.logprobs or [], strict=True)
                ],
            }
        )
    return {"model": b.model_name, "served": sides[0], "other": sides[1]}
