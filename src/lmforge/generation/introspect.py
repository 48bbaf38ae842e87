"""Looking inside the model, for people: next-token probabilities and entropy at every position,
attention weights per layer and head, a logit lens, nearest tokens in the embedding table, and the
sampling lab (a next-token distribution before and after each sampling filter, and one sampled step).

Everything here goes through the model's own forward (``GPT.hidden_states`` with a ``Trace``) and
the sampler's own logits processing (:mod:`lmforge.generation.logits`), so what a page shows is what the
model and the sampler compute, not a copy that can drift. Core: torch and the standard library.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.generation import logits as rowwise
from lmforge.generation.driver import generate
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model import GPT, Trace


def _ids_tensor(model: GPT, ids: list[int]) -> Tensor:
    cfg = model.config
    if not ids:
        raise ValueError("ids: at least one token is needed")
    if len(ids) > cfg.block_size:
        raise ValueError(f"ids: {len(ids)} tokens, more than the model's context of {cfg.block_size}")
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
        raise ValueError(f"ids: token ids must lie in [0, {cfg.vocab_size})")
    return torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)


def _top(logp: Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of log-probabilities [T, V]: the k most likely (token, probability)."""
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [
        [(t, math.exp(v)) for t, v in zip(ti, tv, strict=True)]
        for ti, tv in zip(indices.tolist(), values.tolist(), strict=True)
    ]


@torch.inference_mode()
def introspect(
    model: GPT,
    ids: list[int],
    *,
    top_k: int = 5,
    attention_layers: list[int] | None = None,
    logit_lens: bool = True,
) -> dict[str, Any]:
    """One forward over ``ids``: per position the top-k next tokens with probabilities and the
    entropy (nats) of the whole distribution; attention weights [head][query][key] of the chosen
    layers; the logit lens (each layer's residual stream through the final norm and the unembedding:
    its top-1 token and probability per position, layer 0 = the embeddings)."""
    x = _ids_tensor(model, ids)
    n_layer = model.config.n_layer
    layers = sorted(set(attention_layers or []))
    if any(not 0 <= i < n_layer for i in layers):
        raise ValueError(f"attention_layers: layers are numbered 0..{n_layer - 1}")
    trace = Trace()
    logits = model.lm_head(model.hidden_states(x, trace=trace))[0].float()
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).nan_to_num().sum(dim=-1)
    out: dict[str, Any] = {
        "next": [
            {"top": top, "entropy": h} for top, h in zip(_top(logp, top_k), entropy.tolist(), strict=True)
        ],
        "attention": {i: trace.attention[i][0].float().tolist() for i in layers},
    }
    if logit_lens:
        lens = []
        for resid in trace.residual:
            lp = model.lm_head(model.norm_f(resid))[0].float().log_softmax(dim=-1)
            best, where = lp.max(dim=-1)
            lens.append([(t, math.exp(v)) for t, v in zip(where.tolist(), best.tolist(), strict=True)])
        out["logit_lens"] = lens
    return out


@torch.inference_mode()
def nearest_tokens(model: GPT, token_id: int, k: int = 10) -> list[tuple[int, float]]:
    """The k tokens whose embedding rows are closest (cosine) to ``token_id``'s, itself excluded."""
    table = model.tok_emb.weight.float()
    if not 0 <= token_id < table.shape[0]:
        raise ValueError(f"token_id: must lie in [0, {table.shape[0]})")
    sims = F.cosine_similarity(table, table[token_id][None], dim=-1)
    sims[token_id] = float("-inf")
    values, indices = sims.topk(min(k, table.shape[0] - 1))
    return list(zip(indices.tolist(), values.tolist(), strict=True))


# The sampler's stages in order; each adds one filter to the ones before it. A constrained reply has a
# grammar stage after the arithmetic ones, where :func:`lmforge.generation.logits.process` applies it.
STAGES = ("penalties_and_temperature", "top_k", "top_p", "min_p")
GRAMMAR_STAGES = ("penalties_and_temperature", "grammar", "top_k", "top_p", "min_p")


