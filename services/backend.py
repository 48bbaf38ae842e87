"""What the routes serve: the loaded model version, its chat engine and the continuous-batching
engine in front of it, plus the request -> tokens / sampling-parameters rules every route shares."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.generation.chat import ChatEngine, ChatFront, PromptTooLongError
from lmforge.generation.grammar import Constraint, GrammarError
from lmforge.generation.interface import Engine
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model import GPT, GPTConfig
from services.errors import ApiError
from services.schemas import Message, Sampling


def model_folder(model_uri: str) -> Path:
    """The lmforge model folder (weights, config, tokenizer) inside a registered pyfunc model."""
    import mlflow
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    spec = yaml.safe_load((local / "MLmodel").read_text())
    return local / spec["flavors"]["python_function"]["artifacts"]["model_dir"]["path"]


@dataclass
class Backend:
    chat: ChatFront  # tokenizer + context: requests -> tokens (the model itself is in the engine)
    config: GPTConfig
    engine: Engine  # a ServingEngine on a thread here, or an EngineProcess
    model_name: str
    alias: str
    version: str
    model_uri: str
    run_id: str | None
    created: int
    tracking_uri: str
    load_seconds: float
    model_dir: Path | None = None
    card: dict = field(default_factory=dict)  # registry tags and metrics of the served version
    _others: OrderedDict = field(default_factory=OrderedDict, repr=False)  # version -> ChatEngine (LRU)
    _inspector: Any = field(default=None, repr=False)
    _inspector_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ready(self) -> bool:
        """The engine runs and takes requests (/readyz)."""
        return self.engine.alive

    @property
    def live(self) -> bool:
        """The engine runs or can be restarted (/livez); False: only a new replica can serve."""
        return self.engine.live

    def inspector(self) -> GPT:
        """The model's weights in this process, on the CPU, for introspection (loaded on first use:
        the serving engine keeps its own copy in its process). An in-process engine's model is reused."""
        with self._inspector_lock:
            if self._inspector is None:
                if isinstance(self.chat, ChatEngine):
                    self._inspector = self.chat.model
                else:
                    from lmforge.model_folder import load_gpt

                    self._inspector = load_gpt(self.model_dir)
            return self._inspector

    def other_version(self, ref: str) -> tuple[str, ChatEngine]:
        """Another registered version of the served model, by version number or alias, on the CPU, for
        side-by-side comparison; at most LMFORGE_COMPARE_MAX_MODELS (1) are held (least recently used
        goes). The served version itself is the introspection copy."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient()
        try:
            mv = (
                client.get_model_version(self.model_name, ref)
                if ref.isdigit()
                else (client.get_model_version_by_alias(self.model_name, ref))
            )
        except MlflowException as exc:
            raise ApiError(
                404,
                f"other: {self.model_name} has no version or alias {ref!r}",
                param="other",
                code="model_not_found",
            ) from exc
        version = str(mv.version)
        if version == self.version:
            return version, ChatEngine(self.inspector(), self.chat.tok)
        limit = int(os.environ.get("LMFORGE_COMPARE_MAX_MODELS", "").strip() or 1)
        if limit < 1:
            raise ApiError(403, "other: comparison is off (LMFORGE_COMPARE_MAX_MODELS=0)", param="other")
        with self._inspector_lock:
            if version not in self._others:
                while len(self._others) >= limit:
                    self._others.popitem(last=False)
                self._others[version] = ChatEngine.from_dir(
                    model_folder(f"models:/{self.model_name}/{version}")
                )
            self._others.move_to_end(version)
            return version, self._others[version]

    # ---- requests -> tokens ------------------------------------------------------------
    def ids(
        self,
        *,
        prompt: str | list[int] | None = None,
        messages: list[Message] | None = None,
        field: str,
        score_only: bool = False,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Token ids of a prompt (text gets <|bos|>; a list of ids is taken as is) or a chat (with
        the offered ``tools`` in its system turn, :mod:`lmforge.tool_calls`)."""
        if messages:
            try:
                ids = self.chat.chat_ids([m.as_dict() for m in messages], tools=tools)
            except ValueError as exc:
                raise ApiError(400, str(exc), param=field, code="invalid_value") from exc
        elif isinstance(prompt, list):
            ids = list(prompt)
            vocab = self.chat.tok.vocab_size
            if bad := [i for i in ids if i >= vocab]:
                raise ApiError(
                    400,
                    f"{field}: token ids {bad[:5]} outside the vocabulary [0, {vocab})",
                    param=field,
                    code="invalid_value",
                )
        else:
            ids = self.chat.prompt_ids(prompt or "")
        if score_only and len(ids) <= self.chat.context_length:
            return ids
        try:
            return self.chat.check_fits(ids)
        except PromptTooLongError as exc:
            raise ApiError(400, f"{field}: {exc}", param=field, code="context_length_exceeded") from exc

    def params(
        self,
        s: Sampling,
        *,
        max_new_tokens: int | None,
        stop: list[str] | None,
        logprobs: int | None,
        logit_bias: dict[str, float] | None = None,
    ) -> SamplingParams:
        vocab = self.chat.tok.vocab_size
        bias = {int(k): v for k, v in (logit_bias or {}).items()}
        if bad := [t for t in bias if t >= vocab]:
            raise ApiError(
                400,
                f"logit_bias: token ids {bad[:5]} outside the vocabulary [0, {vocab})",
                param="logit_bias",
                code="invalid_value",
            )
        try:
            return SamplingParams(
                max_new_tokens=max_new_tokens or self.chat.context_length,
                temperature=s.temperature,
                top_k=s.top_k or None,
                top_p=s.top_p,
                min_p=s.min_p,
                repetition_penalty=s.repetition_penalty,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                logit_bias=bias or None,
                stop_strings=tuple(stop or ()),
                seed=s.seed,
                logprobs=logprobs,
            )
        except ValueError as exc:  # the schemas should have caught it; still a client error
            raise ApiError(422, str(exc), code="invalid_value") from exc

    def constraint(self, spec: Constraint | None, *, chat: bool, field: str) -> Constraint | None:
        """``spec``, checked against this tokenizer: a 400 naming ``field`` and the unsupported
        feature when the grammar engine cannot compile it (compiled once, then cached)."""
        if spec is None:
            return None
        try:
            self.chat.grammars.check(spec, self.chat.tok.stop_ids(chat))
        except GrammarError as exc:
            raise ApiError(400, f"{field}: {exc}", param=field, code="invalid_value") from exc
        return spec

    def check_model(self, requested: str | None) -> None:
        known = {self.model_name, f"{self.model_name}@{self.alias}", f"{self.model_name}/{self.version}"}
        if requested and requested not in known:
            raise ApiError(
                404,
                f"model: {requested!r} is not served here; this server serves "
                f"{self.model_name!r} (version {self.version}, alias {self.alias!r})",
                param="model",
                code="model_not_found",
            )

    # ---- descriptions ------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "lmforge",
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
        }

    def fingerprint(self) -> str:
        return f"{self.model_name}-v{self.version}"

    def info(self) -> dict[str, Any]:
        import torch

        cfg = self.config
        eng = self.engine
        return {
            "ready": self.ready,
            "model": self.model_name,
            "alias": self.alias,
            "version": self.version,
            "model_uri": self.model_uri,
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "device": str(self.engine.device),
            "dtype": self.engine.dtype,
            "torch_threads": int(os.environ.get("LMFORGE_TORCH_THREADS") or torch.get_num_threads()),
            "context_length": self.chat.context_length,
            "vocab_size": cfg.vocab_size,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "load_seconds": self.load_seconds,
            "engine": {
                "max_batch": eng.max_batch,
                "max_queue": eng.max_queue,
                "prefill_chunk": eng.prefill_chunk,
                "timeout_s": eng.timeout_s,
                "state": eng.state,
                "pid": getattr(eng, "pid", None),
                "restarts": getattr(eng, "restarts", 0),
                "in_flight": eng.in_flight,
                "waiting": eng.waiting,
                "running": eng.running,
                **eng.stats,
            },
        }
