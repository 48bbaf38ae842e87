"""Plain-dataclass configuration for the shared training core: every knob declared once.

Each field is a :func:`lmforge.knobs.knob` (default, bounds, description); the choices are its
``Literal`` type. The core checks its configs against those declarations, and the pipeline's params
models (:mod:`lmforge.params`) are derived from them, so a knob's default, bound and description
are written here and nowhere else. Free of pydantic: the core depends only on
torch/lightning/numpy/stdlib.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from lmforge.knobs import check, knob

KLKind = Literal["k1", "k2", "k3"]  # KL estimators (Schulman): log-ratio, squared, unbiased positive
OptimizerKind = Literal["adamw", "muon"]
ScheduleKind = Literal["cosine", "wsd"]
Precision = Literal["auto", "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"]
MatmulPrecision = Literal["highest", "high", "medium"]
Strategy = Literal["auto", "ddp", "ddp_spawn"]
# Why FSDP is not among the strategies (issue 25): said whenever a config or params names it.
FSDP_REFUSED = (
    "strategy 'fsdp' is not offered: FSDP shards every weight matrix across the processes, while Muon "
    "(optimizer: muon) orthogonalises whole matrices, and the checkpoints, the evaluation after training "
    "and the model export each read the whole model in one process. Every preset's model, with its "
    "optimizer state, fits in one GPU's memory, where DDP keeps a whole copy per GPU and is faster: use "
    "strategy: ddp"
)
RLAlgorithm = Literal["ppo", "grpo", "dpo"]


@dataclass
class OptimConfig:
    """Optimizer (AdamW, or Muon for the hidden matrices + AdamW for the rest) and LR schedule.

    `schedule`: "cosine" warms up linearly, then decays along a cosine to `min_lr_ratio` at
    `max_steps`; "wsd" (warmup-stable-decay) holds the peak after warmup and decays linearly to
    `min_lr_ratio` over the last `cooldown_frac` of the steps. `muon_lr` is Muon's peak learning rate
    (scaled per matrix by sqrt(max(1, rows/cols)), Muon's own rule); the schedule multiplies both.
    """

    lr: float = knob(
        3e-4, gt=0, doc="peak learning rate (AdamW's; under Muon, that of the non-matrix weights)"
    )
    min_lr_ratio: float = knob(0.1, ge=0, le=1, doc="the schedule's end, as a fraction of the peak")
    weight_decay: float = knob(0.1, ge=0, doc="AdamW's decoupled weight decay")
    beta1: float = knob(0.9, ge=0, lt=1, doc="Adam's first-moment decay")
    beta2: float = knob(0.95, ge=0, lt=1, doc="Adam's second-moment decay")
    eps: float = knob(1e-8, gt=0, doc="Adam's epsilon")
    warmup_steps: int = knob(100, ge=0, doc="steps of linear warmup (at most max_steps)")
    max_steps: int = knob(1000, ge=1, doc="optimizer steps of the stage")
    grad_clip: float = knob(1.0, ge=0, doc="clip the gradient's global norm to this (0: no clipping)")
    optimizer: OptimizerKind = knob(
        "adamw", doc="adamw, or muon: Muon for the hidden matrices (peak lr muon_lr), AdamW (lr) for the rest"
    )
    muon_lr: float = knob(0.02, gt=0, doc="Muon's peak learning rate")
    muon_momentum: float = knob(0.95, ge=0, lt=1, doc="Muon's momentum")
    schedule: ScheduleKind = knob(
        "cosine",
        doc="cosine: warmup then cosine decay; wsd: warmup, flat, linear decay over the last cooldown_frac",
    )
    cooldown_frac: float = knob(0.4, gt=0, le=1, doc="wsd: the fraction of the steps spent decaying")

    def __post_init__(self) -> None:
        check(self)
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"OptimConfig.warmup_steps ({self.warmup_steps}) must be <= max_steps ({self.max_steps})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainerConfig:
    """Everything `build_trainer` needs to construct a Lightning Trainer."""

    max_steps: int = knob(doc="optimizer steps (Lightning's max_steps)", ge=1)
    accumulate_grad_batches: int = knob(1, ge=1, doc="micro-batches per optimizer step")
    val_every_steps: int = knob(100, ge=0, doc="validate every this many optimizer steps (0: never)")
    val_batches: int = knob(20, ge=0, doc="batches per validation (0: none)")
    log_every_steps: int = knob(10, ge=1, doc="log the training metrics every this many steps")
    checkpoint_every_steps: int = knob(
        200, ge=0, doc="save a resumable checkpoint every this many steps (0: never)"
    )
    precision: Precision = knob("auto", doc="Lightning precision; auto: bf16-mixed on cuda, 32-true on cpu")
    matmul_precision: MatmulPrecision = knob(
        "high",
        doc="fp32 matmuls on CUDA (torch.set_float32_matmul_precision): high lets them use TF32 tensor "
        "cores, highest keeps full fp32; the CPU's are left as they are",
    )
    accelerator: str = knob("auto", doc="Lightning accelerator: auto, cpu, gpu, cuda, mps")
    devices: int | Literal["auto"] = knob("auto", ge=1, doc="devices per node, or auto (all visible)")
    strategy: Strategy = knob("auto", doc="auto or ddp (ddp_spawn for notebooks); not fsdp, see FSDP_REFUSED")
    num_nodes: int = knob(1, ge=1, doc="machines taking part (multi-node DDP)")
    seed: int = knob(1337, ge=0, doc="the stage's seed (derived from the run's seed)")
    deterministic: bool = knob(False, doc="deterministic kernels, so a run repeats bitwise")
    enable_progress_bar: bool = knob(True, doc="Lightning's progress bar")

    def __post_init__(self) -> None:
        if self.strategy == "fsdp":
            raise ValueError(f"TrainerConfig.{FSDP_REFUSED}")
        check(self)
        if not self.accelerator:
            raise ValueError("TrainerConfig.accelerator must be a non-empty string, got ''")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RLConfig:
    """Rollout, reward shaping and PPO/GRPO update hyperparameters (see training.policy_rl)."""

    algorithm: RLAlgorithm = knob(
        "grpo",
        doc="grpo or ppo (online: sample replies, score them with the reward model) or dpo (offline, on "
        "the preference pairs, training.dpo: no rollouts)",
    )
    rollout_batch_size: int = knob(8, ge=1, doc="prompts per rollout batch")
    group_size: int = knob(4, ge=2, doc="GRPO: replies sampled per prompt (PPO samples one)")
    max_new_tokens: int = knob(48, ge=1, doc="longest sampled reply, in tokens")
    temperature: float = knob(1.0, gt=0, doc="sampling temperature of the rollouts (> 0: RL needs sampling)")
    top_k: int | None = knob(None, ge=1, doc="sample among the k likeliest tokens (None: all)")
    kl_coef: float = knob(0.05, ge=0, doc="weight of the KL penalty to the reference policy")
    kl_estimator: KLKind = knob(
        "k1", doc="KL estimator for PPO's reward shaping and the reported rl/kl (Schulman)"
    )
    kl_max: float | None = knob(
        10.0, gt=0, doc="stop training once the mean per-token KL exceeds this (None: never)"
    )
    ppo_epochs: int = knob(2, ge=1, doc="optimizer steps per rollout batch")
    clip_ratio: float = knob(0.2, gt=0, lt=1, doc="PPO's clip of the probability ratio")
    value_clip: float = knob(0.2, gt=0, doc="PPO: clip of the value update")
    gamma: float = knob(1.0, gt=0, le=1, doc="PPO: discount")
    lam: float = knob(0.95, ge=0, le=1, doc="PPO: GAE lambda")
    vf_coef: float = knob(0.5, ge=0, doc="PPO: weight of the value loss")
    normalize_rewards: bool = knob(True, doc="PPO: running mean/std of scores (GRPO is group-normalised)")
    reward_clip: float | None = knob(5.0, gt=0, doc="clip normalised scores to +-this (None: no clip)")
    # Without it a reward model that likes longer text teaches the policy never to stop.
    missing_eos_penalty: float = knob(
        4.0, ge=0, doc="subtracted from the score of a reply cut off at max_new_tokens without <|end|>"
    )
    whiten_advantages: bool = knob(True, doc="PPO: whiten the advantages of each batch")
    seed: int = knob(0, ge=0, doc="the rollouts' seed (the stage's)")

    def __post_init__(self) -> None:
        check(self)

    @property
    def samples_per_prompt(self) -> int:
        """Replies sampled per prompt: a group for GRPO, one for PPO."""
        return self.group_size if self.algorithm == "grpo" else 1

    # Params and checkpoints count rollout batches; Lightning counts optimizer steps, and every
    # rollout batch makes `ppo_epochs` of them. These two are the only places that convert.
    def optimizer_steps(self, rollouts: int) -> int:
        """Optimizer steps that `rollouts` rollout batches make."""
        return rollouts * self.ppo_epochs

    def rollouts_done(self, optimizer_steps: int) -> int:
        """Rollout batches finished after `optimizer_steps` optimizer steps (a resume's position)."""
        return optimizer_steps // self.ppo_epochs
