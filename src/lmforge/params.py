"""Typed pipeline parameters: the one source of configuration.

`params.yaml` holds named presets (`tiny`, `small`, ...) and per-section overrides.
The effective value of a key is, by precedence:

    model defaults (here)  <  presets[<preset>]  <  top-level section in params.yaml  <  --set key=value

Unknown keys and wrong types are errors that name the key path. This module is the
pipeline edge (pydantic); the training core takes plain dataclasses built from it. The training
knobs are declared once, in the core's dataclasses (lmforge.knobs): the models here derive their
fields (default, bounds, description) from them and add only what the stages alone read.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from lmforge.knobs import knobs
from lmforge.model import GPTConfig
from lmforge.names import CANDIDATE, CHAMPION, MODEL_NAME
from lmforge.training.config import FSDP_REFUSED, OptimConfig, RLConfig, TrainerConfig

# Top-level scalar keys beside the sections: the run's one seed and the determinism switch.
RUN_KEYS = ("seed", "deterministic")
SECTIONS = ("ingest", "tokenizer", "model", "pretrain", "sft", "reward", "rlhf", "evaluate", "registry")


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """One input: a local file or a Hugging Face dataset name."""

    path: str | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    format: Literal["auto", "txt", "jsonl", "json", "parquet", "csv"] = "auto"
    # Shape of each record. text: `text_field`; messages: a list of {role, content};
    # alpaca: instruction/input/output; preference: prompt/chosen/rejected;
    # alpaca_preference: instruction/input + chosen/rejected; hh: Anthropic HH "\n\nHuman:" dialogues;
    # qa: question/answer (one user turn, one reply: GSM8K).
    schema_: Literal["text", "messages", "alpaca", "preference", "alpaca_preference", "hh", "qa"] = Field(
        "text", alias="schema"
    )
    text_field: str = "text"
    messages_field: str = "messages"
    # How a plain-text file is cut into documents.
    split_on: Literal["line", "blank_line", "file"] = "blank_line"
    # blank_line only: consecutive paragraphs are joined, with the blank lines between them, until a
    # document holds at least this many characters (0: one paragraph per document). Pretraining then
    # sees the text's own separators (a blank line between speeches) instead of a <|bos|> per paragraph.
    doc_chars: int = Field(0, ge=0)
    name: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_origin(self) -> SourceSpec:
        if (self.path is None) == (self.hf_dataset is None):
            raise ValueError("give exactly one of `path` or `hf_dataset`")
        if self.doc_chars and self.split_on != "blank_line":
            raise ValueError(
                f"`doc_chars` groups blank-line paragraphs; it needs split_on: blank_line, not {self.split_on}"
            )
        return self

    @property
    def label(self) -> str:
        return self.name or self.path or self.hf_dataset or "?"


class IngestParams(_Strict):
    mode: Literal["strict", "lenient"] = "strict"
    text_sources: list[SourceSpec] = Field(default_factory=list)
    sft_sources: list[SourceSpec] = Field(default_factory=list)
    preference_sources: list[SourceSpec] = Field(default_factory=list)
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(1_000_000, ge=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_salt: str = "lmforge"
    out_dir: str = "data/processed"


class TokenizerParams(_Strict):
    vocab_size: int = Field(4096, ge=300, le=1 << 20)
    min_frequency: int = Field(2, ge=1)
    # Dialogue text (SFT replies) mixed into tokenizer training so chat text tokenizes well.
    include_dialogues: bool = True
    # Tokenizer training input: at most this many UTF-8 bytes, a deterministic sample of whole
    # documents (chosen by a hash of their content, kept in corpus order); None: all of it.
    max_train_bytes: int | None = Field(None, ge=1)
    # Processes that encode the shards; None: the CPU cores this process may use.
    # The shards are byte-identical for any value.
    num_proc: int | None = Field(None, ge=1)
    # Most tokens per shard file: a split larger than this goes to several files, documents whole
    # (a longer document gets a file of its own). A split in one file keeps the name <split>.bin.
    shard_tokens: int = Field(1 << 28, ge=1)
    out_dir: str = "data/tokenizer"
    shards_dir: str = "data/tokens"


def _constrained(tp: Any, bounds: dict[str, float]) -> tuple[Any, dict[str, float]]:
    """The annotation and Field bounds for a knob: bounds go on the Field when the knob is one number
    type (or one and None); in a union with choices they wrap the number member."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    numbers = [m for m in members if m in (int, float)]
    if not bounds or len([m for m in members if m is not type(None)]) == 1:
        return tp, bounds
    wrapped = tuple(Annotated[m, Field(**bounds)] if m in numbers else m for m in members)
    return typing.Union[wrapped], {}  # noqa: UP007 (a tuple of members)


