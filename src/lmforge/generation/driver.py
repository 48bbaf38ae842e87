"""The engine run to completion: a batch of prompts in, their finished replies out.

:func:`run` submits every prompt to a :class:`~lmforge.generation.engine.ServingEngine` driven on the
caller's thread and iterates it until every reply ends. Evaluation, RL rollouts, stage samples, the
chat engine (and through it the registered model) and the playground's one sampled step all call it,
so every text lmforge produces comes from the one decode loop the service runs, with the same
logits processing and the same draws.

Seeds (:func:`lmforge.generation.logits.row_generator`): prompt ``i`` draws from stream ``i`` of the
seed (``streams="per_row"``, the default: the rows of an RL group differ though their prompts are
equal), or every prompt from stream 0 (``streams="per_request"``: each prompt as if sent alone, so
a seeded request gives the same text here as over HTTP).

Training core: torch and the standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lmforge.generation.engine import ServingEngine
from lmforge.generation.interface import EngineError, Event, Finished, Request
from lmforge.generation.outputs import Decode, Generation
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model import GPT

Streams = Literal["per_row", "per_request"]
MAX_BATCH = 64  # rows decoded together; more prompts wait for a free slot (continuous batching)


class ModelFront:
    """A bare model as an engine's front: token ids in and out, the caller's stop tokens only."""

    def __init__(self, model: GPT, pad_id: int = 0, decode: Decode | None = None) -> None:
        self.model, self.pad_id = model, pad_id
        self.decode = decode  # None: replies carry token ids only

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def with_stops(self, params: SamplingParams, chat: bool) -> SamplingParams:
        return params


def run(
    front,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    chat: bool | Sequence[bool] = False,
    streams: Streams = "per_row",
    max_batch: int = MAX_BATCH,
) -> list[Generation]:
    """Every prompt's reply, in order (see the module docstring). ``front`` is a
    :class:`~lmforge.generation.chat.ChatEngine` or a :class:`ModelFront`; ``chat`` says, for all
    prompts or for each, whether it is a conversation (chat stop tokens) or raw text.

    A prompt that fills the whole context gets an empty reply ending in "length"; a longer one, an
    empty one or one with ids outside the vocabulary is a ``ValueError`` naming the prompt.
    """
    if not prompts:
        raise ValueError("prompts must contain at least one prompt")
    if params.stop_strings and front.decode is None:
        raise ValueError("SamplingParams.stop_strings requires a `decode` function")
    model = front.model
    block = model.config.block_size
    flags = [chat] * len(prompts) if isinstance(chat, bool) else list(chat)
    if len(flags) != len(prompts):
        raise ValueError(f"chat: {len(flags)} flags for {len(prompts)} prompts")
    clean = [[int(t) for t in p] for p in prompts]
    for i, p in enumerate(clean):
        if not p:
            raise ValueError(f"prompt {i} is empty; at least one token is needed to condition on")
        if len(p) > block:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the model's block_size {block}")
    # A prompt that fills the context has no room for a token: its reply is empty, cut by length.
    full = Generation(token_ids=[], finish_reason="length", text=None if front.decode is None else "")
    results: list[Generation | None] = [full if len(p) == block else None for p in clean]
    todo = [i for i, p in enumerate(clean) if len(p) < block]
    if not todo:
        return [full for _ in clean]
    rows = min(len(todo), max_batch)
    # Each slot holds at most the longest prompt plus its reply: no need to allocate the whole context.
    longest = max(len(clean[i]) + params.max_new_tokens for i in todo)
    engine = ServingEngine(
        front,
        max_batch=rows,
        max_queue=len(todo),
        prefill_chunk=max(sum(len(clean[i]) for i in todo[:rows]), 1),
        timeout_s=None,
        thread=False,
        max_len=min(longest, block),
    )
    errors: list[tuple[int, EngineError]] = []

    def collect(i: int):
        def emit(_index: int, event: Event) -> None:
            if isinstance(event, Finished):
                results[i] = event.generation
            elif isinstance(event, EngineError):
                errors.append((i, event))

        return emit

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i in todo:
                try:
                    seed_index = i if streams == "per_row" else 0
                    engine.submit(Request(clean[i], params, flags[i], seed_index=seed_index), collect(i))
                except ValueError as exc:
                    raise ValueError(f"prompt {i}: {exc}") from None
            while not engine.idle:
                engine.iterate()
    finally:
        model.train(was_training)
    if errors:
        i, error = errors[0]
        raise RuntimeError(f"prompt {i}: {error}") from error
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    decode: Decode | None = None,
    pad_id: int = 0,
    streams: Streams = "per_row",
) -> list[Generation]:
    """Replies for token-id prompts on a bare model (no chat template; only ``params``' stop
    tokens end a reply). With ``decode``, replies carry their text and stop strings work."""
    return run(ModelFront(model, pad_id, decode), prompts, params, streams=streams)
