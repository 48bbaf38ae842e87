"""lmforge's model as an lm-evaluation-harness ``LM``: the harness's three request types on our
engine and our tokenizer, in process, offline.

- ``loglikelihood(context, continuation)``: the continuation's summed log-probability and whether
  greedy decoding would have produced it, from one forward pass per batch of requests;
- ``loglikelihood_rolling(text)``: a whole document's log-likelihood in the harness's own rolling
  windows (``lm_eval.utils.get_rolling_token_windows``, prefixed by ``<|bos|>``);
- ``generate_until(context, gen_kwargs)``: replies through the one generation engine
  (:class:`~lmforge.generation.chat.ChatEngine`), greedy unless the task samples.

Contexts are read as the service reads them, so a task scores the same in process and against the
running service: a chat (``--apply_chat_template``) is rendered by :meth:`apply_chat_template` to
the same ids ``/v1/chat/completions`` renders; plain text is ``<|bos|> + text`` as
``/v1/completions`` encodes a text prompt. Our tokenizer never reads special-token names out of text,
so a rendered chat is kept by its display string (its ids are looked up, never re-encoded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lmforge.generation.chat import ChatEngine
from lmforge.generation.sampling_params import SamplingParams
from lmforge.tokenizer import CHAT_TEMPLATE

DEFAULT_MAX_GEN_TOKS = 64


class LmforgeLM(LM):
    """An lm-evaluation-harness model over a :class:`ChatEngine` (model and tokenizer)."""

    def __init__(
        self, engine: ChatEngine, *, batch_size: int = 16, seed: int = 0, max_length: int | None = None
    ) -> None:
        """``max_length``: the longest input a forward pass reads (default: the model's context), as
        the harness's API models take it (``max_length=...`` in ``--model_args``)."""
        super().__init__()
        self.engine = engine
        self.tok = engine.tok
        self.context_length = engine.context_length
        self.max_length = min(max_length or engine.context_length, engine.context_length)
        self.batch_size = batch_size
        self.seed = seed
        self._chats: dict[str, list[int]] = {}  # rendered chat's display string -> its ids

    # ---- how text becomes ids (as the service does) ------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return "lmforge"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return repr(CHAT_TEMPLATE)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        ids = self.tok.render_chat(chat_history, add_generation_prompt=add_generation_prompt).ids
        shown = self.tok.decode(ids)  # special tokens by name: <|bos|><|user|>...<|assistant|>
        self._chats[shown] = ids
        return shown

    def _context(self, context: str) -> tuple[list[int], bool]:
        """A context's ids and whether it is a chat (a rendered chat, else ``<|bos|> + text``)."""
        if context in self._chats:
            return self._chats[context], True
        return self.engine.prompt_ids(context), False

    # ---- scoring ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) of each (context ids, continuation ids),
        the input cut on the left to the model's context."""
        model = self.engine.model.eval()
        device = self.engine.device
        out: list[tuple[float, bool]] = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i : i + self.batch_size]
            inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in chunk]
            width = max(len(x) for x in inputs)
            x = torch.full((len(chunk), width), self.tok.pad_id, dtype=torch.long)
            for row, ids in enumerate(inputs):
                x[row, : len(ids)] = torch.tensor(ids)
            logprobs = torch.log_softmax(model(x.to(device)).float(), dim=-1)
            for row, ((_, cont), ids) in enumerate(zip(chunk, inputs, strict=True)):
                span = logprobs[row, len(ids) - len(cont) : len(ids)]
                target = torch.tensor(cont, device=span.device)
                picked = span.gather(-1, target[:, None]).squeeze(-1)
                out.append((float(picked.double().sum()), bool((span.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """A continuation longer than the window is scored in windows of ``max_length`` of its
        tokens, each token seeing up to ``max_length`` tokens before it (the rolling rule)."""
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for n, request in enumerate(requests):
            context, continuation = request.args[0], request.args[1]
            ctx, _ = self._context(context)
            cont = self.tok.encode(continuation)
            if not cont:
                raise ValueError(f"loglikelihood: empty continuation for context {context[-80:]!r}")
            for start in range(0, len(cont), self.max_length):
                windows.append((ctx + cont[:start], cont[start : start + self.max_length]))
                owner.append(n)
        totals = [[0.0, True] for _ in requests]
        for n, (logprob, greedy) in zip(owner, self._score(windows), strict=True):
            totals[n][0] += logprob
            totals[n][1] = totals[n][1] and greedy
        return [(logprob, greedy) for logprob, greedy in totals]

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for n, request in enumerate(requests):
            ids = self.tok.encode(request.args[0])
            for pair in get_rolling_token_windows(
                token_list=ids, prefix_token=self.tok.bos_id, max_seq_len=self.max_length, context_len=1
            ):
                windows.append(make_disjoint_window(pair))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._score(windows), strict=True):
            totals[n] += logprob
        return totals

    # ---- generation ------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Replies to every request, one engine batch per distinct set of sampling settings."""
        jobs = []
        for request in requests:
            ids, chat = self._context(request.args[0])
            ids = ids[
                -(self.context_length - 1) :
            ]  # the harness's convention: keep an over-long context's end
            jobs.append((ids, chat, self._params(dict(request.args[1]), len(ids))))
        out = [""] * len(jobs)
        for key in dict.fromkeys(repr(p) for _, _, p in jobs):
            members = [i for i, (_, _, p) in enumerate(jobs) if repr(p) == key]
            params = jobs[members[0]][2]
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                gens = self.engine.generate_ids(
                    [jobs[i][0] for i in batch], params, chat=[jobs[i][1] for i in batch]
                )
                for i, gen in zip(batch, gens, strict=True):
                    out[i] = gen.text or ""
        return out

    def _params(self, kwargs: dict[str, Any], prompt_tokens: int) -> SamplingParams:
        """The harness's ``gen_kwargs`` as our sampling settings (greedy unless ``do_sample``)."""
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_tokens", DEFAULT_MAX_GEN_TOKS)))
        return SamplingParams(
            max_new_tokens=max(1, min(max_new, self.context_length - prompt_tokens)),
            temperature=temperature,
            top_p=float(kwargs.pop("top_p", 1.0)),
            stop_strings=tuple(s for s in until if s),
            seed=self.seed,
        )
