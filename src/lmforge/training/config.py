"""Plain-dataclass configuration for the shared training core.

Kept free of pydantic so the core depends only on torch/lightning/numpy/stdlib;
the pipeline layer maps its validated configs onto these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

KLKind = Literal["k1", "k2", "k3"]  # KL estimators (Schulman): log-ratio, squared, unbiased positive

_PRECISIONS = {"auto", "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"}
_STRATEGIES = {"auto", "ddp", "fsdp", "ddp_spawn"}


OptimizerKind = Literal["adamw", "muon"]
ScheduleKind = Literal["cosine", "wsd"]


@dataclass
class OptimConfig:
    """Optimizer (AdamW, or Muon for the hidden matrices + AdamW for the rest) and LR schedule.

    `schedule`: "cosine" warms up linearly, then decays along a cosine to `min_lr_ratio` at
    `max_steps`; "wsd" (warmup-stable-decay) holds the peak after warmup and decays linearly to
    `min_lr_ratio` over the last `cooldown_frac` of the steps. `muon_lr` is Muon's peak learning rate
    (scaled per matrix by sqrt(max(1, rows/cols)), Muon's own rule); the schedule multiplies both.
    """

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 1000
    grad_clip: float = 1.0
    optimizer: OptimizerKind = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    schedule: ScheduleKind = "cosine"
    cooldown_frac: float = 0.4

    def __post_init__(self) -> None:
        if self.optimizer not in get_args(OptimizerKind):
            raise ValueError(
                f"OptimConfig.optimizer must be {'|'.join(get_args(OptimizerKind))}, got {self.optimizer!r}"
            )
        if self.schedule not in get_args(ScheduleKind):
            raise ValueError(
                f"OptimConfig.schedule must be {'|'.join(get_args(ScheduleKind))}, got {self.schedule!r}"
            )
        if not self.muon_lr > 0:
            raise ValueError(f"OptimConfig.muon_lr must be > 0, got {self.muon_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"OptimConfig.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0.0 < self.cooldown_frac <= 1.0:
            raise ValueError(f"OptimConfig.cooldown_frac must be in (0, 1], got {self.cooldown_frac}")
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"OptimConfig.{name} must be in [0, 1), got {v}")
        if not self.eps > 0:
            raise ValueError(f"OptimConfig.eps must be > 0, got {self.eps}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_steps < 1:
            raise ValueError(f"OptimConfig.max_steps must be >= 1, got {self.max_steps}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"OptimConfig.warmup_steps ({self.warmup_steps}) must be <= max_steps ({self.max_steps})"
            )
        if self.grad_clip < 0:
            raise ValueError(f"OptimConfig.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainerConfig:
    """Everything `build_trainer` needs to construct a Lightning Trainer."""

    max_steps: int
    accumulate_grad_batches: int = 1
    val_every_steps: int = 100
    val_batches: int = 20
    log_every_steps: int = 10
    checkpoint_every_steps: int = 200
    precision: str = "auto"  # "auto" => bf16-mixed on cuda, 32-true on cpu
    accelerator: str = "auto"
    devices: str | int = "auto"
    strategy: str = "auto"  # "auto" | "ddp" | "fsdp"
    num_nodes: int = 1
    seed: int = 1337
    deterministic: bool = False
    enable_progress_bar: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "accumulate_grad_batches", "log_every_steps", "num_nodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainerConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("val_every_steps", "val_batches", "checkpoint_every_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainerConfig.{name} must be an int >= 0 (0 disables), got {v!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(
                f"TrainerConfig.precision must be one of {sorted(_PRECISIONS)}, got {self.precision!r}"
            )
        if self.strategy not in _STRATEGIES:
            raise ValueError(
                f"TrainerConfig.strategy must be one of {sorted(_STRATEGIES)}, got {self.strategy!r}"
            )
        if isinstance(self.devices, bool) or not (
            self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1)
        ):
            raise ValueError(f"TrainerConfig.devices must be 'auto' or an int >= 1, got {self.devices!r}")
        if not isinstance(self.accelerator, str) or not self.accelerator:
            raise ValueError(
                f"TrainerConfig.accelerator must be a non-empty string, got {self.accelerator!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RLConfig:
    """Rollout, reward shaping and PPO/GRPO update hyperparameters (see the module docstring)."""

    algorithm: Literal["ppo", "grpo"] = "grpo"
    rollout_batch_size: int = 8  # prompts per step
    group_size: int = 4  # GRPO: samples per prompt (>= 2); PPO samples one reply per prompt
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int | None = None
    kl_coef: float = 0.05
    kl_estimator: KLKind = "k1"  # PPO reward shaping and the reported rl/kl
    kl_max: float | None = 10.0  # stop training once the mean per-token KL exceeds this
    ppo_epochs: int = 2
    clip_ratio: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    normalize_rewards: bool = True  # PPO: running mean/std of scores (GRPO is group-normalised)
    reward_clip: float | None = 5.0
    # Subtracted from the score of a reply that hit max_new_tokens without the end-of-turn token:
    # without it a reward model that likes longer text teaches the policy never to stop.
    missing_eos_penalty: float = 4.0
    whiten_advantages: bool = True  # PPO only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ("ppo", "grpo") or self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError("RLConfig.algorithm must be ppo|grpo and kl_estimator k1|k2|k3")
        for name in ("rollout_batch_size", "group_size", "max_new_tokens", "ppo_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ValueError("RLConfig.group_size must be >= 2 for GRPO (advantages are group-relative)")
        if not self.temperature > 0:
            raise ValueError("RLConfig.temperature must be > 0: RL needs sampled, not greedy, rollouts")
        if self.kl_coef < 0 or not 0 < self.clip_ratio < 1 or self.value_clip <= 0:
            raise ValueError("RLConfig needs kl_coef >= 0, 0 < clip_ratio < 1 and value_clip > 0")

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
