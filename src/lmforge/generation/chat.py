"""The chat engine: a model folder loaded once, answering prompts and conversations.

One place that knows how a request becomes tokens (chat template or raw prompt) and which
tokens end a reply; replies come from the generation engine (:mod:`lmforge.generation.driver`); the MLflow pyfunc, the evaluation
stage and the BentoML service all go through it. Core only: torch, tokenizers.

Device: the engine runs wherever its model is. It never moves a model on its own; a caller that
wants an accelerator says so (``ChatEngine(model, tok, device="cuda")``, or
``device=default_device()`` for a server's "cuda when available" choice).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.generation import driver
from lmforge.generation.grammar import Grammars
from lmforge.generation.outputs import Generation
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model import GPT
from lmforge.model_folder import load_gpt
from lmforge.tokenizer import ChatTokenizer


class PromptTooLongError(ValueError):
    """The prompt does not fit the model's context; the message gives both lengths."""


DEVICE_ENV = "LMFORGE_DEVICE"


def default_device() -> torch.device:
    """The device a server should use: ``$LMFORGE_DEVICE`` (cpu, cuda, cuda:1) when set, else cuda
    when one is available, else cpu. Callers pass it explicitly; ``ChatEngine`` never guesses."""
    if name := os.environ.get(DEVICE_ENV, "").strip():
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPE_ENV = "LMFORGE_DTYPE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def serving_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype a server runs its model in: ``$LMFORGE_DTYPE`` (float32, bfloat16, float16) when set,
    else bfloat16 on a CUDA device that has it (half the weight and KV-cache memory and bandwidth of
    fp32 per decode step; sampling still reads fp32 logits), else float32 (the CPU's bf16 matmuls are
    slow, and the pipeline's figures are fp32)."""
    if name := os.environ.get(DTYPE_ENV, "").strip():
        if name not in DTYPES:
            raise ValueError(f"${DTYPE_ENV}={name!r}: expected one of {', '.join(DTYPES)}")
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class ChatFront:
    """How a request becomes tokens and which tokens end a reply: a tokenizer and a context length,
    no model (a web server whose model runs in another process needs only this)."""

    def __init__(self, tokenizer: ChatTokenizer, context_length: int) -> None:
        self.tok = tokenizer
        self.context_length = context_length
        self.pad_id = tokenizer.pad_id

    def chat_ids(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        return self.tok.render_chat(messages, add_generation_prompt=True, tools=tools).ids

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.tok.bos_id, *self.tok.encode(prompt)]

    def check_fits(self, ids: list[int]) -> list[int]:
        """Reject a prompt that leaves no room for a reply (at least one new token)."""
        room = self.context_length - 1
        if len(ids) <= room:
            return ids
        raise PromptTooLongError(
            f"prompt is {len(ids)} tokens; the model's context is {self.context_length} tokens "
            f"(at most {room} prompt tokens)"
        )

    def with_stops(self, params: SamplingParams, chat: bool) -> SamplingParams:
        """``params`` plus the tokens that end a chat reply or a raw continuation."""
        stops = self.tok.stop_ids(chat)
        return replace(params, stop_token_ids=tuple(dict.fromkeys((*params.stop_token_ids, *stops))))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special=True)

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Constraints compiled against this tokenizer (structured outputs, tool calls)."""
        return Grammars(self.tok.tok.to_str())


class ChatEngine(ChatFront):
    """Prompts and conversations in, :class:`Generation`s out, on the model's device.

    ``device=None`` keeps the model where it is; a device moves the model there (in place, as
    ``nn.Module.to`` does). Every tensor the engine creates lives on ``self.device``.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: ChatTokenizer,
        *,
        device: torch.device | str | None = None,
    ):
        if device is not None:
            model = model.to(device)
        super().__init__(tokenizer, model.config.block_size)
        self.model = model.eval()
        self._lock = threading.Lock()  # one decode loop on the model at a time

    @property
    def device(self) -> torch.device:
        """Where the model (and so every tensor of a request) lives."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, which the KV cache takes too."""
        return next(self.model.parameters()).dtype

    @device.setter
    def device(self, device: torch.device | str) -> None:
        with self._lock:  # never under a running decode loop
            self.model.to(device)

    def to(self, device: torch.device | str) -> ChatEngine:
        """Move the model to ``device``; returns the engine."""
        self.device = device
        return self

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ChatEngine:
        """Load a model folder onto ``device`` (default the CPU), in ``dtype`` (default
        :func:`serving_dtype`: bfloat16 on CUDA, float32 on the CPU)."""
        device = torch.device(device or "cpu")
        model = load_gpt(model_dir).to(device=device, dtype=dtype or serving_dtype(device))
        return cls(model, ChatTokenizer.load(model_dir))

    # ---- generation --------------------------------------------------------------------
    def generate_ids(
        self, prompts: list[list[int]], params: SamplingParams, chat: bool | Sequence[bool]
    ) -> list[Generation]:
        """Replies to token-id prompts through the engine (:func:`lmforge.generation.driver.run`);
        each prompt draws as a request of its own would over HTTP (stream 0 of its seed)."""
        with self._lock:
            return driver.run(self, prompts, params, chat=chat, streams="per_request")

    def chat(self, conversations: list[Sequence[dict]], params: SamplingParams) -> list[Generation]:
        return self.generate_ids([self.chat_ids(m) for m in conversations], params, chat=True)

    def complete(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        return self.generate_ids([self.prompt_ids(p) for p in prompts], params, chat=False)
