"""A model folder, the hand-off between stages: weights, config and tokenizer side by side.

    <dir>/model.safetensors   weights (safetensors; never a pickle)
    <dir>/config.json         GPTConfig (+ "kind": causal_lm | reward_model)
    <dir>/tokenizer.json      the tokenizer it was trained with (and chat_template.json)

Needs only torch and safetensors: loading a model to serve it imports neither Lightning nor the
orchestration stack (MLflow, BentoML, Prefect); tests/test_layering.py checks it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from lmforge.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from lmforge.heads import ScalarHeadModel
from lmforge.model import GPT, GPTConfig

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def export_weights(model: nn.Module, path: str | Path) -> Path:
    """Write model weights as safetensors, atomically (tied tensors are stored once)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))
    return path


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load safetensors weights written by `export_weights` into `model` in place."""
    load_model(model, str(path), strict=strict)
    return model


def save_model_dir(
    model: nn.Module,
    config: GPTConfig,
    tokenizer_dir: str | Path,
    out: str | Path,
    kind: str = "causal_lm",
    extra: dict | None = None,
) -> Path:
    """Every file is written atomically (a killed save never leaves a half-written file)."""
    out = Path(out)
    export_weights(model, out / WEIGHTS)
    atomic_write_text(
        out / CONFIG, json.dumps({"kind": kind, "model": config.to_dict(), **(extra or {})}, indent=2) + "\n"
    )
    for name in (TOKENIZER, "chat_template.json"):
        src = Path(tokenizer_dir) / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            atomic_write_bytes(out / name, src.read_bytes())
    return out


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model config not found (is {model_dir} a model folder?)")
    return json.loads(path.read_text())


def load_gpt(model_dir: str | Path) -> GPT:
    """A causal LM from a model folder, in eval mode on the CPU."""
    cfg = read_config(model_dir)
    if cfg.get("kind", "causal_lm") != "causal_lm":
        raise ValueError(f"{model_dir}: holds a {cfg['kind']}, not a causal LM")
    model = GPT(GPTConfig.from_dict(cfg["model"]))
    load_weights(model, Path(model_dir) / WEIGHTS)
    return model.eval()


def load_reward_model(model_dir: str | Path) -> ScalarHeadModel:
    """A reward model (GPT backbone + scalar head) from a model folder, in eval mode."""
    cfg = read_config(model_dir)
    if cfg.get("kind") != "reward_model":
        raise ValueError(f"{model_dir}: holds a {cfg.get('kind')}, not a reward model")
    model = ScalarHeadModel(GPT(GPTConfig.from_dict(cfg["model"])))
    load_weights(model, Path(model_dir) / WEIGHTS)
    return model.eval()
