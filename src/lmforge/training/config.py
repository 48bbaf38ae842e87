"""Plain-dataclass configuration for the shared training core.

Kept free of pydantic so the core depends only on torch/lightning/numpy/stdlib;
the pipeline layer maps its validated configs onto these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

_PRECISIONS = {"auto", "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"}
_STRATEGIES = {"auto", "ddp", "fsdp", "ddp_spawn"}


@dataclass
class OptimConfig:
    """AdamW + warmup/cosine schedule hyperparameters."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 1000
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
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
    compile: bool = False
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