def derived(core: type, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Params fields (annotation, Field) from the knobs of a core config dataclass: its default,
    bounds and description, declared once there (lmforge.knobs)."""
    out: dict[str, Any] = {}
    for k in knobs(core).values():
        if k.name in exclude:
            continue
        tp, bounds = _constrained(k.type, k.bounds)
        out[k.name] = (tp, Field(k.default, description=k.doc, **bounds))
    return out


def restated(model: type[BaseModel], name: str, default: Any) -> Any:
    """``model.name``'s field (bounds, description) with another default, for a stage that starts elsewhere."""
    info = copy.copy(model.model_fields[name])
    info.default = default
    return info


ModelParams = create_model(
    "ModelParams",
    __base__=_Strict,
    __doc__="The model's shape (lmforge.model.GPTConfig; the vocabulary comes from the tokenizer).",
    **derived(GPTConfig, exclude=("vocab_size",)),
)

_TrainKnobs = create_model(
    "_TrainKnobs",
    __base__=_Strict,
    **derived(OptimConfig),
    **derived(TrainerConfig, exclude=("max_steps", "seed", "deterministic", "enable_progress_bar")),
)


class TrainParams(_TrainKnobs):
    """Shared by every training stage (pretrain, sft, reward, rlhf): the optimizer and trainer knobs
    of the core (OptimConfig, TrainerConfig) plus the stage's own."""

    batch_size: int = Field(32, ge=1, description="sequences per micro-batch")
    compile: bool = Field(False, description="torch.compile the model")
    # Continue an interrupted run (killed, crashed) from its last good checkpoint when the stage's
    # inputs and parameters are unchanged; false always starts afresh.
    resume: bool = Field(True, description="continue an interrupted run from its last good checkpoint")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["ROMEO:", "The king"],
        description="prompts sampled after training, for a person",
    )
    sample_tokens: int = Field(64, ge=1, description="tokens sampled per prompt")
    out_dir: str = Field("models/pretrain", description="where the stage writes its model folder")

    @field_validator("strategy", mode="before")
    @classmethod
    def _not_fsdp(cls, value: Any) -> Any:
        if value == "fsdp":
            raise ValueError(FSDP_REFUSED)
        return value


class PretrainParams(TrainParams):
    """Pretraining on the token shards."""

    # One optimizer step's tokens over every process. Set, it decides accumulate_grad_batches from the
    # micro-batch, the context and the number of processes, so 1, 2 or 8 GPUs train the same model.
    global_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens per optimizer step over all processes (derives accumulate_grad_batches); "
        "unset: batch_size x block_size x accumulate_grad_batches x processes",
    )

    # The raw-text figure (`raw_val_bits_per_byte`) scores the val documents joined by a blank line,
    # as one stream without special tokens; at most this many UTF-8 bytes of them (whole documents).
    raw_val_max_bytes: int = Field(
        2_000_000, ge=1, description="UTF-8 bytes of val documents scored for raw_val_bits_per_byte"
    )


class SFTParams(TrainParams):
    """Supervised fine-tuning on chat-rendered dialogues; loss on assistant tokens only."""

    init_from: str = Field("models/pretrain", description="the model folder fine-tuning starts from")
    pack: bool = Field(True, description="several conversations per window, kept apart by segment masks")
    lr: float = restated(TrainParams, "lr", 1e-3)
    warmup_steps: int = restated(TrainParams, "warmup_steps", 20)
    max_steps: int = restated(TrainParams, "max_steps", 300)
    eval_prompts: int = Field(64, ge=1, description="held-out prompts sampled for the end-of-turn rate")
    sample_prompts: list[str] = Field(
        default_factory=lambda: [
            "Rewrite the sentence in passive voice.\n\nThe cat chased the mouse.",
            "What is the capital of France?",
        ],
        description="chat prompts answered after training, for a person",
    )
    out_dir: str = restated(TrainParams, "out_dir", "models/sft")


