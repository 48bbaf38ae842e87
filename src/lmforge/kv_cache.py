"""The KV cache of generation: per-layer keys and values for independent sequences ("slots").

One class, used by the one decode loop (:mod:`lmforge.generation.engine`) through
:meth:`lmforge.model.GPT.forward_slots`. Training core: torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _layer_buffers(
    n_layer: int, shape: tuple[int, ...], device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[list[Tensor], list[Tensor]]:
    """Zeroed keys and values of one shape for every layer."""
    keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
    values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
    return keys, values


class SlotKVCache:
    """Keys/values for ``slots`` independent sequences, [slots, n_kv_head, max_len, head_dim] per layer.

    The serving engine's cache (continuous batching): each slot holds one request, and each row of a
    call writes at its own positions, so rows of different lengths share a decode step without
    padding. Positions past a row's length may hold stale values of an earlier request; attention
    never looks past a query's own position, so they are never read before being overwritten.
    """

    def __init__(
        self,
        n_layer: int,
        slots: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.keys, self.values = _layer_buffers(n_layer, (slots, n_kv_head, max_len, head_dim), device, dtype)
        self.slots, self.max_len = slots, max_len

    def rows(self, slots: Tensor | int, positions: Tensor, span: int) -> SlotView:
        """A view for one call: ``slots`` (an int n: the first n slots; or a [B] tensor of slot
        indices), ``positions`` [B, T] where each row's T new tokens go, ``span`` = 1 + the largest
        position (the keys attention looks at)."""
        if span > self.max_len:
            raise ValueError(f"SlotKVCache overflow: need {span} positions but max_len is {self.max_len}")
        return SlotView(self, slots, positions, span)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst`` (compaction)."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]


class SlotView:
    """What the attention layers see of a :class:`SlotKVCache` during one call."""

    def __init__(self, cache: SlotKVCache, slots: Tensor | int, positions: Tensor, span: int) -> None:
        self.cache, self.positions, self.span = cache, positions, span
        B = positions.shape[0]
        if isinstance(slots, int):
            self.index = torch.arange(slots, device=positions.device)[:, None]
            self.contiguous: slice | None = slice(0, slots)
        else:
            self.index, self.contiguous = slots[:, None], None
        if self.index.shape[0] != B:
            raise ValueError(f"{self.index.shape[0]} slots for {B} rows of positions")

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B, H, T, D] at each row's positions; return the rows' k/v up to ``span``.

        The cache keeps the weights' dtype; k/v computed under autocast (bf16 rollouts inside a
        bf16-mixed training step) are cast to it, as an index-put requires."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.index, :, self.positions] = k.transpose(1, 2).to(keys.dtype)
        values[self.index, :, self.positions] = v.transpose(1, 2).to(values.dtype)
        if self.contiguous is not None:
            return keys[self.contiguous, :, : self.span], values[self.contiguous, :, : self.span]
        rows = self.index[:, 0]
        return keys[rows, :, : self.span], values[rows, :, : self.span]
