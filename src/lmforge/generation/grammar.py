"""Grammar-constrained decoding: a :class:`Constraint` (a JSON schema, a regular expression, a choice
among strings or a Lark grammar) becomes, at each step of a row, the set of tokens that keep the reply
inside the grammar.

The grammar engine is `llguidance <https://github.com/guidance-ai/llguidance>`_ (the one vLLM and
SGLang use): its compiler, its Earley parser and its token trie; nothing here parses grammars. It
was measured against ``outlines-core`` and ``xgrammar`` on our tokenizer (``benchmarks/
grammar_engines.py``, docs/benchmarks.md). It is imported on first use, so a process that never
constrains a reply (the training stages, the GPU image) does not need it.

* :class:`Constraint` is what a request carries (plain strings: it pickles across the engine
  process's pipe); ``Constraint.grammar()`` is llguidance's form of it.
* :class:`Grammars` belongs to one tokenizer: it checks constraints (:class:`GrammarError` names the
  unsupported feature, ``Unimplemented keys: ["uniqueItems"]``), compiles each once (an LRU cache by
  constraint and stop tokens) and hands each row its own matcher (a copy of the compiled one).
* :func:`allowed_tokens` is the step's mask: bool [rows, vocab], True everywhere for a free row, so
  constrained and free rows share a batch.

A matcher lets a stop token through only where the grammar may end, and a reply ends ("stop") as
soon as the grammar can take no more (:attr:`Row.matcher` in :mod:`lmforge.generation.steps`).

Training core: torch, the standard library, llguidance (lazily).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

Kind = Literal["json", "regex", "choice", "lark"]
# JSON as a small model writes it best: no optional whitespace (llguidance's default allows any).
JSON_OPTIONS = {"whitespace_flexible": False}
CACHE_SIZE = 256  # compiled grammars kept per tokenizer


class GrammarError(ValueError):
    """A constraint the grammar engine cannot compile; the message names the problem."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - the serving extras install it
        raise GrammarError(
            "structured outputs need the llguidance package (pip install 'lmforge[pipeline]')"
        ) from exc
    return llguidance


@dataclass(frozen=True, slots=True)
class Constraint:
    """What a reply must match. ``source``: the JSON schema as JSON text, the regex, the choices as a
    JSON list, or the Lark grammar (which may embed ``%json {...}`` schemas)."""

    kind: Kind
    source: str

    @classmethod
    def json_schema(cls, schema: dict | bool) -> Constraint:
        return cls("json", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        if not options or any(not isinstance(o, str) or not o for o in options):
            raise GrammarError("choice: give one or more non-empty strings")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        return cls("lark", grammar)

    def grammar(self) -> str:
        """llguidance's serialized grammar for this constraint."""
        matcher = _llguidance().LLMatcher
        if self.kind == "json":
            try:
                return matcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
            except ValueError as exc:
                raise GrammarError(f"json_schema: {exc}") from None
        if self.kind == "regex":
            return matcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            options = json.loads(self.source)
            return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
        return matcher.grammar_from_lark(self.source)


class Grammars:
    """Constraints compiled against one tokenizer (``tokenizer_json``: a ``tokenizers`` JSON)."""

    def __init__(self, tokenizer_json: str, cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer_json, self.cache_size = tokenizer_json, cache_size
        self._tokenizers: dict[tuple[int, ...], Any] = {}
        self._compiled: OrderedDict[tuple[Constraint, tuple[int, ...]], Any] = OrderedDict()
        self._lock = threading.Lock()  # the web layer checks while the engine thread compiles
        self.hits = self.misses = 0
        self.known = 0  # the tokenizer's vocabulary size, once a constraint was compiled

    def allowed(self, matchers: Sequence[Any | None], vocab_size: int, device: torch.device) -> Tensor:
        """:func:`allowed_tokens` for rows holding this tokenizer's matchers."""
        return allowed_tokens(matchers, self.known, vocab_size, device)

    def _tokenizer(self, stop_ids: tuple[int, ...]) -> Any:
        """llguidance's view of the tokenizer, with ``stop_ids`` as the tokens that end a reply."""
        if stop_ids not in self._tokenizers:
            llg = _llguidance()
            self._tokenizers[stop_ids] = llg.LLTokenizer(self.tokenizer_json, eos_token=list(stop_ids))
            self.known = self._tokenizers[stop_ids].vocab_size
        return self._tokenizers[stop_ids]

    def check(self, constraint: Constraint, stop_ids: Sequence[int]) -> None:
        """Raise :class:`GrammarError` naming what the engine cannot do (the service's 400)."""
        self._compiled_matcher(constraint, tuple(stop_ids))

    def matcher(self, constraint: Constraint, stop_ids: Sequence[int]) -> Any:
        """A fresh matcher for one row: a copy of the compiled grammar (compiled once per key)."""
        return self._compiled_matcher(constraint, tuple(stop_ids)).deep_copy()

    def _compiled_matcher(self, constraint: Constraint, stop_ids: tuple[int, ...]) -> Any:
        """The cached matcher of ``(constraint, stop_ids)`` in its start state, compiled on a miss.
        Never hand it to a row: it is the prototype that rows get copies of."""
        key = (constraint, stop_ids)
        with self._lock:
            proto = self._compiled.get(key)
            if proto is not None:
                self._compiled.move_to_end(key)
                self.hits += 1
                return proto
            self.misses += 1
            # The constructor compiles and never raises: a grammar it cannot build leaves the
            # matcher in an error state whose message names the problem.
            proto = _llguidance().LLMatcher(self._tokenizer(stop_ids), constraint.grammar(), log_level=0)
            if proto.is_error():
                raise GrammarError(f"{constraint.kind}: {proto.get_error().strip()}")
            self._compiled[key] = proto
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
            return proto


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(
    matchers: Sequence[Any | None], known: int, vocab_size: int, device: torch.device
) -> Tensor:
    """bool [len(matchers), vocab_size]: the tokens each row's matcher allows now (every token for a
    row without one; for a row with one, never an id past the tokenizer's ``known`` ids). Raises
    ``ValueError`` when a matcher allows nothing (its grammar failed)."""
    llg_torch = __import__("llguidance.torch", fromlist=["fill_next_token_bitmask"])
    known = min(known, vocab_size)
    words = (known + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    for i, m in enumerate(matchers):
        if m is not None:
            llg_torch.fill_next_token_bitmask(m, bitmask, i)
            if m.is_error():
                raise ValueError(f"the reply left its grammar: {m.get_error()}")
    bits = ((bitmask[:, :, None] >> _BITS) & 1).bool().reshape(len(matchers), words * 32)[:, :known]
    allowed = torch.ones(len(matchers), vocab_size, dtype=torch.bool)
    free = torch.tensor([m is None for m in matchers])
    allowed[:, :known] = bits | free[:, None]
    allowed[:, known:] = free[:, None]
    if not bool(allowed.any(dim=-1).all()):
        raise ValueError("the grammar allows no next token")
    return allowed.to(device)