class RewardParams(TrainParams):
    """Reward model: SFT backbone + scalar head, pairwise Bradley-Terry loss."""

    init_from: str = Field("models/sft", description="the model folder the reward model starts from")
    lr: float = restated(TrainParams, "lr", 5e-4)
    warmup_steps: int = restated(TrainParams, "warmup_steps", 20)
    max_steps: int = restated(TrainParams, "max_steps", 300)
    out_dir: str = restated(TrainParams, "out_dir", "models/reward")


_RLHFKnobs = create_model("_RLHFKnobs", __base__=TrainParams, **derived(RLConfig, exclude=("seed",)))


class RLHFParams(_RLHFKnobs):
    """Policy optimization against the frozen reward model (ppo, grpo) or on the pairs (dpo): the
    core's RLConfig knobs plus the stage's own."""

    init_from: str = Field("models/sft", description="the policy's starting model folder")
    reward_from: str = Field("models/reward", description="the reward model's folder")
    lr: float = restated(TrainParams, "lr", 1e-4)
    warmup_steps: int = restated(TrainParams, "warmup_steps", 5)
    max_steps: int = restated(TrainParams, "max_steps", 60)
    reward: Literal["model", "verifier", "mix"] = Field(
        "model",
        description="ppo/grpo: what scores a rollout: the reward model; a program checking the verifiable "
        "task's answers (prompts: the task's); or mix (the task's prompts checked, the others scored by the model)",
    )
    dpo_beta: float = Field(0.1, gt=0, description="dpo: strength of the implicit KL to the reference")
    eval_prompts: int = Field(64, ge=1, description="held-out prompts for the reward gain and KL")
    out_dir: str = restated(TrainParams, "out_dir", "models/rlhf")


class EvaluateParams(_Strict):
    """One report over base, SFT and tuned models."""

    eval_prompts: int = Field(64, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.0, ge=0)  # 0: greedy, so the report is deterministic
    report: str = "reports/evaluate.md"
    harness_tasks: list[
        Literal["lmforge_preference", "lmforge_val_text", "lmforge_reverse", "lmforge_gsm8k"]
    ] = Field(
        ["lmforge_preference", "lmforge_val_text", "lmforge_reverse"],
        description="lm-evaluation-harness tasks run on each model (src/lmforge/harness/tasks); [] skips the harness",
    )


class Gates(_Strict):
    """Absolute floors (sanity gates): every version must pass them, and they alone judge the first.
    The defaults come from the tiny chain's seed noise (benchmarks/eval_noise.py, docs/benchmarks.md)."""

    min_reward_gain: float = Field(
        -1.0,
        description="tuned policy's held-out mean reward minus the SFT policy's (its own reward model); "
        "below 0 by about the figure's seed noise",
    )
    max_val_bits_per_byte: float = Field(2.6, gt=0, description="the tuned model's val bits per byte")
    min_reward_accuracy: float = Field(
        0.7, ge=0, le=1, description="the reward model's held-out pair accuracy"
    )
    min_end_of_turn_rate: float = Field(
        0.75, ge=0, le=1, description="share of held-out replies ending with <|end|>"
    )


JudgedFigure = Literal[
    "val_bits_per_byte", "val_text_bits_per_byte", "assistant_loss", "end_of_turn_rate", "task_accuracy"
]  # names.FIXED_JUDGE


class Promotion(_Strict):
    """Against the champion: the candidate and the champion (re-scored with today's evaluation code
    and data) on the same held-out items, compared item by item (paired bootstrap), on figures a
    fixed judge scores (the held-out data, never a version's own reward model)."""

    compare_with_champion: bool = Field(
        True, description="compare with the champion before moving its alias (off: the absolute gates alone)"
    )
    alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level of each paired test (two-sided)")
    primary: JudgedFigure = Field(
        "task_accuracy",
        description="the figure a candidate must improve significantly to replace the champion",
    )
    guarded: list[JudgedFigure] = Field(
        default_factory=lambda: [
            "val_bits_per_byte",
            "val_text_bits_per_byte",
            "assistant_loss",
            "end_of_turn_rate",
            "task_accuracy",
        ],
        description="figures no candidate may make significantly worse",
    )


