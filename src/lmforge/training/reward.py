"""Reward-model training: a Bradley-Terry loss over (chosen, rejected) pairs.

Batches come from `PreferenceDataModule`: ``input_ids`` / ``attention_mask`` [2B, T] with
the B chosen rows first and the B rejected rows after them. The model (a
`lmforge.heads.ScalarHeadModel`) scores each row at its last real token; the loss is
``-log sigmoid(r_chosen - r_rejected)``, the negative log-likelihood that the chosen reply
wins under the Bradley-Terry model.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lmforge.training.module import TrainModule


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """mean(-logsigmoid(r_chosen - r_rejected)); logsigmoid keeps large margins finite."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


class RewardModule(TrainModule):
    """Trains a scalar-head model to rank chosen replies above rejected ones.

    Logs ``loss``, ``accuracy`` (share of pairs with r_chosen > r_rejected) and ``margin``
    (mean r_chosen - r_rejected) under train/ and val/.
    """

    def split_rewards(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(r_chosen [B], r_rejected [B]) from one forward over the stacked [2B, T] batch."""
        ids = batch["input_ids"]
        if ids.size(0) % 2:
            raise ValueError(f"preference batch needs 2B rows (chosen then rejected), got {ids.size(0)}")
        rewards = self.model(ids, batch.get("attention_mask"))
        r_chosen, r_rejected = rewards.chunk(2)
        return r_chosen, r_rejected

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        r_chosen, r_rejected = self.split_rewards(batch)
        loss = bradley_terry_loss(r_chosen, r_rejected)
        diff = (r_chosen - r_rejected).detach().float()
        return loss, {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}

    def tokens_in_batch(self, batch: dict[str, Tensor]) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    def batch_weight(self, batch: dict[str, Tensor]) -> int:
        # Epoch means weighted by pairs, matching the per-pair mean in the loss.
        return max(1, batch["input_ids"].size(0) // 2)
