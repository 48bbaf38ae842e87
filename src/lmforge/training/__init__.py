"""The single training core reused by every stage (pretrain, SFT, reward, RLHF/DPO).

Depends only on torch, pytorch-lightning, numpy and the stdlib; stages are short recipes over
`TrainModule` subclasses, `TokenShardDataModule` (or their own datamodule) and `fit`.

The names below load on first use, so that `lmforge.training.config` (plain dataclasses, read by
the params layer for its defaults) imports without Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "EncodeStats": "chat_data",
    "PreferenceDataModule": "chat_data",
    "SFTDataModule": "chat_data",
    "SFTDataset": "chat_data",
    "collate_pairs": "chat_data",
    "collate_sft": "chat_data",
    "encode_pairs": "chat_data",
    "encode_sft": "chat_data",
    "OptimConfig": "config",
    "RLConfig": "config",
    "TrainerConfig": "config",
    "ShardInfo": "data",
    "TokenShardDataModule": "data",
    "load_shard": "data",
    "CausalLMModule": "module",
    "TrainModule": "module",
    "bits_per_byte": "module",
    "causal_lm_loss": "module",
    "build_optimizer": "optim",
    "param_groups": "optim",
    "warmup_cosine": "optim",
    "RewardModule": "reward",
    "bradley_terry_loss": "reward",
    "build_trainer": "trainer",
    "fit": "trainer",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'lmforge.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lmforge.training.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