@torch.inference_mode()
def _stages(
    model: GPT, ids: list[int], params: SamplingParams, position: int | None, allowed: Tensor | None = None
) -> tuple[int, Tensor, list[tuple[str, Tensor]]]:
    """The position, the raw logits [1, V] of the token after it, and the logits after each
    sampling stage (each stage adds one filter to the ones before it), by :mod:`lmforge.generation.logits`.
    ``allowed``: bool [1, V], the tokens a grammar allows there (adds the grammar stage)."""
    x = _ids_tensor(model, ids)
    position = len(ids) - 1 if position is None else position
    if not 0 <= position < len(ids):
        raise ValueError(f"position: must lie in [0, {len(ids) - 1}]")
    logits = model(x[:, : position + 1])[0, -1:].float()  # [1, V]
    vocab = logits.shape[-1]
    seen = rowwise.presence_mask(x[:, : position + 1], vocab)
    off = {"top_k": None, "top_p": 1.0, "min_p": 0.0}
    stages = []
    names = STAGES if allowed is None else GRAMMAR_STAGES
    for i, name in enumerate(names):
        on = set(names[1 : i + 1])
        knobs = replace(params, **{k: v for k, v in off.items() if k not in on})
        mask = allowed if "grammar" in on else None
        processed = rowwise.process(
            logits, rowwise.RowKnobs.of([knobs], vocab, logits.device), seen, None, mask
        )
        stages.append((name, processed[0]))
    return position, logits, stages


@torch.inference_mode()
def next_token_distribution(
    model: GPT,
    ids: list[int],
    params: SamplingParams,
    *,
    position: int | None = None,
    top: int = 20,
    allowed: Tensor | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The distribution of the token after ``ids[: position + 1]`` (default: after all of ``ids``),
    raw (softmax of the logits) and after each sampling stage, computed by :mod:`lmforge.generation.logits`,
    with the stage that removed each token. Tokens: the ``top`` most likely before or after.
    ``allowed``: a grammar's mask there (a ``grammar`` stage; ``removed_by: "grammar"``). ``seed``:
    also draw one token from the final distribution, as the engine draws a request's first token."""
    position, logits, stages = _stages(model, ids, params, position, allowed)
    names = [name for name, _ in stages]
    vocab = logits.shape[-1]
    final = stages[-1][1]
    raw = logits[0].softmax(dim=-1)
    after = final.softmax(dim=-1)
    shown = torch.cat([raw.topk(min(top, vocab)).indices, after.topk(min(top, vocab)).indices]).unique()
    shown = shown[raw[shown].argsort(descending=True)]
    removed_by: dict[int, str] = {}
    finite_before = torch.ones(vocab, dtype=torch.bool, device=logits.device)
    for name, processed in stages:
        finite = torch.isfinite(processed)
        for t in (finite_before & ~finite).nonzero().squeeze(-1).tolist():
            removed_by[t] = name
        finite_before = finite
    stage_probs = {name: p.softmax(dim=-1) for name, p in stages}
    tokens = [
        {
            "id": t,
            "p_raw": float(raw[t]),
            **{f"p_{name}": float(stage_probs[name][t]) for name in names},
            "p": float(after[t]),
            "removed_by": removed_by.get(t),
        }
        for t in shown.tolist()
    ]
    greedy = bool(params.temperature == 0 or final.isfinite().sum() == 1)
    drawn = {}
    if seed is not None:
        knobs = rowwise.RowKnobs.of([params], vocab, logits.device)
        uniform = torch.tensor([rowwise.row_generator(seed, 0).random()], dtype=torch.float64)
        drawn["sampled_id"] = int(rowwise.draw(final[None], knobs, uniform.to(logits.device))[0])
    return {
        **drawn,
        "stages": names,
        "position": position,
        "tokens": tokens,
        "kept": int(torch.isfinite(final).sum()),
        "vocab_size": vocab,
        "greedy": greedy,
    }


def step(model: GPT, ids: list[int], params: SamplingParams, seed: int | None) -> int:
    """One token after ``ids``, drawn by the generation engine as a request's first token is
    (stream 0 of ``seed``): the same processing and the same draw as the service."""
    one = replace(params, max_new_tokens=1, stop_token_ids=(), stop_strings=(), seed=seed, logprobs=None)
    _ids_tensor(model, ids)  # the checks, with this module's messages
    if len(ids) >= model.config.block_size:
        raise ValueError(f"ids: {len(ids)} tokens fill the model's context; no token can follow")
    (reply,) = generate(model, [ids], one, streams="per_request")
    return reply.token_ids[0]
