"""Ragged id lists to rectangular tensors: the one place padding is written.

Rows are padded on the right: a causal model never lets a real token see the padding after it
(training, scoring, RL rollouts). Generation needs none: the engine's KV slots hold each row at its
own positions. Core only: torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad(
    rows: Sequence[Sequence[int]],
    value: int,
    length: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """[N, length] long tensor of `rows`, filled with `value` (length: the longest row).

    Built on the CPU and moved to `device` in one copy (None: it stays on the CPU).
    """
    width = max((len(r) for r in rows), default=0) if length is None else length
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out if device is None else out.to(device)


def attention_mask(
    rows: Sequence[Sequence[int]],
    length: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """1 where `pad(rows, ...)` holds a real token, 0 on padding."""
    return pad([[1] * len(r) for r in rows], 0, length, device=device)
