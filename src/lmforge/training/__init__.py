"""The single training core reused by every stage (pretrain, SFT, reward, RLHF/DPO).

Depends only on torch, lightning, numpy and the stdlib; stages are short recipes over
`TrainModule` subclasses, `TokenShardDataModule` (or their own datamodule) and `fit`.
"""

from lmforge.training.chat_data import (
    EncodeStats,
    PreferenceDataModule,
    SFTDataModule,
    SFTDataset,
    collate_pairs,
    collate_sft,
    encode_pairs,
    encode_sft,
)
from lmforge.training.config import OptimConfig, TrainerConfig
from lmforge.training.data import ShardInfo, TokenShardDataModule, load_shard
from lmforge.training.module import CausalLMModule, TrainModule, bits_per_byte, causal_lm_loss
from lmforge.training.optim import build_optimizer, param_groups, warmup_cosine
from lmforge.training.reward import RewardModule, bradley_terry_loss
from lmforge.training.trainer import build_trainer, export_weights, fit, load_weights

__all__ = [
    "CausalLMModule",
    "EncodeStats",
    "OptimConfig",
    "PreferenceDataModule",
    "RewardModule",
    "SFTDataModule",
    "SFTDataset",
    "ShardInfo",
    "TokenShardDataModule",
    "TrainModule",
    "TrainerConfig",
    "bits_per_byte",
    "bradley_terry_loss",
    "build_optimizer",
    "build_trainer",
    "causal_lm_loss",
    "collate_pairs",
    "collate_sft",
    "encode_pairs",
    "encode_sft",
    "export_weights",
    "fit",
    "load_shard",
    "load_weights",
    "param_groups",
    "warmup_cosine",
]
