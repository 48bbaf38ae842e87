"""Direct Preference Optimisation (offline, on preference pairs) on the shared Lightning core.

A batch stacks B chosen rows, then B rejected rows::

    {"input_ids": [2B, T], "attention_mask": [2B, T], "response_mask": [2B, T] (optional)}

``response_mask`` marks the reply tokens whose log-probs count. Without it every real token
after the first counts: the shared prompt then contributes the same tokens to both rows of a
pair, and its terms cancel in the DPO margin (chosen - rejected) as long as both rows carry the
same prompt. This is the format of `chat_data.PreferenceDataModule` batches, whose
`encode_pairs` truncates both rows of a pair by the same number of prompt tokens so that the
prompts stay identical.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.training.config import OptimConfig
from lmforge.training.module import TrainModule
from lmforge.training.rl_losses import dpo_loss, model_attention_mask, token_logprobs


def default_response_mask(attention_mask: Tensor) -> Tensor:
    """Every real token except each row's first (which has no log-prob: nothing predicts it)."""
    m = attention_mask.long()
    return m * (m.cumsum(-1) > 1).long()


class DPOModule(TrainModule):
    """Sigmoid DPO of ``policy`` against a frozen copy of itself (or a given ``ref_model``)."""

    def __init__(
        self,
        policy: nn.Module,
        optim: OptimConfig,
        *,
        beta: float = 0.1,
        ref_model: nn.Module | None = None,
        compile_model: bool = False,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        if not beta > 0:
            raise ValueError(f"DPO beta must be > 0, got {beta}")
        super().__init__(
            policy, optim, compile_model=compile_model, hparams={"beta": beta, **(hparams or {})}
        )
        self.beta = beta
        # Frozen and never in the optimizer (build_optimizer only sees self.model).
        self.ref_model = copy.deepcopy(policy if ref_model is None else ref_model).requires_grad_(False)

    def sequence_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Summed log-prob of each row's response tokens [2B]."""
        ids, attn = batch["input_ids"], batch.get("attention_mask")
        resp = batch.get("response_mask")
        if resp is None:
            resp = default_response_mask(attn if attn is not None else torch.ones_like(ids))
        logits = model(ids, attention_mask=model_attention_mask(attn))
        return (token_logprobs(logits, ids) * resp[:, 1:].float()).sum(-1)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        n = batch["input_ids"].shape[0]
        if n % 2:
            raise ValueError(f"DPO batches stack chosen then rejected rows; got an odd row count {n}")
        policy = self.sequence_logps(self.model, batch)
        with torch.no_grad():
            self.ref_model.eval()  # the reference is a fixed function: no dropout
            ref = self.sequence_logps(self.ref_model, batch)
        b = n // 2
        loss, accuracy, margin = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], self.beta)
        metrics = {
            "accuracy": accuracy,
            "margin": margin,
            "chosen_reward": (self.beta * (policy[:b] - ref[:b])).detach().mean(),
            "rejected_reward": (self.beta * (policy[b:] - ref[b:])).detach().mean(),
        }
        return loss, metrics

    def tokens_in_batch(self, batch: dict[str, Tensor]) -> int:
        attn = batch.get("attention_mask")
        return int(attn.sum()) if attn is not None else int(batch["input_ids"].numel())

    def batch_weight(self, batch: dict[str, Tensor]) -> int:
        return int(batch["input_ids"].shape[0]) // 2  # pairs
