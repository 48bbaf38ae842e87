"""A GPT backbone with a scalar head: the reward model (and the PPO value model).

The reward of a sequence is the head read at its last real (non-pad) token: the only
position whose causal context covers the whole prompt and reply.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.model import GPT


class ScalarHeadModel(nn.Module):
    """`forward(input_ids, attention_mask) -> [B]` scalars; `values(...) -> [B, T]` per position."""

    def __init__(self, backbone: GPT) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.head = nn.Linear(backbone.config.n_embd, 1, bias=True)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def values(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The head at every position [B, T] (PPO's value estimates)."""
        hidden = self.backbone.hidden_states(input_ids, attention_mask=attention_mask)
        return self.head(hidden).squeeze(-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """One scalar per sequence [B], read at the last non-pad token (right or left padding)."""
        values = self.values(input_ids, attention_mask)
        if attention_mask is None:
            return values[:, -1]
        mask = attention_mask.to(device=values.device, dtype=torch.long)
        # Index of the last 1 in each row, whether the padding is on the left or the right.
        positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
        return values.gather(1, last.clamp(min=0)[:, None]).squeeze(1)
