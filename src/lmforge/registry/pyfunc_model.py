"""MLflow models-from-code definition of the lmforge chat model.

MLflow runs this file at load time; the weights come from the logged artifacts
(safetensors + config.json + tokenizer.json), never from a pickled object.

Input: a DataFrame (or list of dicts) with a `prompt` column (raw text) or a `messages`
column (a JSON list of {role, content}). Params: max_new_tokens, temperature (0 = greedy),
top_k, top_p, min_p, repetition_penalty, seed. Output: one row per input with `text`,
`finish_reason` and `completion_tokens`.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class LmforgeChatModel(PythonModel):
    def load_context(self, context) -> None:
        from lmforge.generation.chat import ChatEngine, default_device

        # Serving default, chosen here and not in the engine: $LMFORGE_DEVICE, else cuda when available.
        self.engine = ChatEngine.from_dir(context.artifacts["model_dir"], device=default_device())

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        from lmforge.generation.sampling_params import SamplingParams

        rows = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else list(model_input)
        p = {k: v for k, v in (params or {}).items() if v is not None}
        top_k = int(p.get("top_k", 0)) or None
        sampling = SamplingParams(
            max_new_tokens=int(p.get("max_new_tokens", 64)),
            temperature=float(p.get("temperature", 0.0)),
            top_k=top_k,
            top_p=float(p.get("top_p", 1.0)),
            min_p=float(p.get("min_p", 0.0)),
            repetition_penalty=float(p.get("repetition_penalty", 1.0)),
            seed=int(p["seed"]) if "seed" in p and int(p["seed"]) >= 0 else None,
        )
        prompts, chat = [], []
        for i, row in enumerate(rows):
            # A frame with both columns leaves the other cell empty: "", None or NaN.
            messages = row.get("messages")
            if isinstance(messages, str):
                messages = json.loads(messages) if messages.strip() else None
            if isinstance(messages, list) and messages:
                prompts.append(self.engine.chat_ids(messages))
                chat.append(True)
            elif isinstance(row.get("prompt"), str):
                prompts.append(self.engine.prompt_ids(row["prompt"]))
                chat.append(False)
            else:
                raise ValueError(f"input row {i}: give a `prompt` string or a `messages` list")
        # One engine run for the whole frame; each row draws as a request of its own (the service's rule).
        gens = self.engine.generate_ids(prompts, sampling, chat) if prompts else []
        out = [
            {"text": g.text, "finish_reason": g.finish_reason, "completion_tokens": len(g.token_ids)}
            for g in gens
        ]
        return pd.DataFrame(out)


mlflow.models.set_model(LmforgeChatModel())