class RegisterParams(_Strict):
    model_name: str = Field(MODEL_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    dtype: Literal["fp32", "bf16"] = "fp32"
    gates: Gates = Field(default_factory=Gates)
    promotion: Promotion = Field(default_factory=Promotion)
    champion_alias: str = CHAMPION
    candidate_alias: str = CANDIDATE


class Params(_Strict):
    preset: str
    # The one seed of a run; each stage draws from `stage_seed(stage)` derived from it.
    seed: int = Field(1337, ge=0)
    # Deterministic kernels (torch.use_deterministic_algorithms) so a run repeats bitwise.
    deterministic: bool = True
    ingest: IngestParams
    tokenizer: TokenizerParams
    model: ModelParams
    pretrain: PretrainParams
    sft: SFTParams
    reward: RewardParams
    rlhf: RLHFParams
    evaluate: EvaluateParams
    registry: RegisterParams

    def section(self, name: str) -> BaseModel:
        return getattr(self, name)

    def stage_seed(self, stage: str) -> int:
        """The seed of one stage: sha256 of the run seed and the stage name (lmforge.seeding)."""
        from lmforge.seeding import derive_seed

        return derive_seed(self.seed, stage)


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`pretrain.max_steps=50` -> (['pretrain', 'max_steps'], 50); the value is parsed as YAML."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return override_key(key), yaml.safe_load(raw) if raw.strip() else None


def override_key(key: Any) -> list[str]:
    """`"pretrain.max_steps"` -> `["pretrain", "max_steps"]`; `preset`, `seed`, `deterministic` stand alone."""
    if not isinstance(key, str) or not key.strip():
        raise ParamsError(f"override key {key!r} must be a string like section.key")
    parts = key.strip().split(".")
    if len(parts) == 1 and parts[0] in ("preset", *RUN_KEYS):
        return parts
    if len(parts) < 2 or not all(parts):
        raise ParamsError(f"override key {key!r} must be section.key (for example pretrain.max_steps)")
    return parts


def _set_path(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"cannot set {'.'.join(parts)}: {part} is not a section")
    node[parts[-1]] = value


def _format_validation(err: ValidationError, origin: str) -> str:
    lines = [f"invalid parameters in {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def resolve(
    raw: dict, overrides: list[str] | dict[str, Any] | None = None, origin: str = "params.yaml"
) -> Params:
    """Apply preset, sections and overrides to a raw params mapping and validate it."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: top level must be a mapping")
    unknown = set(raw) - {"preset", "presets", *RUN_KEYS, *SECTIONS}
    if unknown:
        raise ParamsError(f"{origin}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    presets = raw.get("presets") or {}
    tree: dict[str, Any] = {"preset": raw.get("preset", "tiny")}
    tree.update({key: raw[key] for key in RUN_KEYS if key in raw})
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for parts, value in ((k.split(".") if isinstance(k, str) else k, v) for k, v in items):
        if parts == ["preset"]:
            tree["preset"] = value
    name = tree["preset"]
    if name not in presets:
        raise ParamsError(f"{origin}: preset {name!r} is not defined (known: {', '.join(sorted(presets))})")
    for section in SECTIONS:
        tree[section] = _deep_merge(presets[name].get(section) or {}, raw.get(section) or {})
    bad = set(presets[name]) - set(SECTIONS)
    if bad:
        raise ParamsError(f"{origin}: presets.{name} has unknown section(s): {', '.join(sorted(bad))}")
    for parts, value in ((k.split(".") if isinstance(k, str) else k, v) for k, v in items):
        if parts == ["preset"]:
            continue
        if len(parts) == 1 and parts[0] in RUN_KEYS:
            tree[parts[0]] = value
            continue
        if parts[0] not in SECTIONS:
            raise ParamsError(f"override {'.'.join(parts)}: unknown section {parts[0]!r}")
        _set_path(tree, parts, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ParamsError(_format_validation(err, origin)) from None


def load_params(
    path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] | None = None
) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return resolve(raw or {}, overrides, origin=str(path))
