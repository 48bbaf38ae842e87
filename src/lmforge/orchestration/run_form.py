"""The typed run form: what a person fills in to start a pipeline run (the Prefect UI renders it).

`preset` is a choice among the presets params.yaml defines; the common knobs are typed fields
with descriptions and the bounds of the params models they set (`lmforge.params`, the one
source); `overrides` stays as the escape hatch. :func:`form_overrides` turns a filled form into
params keys, which `lmforge.orchestration.overrides.apply_overrides` validates and writes into params.yaml,
exactly as `lmforge run --set key=value` would. A field left empty (None) keeps the value
params.yaml already holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from lmforge.params import Gates, ParamsError, RegisterParams, RLHFParams, TrainParams, override_key
from lmforge.stages import TRAINING_STAGES


def preset_names(params_path: str | Path) -> list[str]:
    """The presets params.yaml defines, in file order (the form's choices)."""
    try:
        raw = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    presets = raw.get("presets") if isinstance(raw, dict) else None
    return [str(name) for name in presets] if isinstance(presets, dict) else []


def _like(model: type[BaseModel], name: str, title: str, description: str) -> Any:
    """An optional form field carrying the bounds of `model.name` (None: keep params.yaml's value)."""
    info: FieldInfo = model.model_fields[name]
    return Field(
        None, title=title, description=description, json_schema_extra=_plain_optional, **_bounds(info)
    )


def _plain_optional(schema: dict[str, Any]) -> None:
    """`anyOf: [{integer, minimum: 1}, {null}]` -> `{integer, minimum: 1}`, no default: the UI then
    shows a plain number box that may stay empty, instead of a type switch."""
    branches = [b for b in schema.pop("anyOf", []) if b.get("type") != "null"]
    if len(branches) == 1:
        schema.update(branches[0])
    if schema.get("default", "") is None:
        del schema["default"]


def _bounds(info: FieldInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in info.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if (value := getattr(item, attr, None)) is not None:
                out[attr] = value
    return out


class _Form(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Steps(_Form):
    """Optimizer steps per training stage. Empty: the value in params.yaml (or the preset's)."""

    pretrain: int | None = _like(
        TrainParams, "max_steps", "pretrain steps", "pretraining steps (`pretrain.max_steps`)"
    )
    sft: int | None = _like(
        TrainParams, "max_steps", "SFT steps", "supervised fine-tuning steps (`sft.max_steps`)"
    )
    reward: int | None = _like(
        TrainParams, "max_steps", "reward steps", "reward-model steps (`reward.max_steps`)"
    )
    rlhf: int | None = _like(TrainParams, "max_steps", "RLHF steps", "RLHF policy steps (`rlhf.max_steps`)")


class LearningRates(_Form):
    """Peak learning rate per training stage (the stage's schedule decays it after warmup). Empty:
    params.yaml's."""

    pretrain: float | None = _like(
        TrainParams, "lr", "pretrain learning rate", "pretraining peak learning rate (`pretrain.lr`)"
    )
    sft: float | None = _like(
        TrainParams, "lr", "SFT learning rate", "fine-tuning peak learning rate (`sft.lr`)"
    )
    reward: float | None = _like(
        TrainParams, "lr", "reward learning rate", "reward-model peak learning rate (`reward.lr`)"
    )
    rlhf: float | None = _like(TrainParams, "lr", "RLHF learning rate", "RLHF peak learning rate (`rlhf.lr`)")


# The choices are the params models' own (one source).
RLAlgorithm = RLHFParams.model_fields["algorithm"].annotation
Dtype = RegisterParams.model_fields["dtype"].annotation


def _optional_choice(schema: dict[str, Any]) -> None:
    """A dropdown that may stay empty: the choices plus null in one `enum` (a null branch beside it
    would show a type switch, and without null Prefect's form refuses the empty field it submits:
    "None is not one of [...]")."""
    _plain_optional(schema)
    schema["enum"] = [*schema["enum"], None]
    schema.pop("type", None)


def _choice(title: str, description: str) -> Any:
    return Field(None, title=title, description=description, json_schema_extra=_optional_choice)


class RLHFKnobs(_Form):
    """Policy tuning against the reward model. Empty: params.yaml's."""

    algorithm: RLAlgorithm | None = _choice(
        "algorithm",
        "grpo or ppo (online: sample replies, score them with the reward model) or dpo (offline, on "
        "the preference pairs) (`rlhf.algorithm`)",
    )
    kl_coef: float | None = _like(
        RLHFParams, "kl_coef", "KL coefficient", "weight of the KL penalty to the SFT policy (`rlhf.kl_coef`)"
    )


class RegistryKnobs(_Form):
    """The registered model: its weights' dtype and the evaluation gates it must pass to become
    `champion` (else it is `candidate`). Empty: params.yaml's."""

    dtype: Dtype | None = _choice("weights dtype", "fp32 or bf16 weights in the registry (`registry.dtype`)")

    min_reward_gain: float | None = _like(
        Gates,
        "min_reward_gain",
        "min reward gain",
        "tuned policy's held-out mean reward minus the SFT policy's, at least",
    )
    max_val_bits_per_byte: float | None = _like(
        Gates,
        "max_val_bits_per_byte",
        "max val bits/byte",
        "tuned policy's validation bits per byte, at most",
    )
    min_reward_accuracy: float | None = _like(
        Gates,
        "min_reward_accuracy",
        "min reward-model accuracy",
        "reward model's accuracy on held-out preference pairs, at least",
    )
    min_end_of_turn_rate: float | None = _like(
        Gates,
        "min_end_of_turn_rate",
        "min end-of-turn rate",
        "share of held-out replies that end with <|end|>, at least",
    )


def form_overrides(
    *,
    steps: Steps | dict | None = None,
    learning_rates: LearningRates | dict | None = None,
    rlhf: RLHFKnobs | dict | None = None,
    registry: RegistryKnobs | dict | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The form as params keys (`{"pretrain.max_steps": 50, ...}`), empty fields left out.

    A key set both by a typed field and in `overrides` with different values is an error naming
    it; the result is validated later, with the rest of params.yaml, by `apply_overrides`.
    """
    steps = Steps.model_validate(steps or {})
    learning_rates = LearningRates.model_validate(learning_rates or {})
    rlhf = RLHFKnobs.model_validate(rlhf or {})
    registry = RegistryKnobs.model_validate(registry or {})
    typed: dict[str, Any] = {}
    for stage in TRAINING_STAGES:
        typed[f"{stage}.max_steps"] = getattr(steps, stage)
        typed[f"{stage}.lr"] = getattr(learning_rates, stage)
    typed.update({f"rlhf.{name}": getattr(rlhf, name) for name in RLHFKnobs.model_fields})
    for name in RegistryKnobs.model_fields:
        typed[f"registry.{name}" if name == "dtype" else f"registry.gates.{name}"] = getattr(registry, name)
    typed = {k: v for k, v in typed.items() if v is not None}
    free = {".".join(override_key(k)): v for k, v in (overrides or {}).items()}
    clashes = sorted(k for k in typed.keys() & free.keys() if typed[k] != free[k])
    if clashes:
        raise ParamsError(
            "set both as a form field and in overrides, with different values: "
            + ", ".join(f"{k} ({typed[k]!r} vs {free[k]!r})" for k in clashes)
        )
    return {**typed, **free}
