"""Automatic prefix caching for the serving engine, after vLLM's: a prompt that starts with tokens
an earlier prompt already prefilled reuses their keys and values instead of computing them again.

The store holds KV **blocks** of ``block`` tokens. Block i of a prompt is keyed by a chained hash,
``key(i) = H(key(i-1), tokens of block i)``, so one key names the whole prefix up to the end of its
block: the keys and values at a position depend on every token before it, and two prompts share a
block only when they share everything up to it. ``H`` is BLAKE2b (128 bits): a prompt crafted to
collide with another's key (and so read KV computed from someone else's prompt) would need a
preimage attack, not just Python's tuple hash (vLLM moved to SHA-256 for the same reason).

Blocks live in one preallocated pool ``[capacity, n_layer, 2, n_kv_head, block, head_dim]`` in the
cache's dtype and device (allocated on the first insert), ``capacity`` = as many blocks as fit the
memory budget; an ``OrderedDict`` from key to pool index keeps them in least-recently-used order and
the oldest is evicted when a new one needs room. A prompt's blocks are touched last-block-first, so
its first blocks (the ones most prompts share: a system prompt) are the last to go.

Only full blocks are stored. Core module: torch and the standard library.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from lmforge.kv_cache import SlotKVCache

DEFAULT_BLOCK = 16
_ROOT = b"lmforge-prefix"


def block_keys(prompt: Sequence[int], block: int, n_blocks: int | None = None) -> list[bytes]:
    """The chained keys of the prompt's first ``n_blocks`` full blocks (default: all of them)."""
    full = len(prompt) // block
    n = full if n_blocks is None else min(n_blocks, full)
    keys, parent = [], _ROOT
    for i in range(n):
        tokens = array("q", prompt[i * block : (i + 1) * block]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """KV blocks of prompt prefixes, within ``budget_bytes`` (see the module docstring).

    ``lookup(prompt)`` finds the longest run of cached full blocks at the start of a prompt,
    ``load(blocks, cache, slot)`` copies them into a slot of a :class:`SlotKVCache`, and
    ``insert(prompt, cache, slot, length)`` copies a prefilled prompt's not yet cached full blocks
    out of its slot. ``blocks``, ``bytes`` (held now) and ``evictions`` describe the store; the hit
    counts are the engine's (``prefix_cache_*_tokens`` in its stats)."""

    def __init__(
        self,
        *,
        n_layer: int,
        n_kv_head: int,
        head_dim: int,
        budget_bytes: int,
        block: int = DEFAULT_BLOCK,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if block < 1 or budget_bytes < 0:
            raise ValueError("prefix cache: block must be >= 1 and the budget >= 0")
        self.block, self.n_layer = block, n_layer
        self.shape = (n_layer, 2, n_kv_head, block, head_dim)
        self.dtype, self.device = dtype, device
        self.block_bytes = (
            2 * n_layer * n_kv_head * block * head_dim * torch.empty((), dtype=dtype).element_size()
        )
        self.capacity = budget_bytes // self.block_bytes
        self._pool: Tensor | None = None  # allocated on the first insert
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> pool row; oldest first
        self._free: list[int] = list(range(self.capacity - 1, -1, -1))  # pop() takes row 0 first
        self.evictions = 0

    @classmethod
    def for_cache(cls, cache: SlotKVCache, *, budget_mb: float, block: int = DEFAULT_BLOCK) -> PrefixCache:
        """A store shaped for ``cache``'s layers, heads, dtype and device, within ``budget_mb`` MiB."""
        keys = cache.keys[0]
        return cls(
            n_layer=len(cache.keys),
            n_kv_head=keys.shape[1],
            head_dim=keys.shape[3],
            budget_bytes=int(budget_mb * 2**20),
            block=block,
            dtype=keys.dtype,
            device=keys.device,
        )

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def blocks(self) -> int:
        return len(self._index)

    @property
    def bytes(self) -> int:
        return len(self._index) * self.block_bytes

    # ---- reading --------------------------------------------------------------------------
    def lookup(self, prompt: Sequence[int], max_blocks: int | None = None) -> tuple[int, list[int]]:
        """``(n_tokens, blocks)``: the longest run of cached full blocks that starts the prompt (at
        most ``max_blocks``), as pool rows for :meth:`load`, and the tokens they cover. Touches
        them (least recently used order)."""
        rows: list[int] = []
        if not self._index:
            return 0, rows
        keys = block_keys(prompt, self.block, max_blocks)
        for key in keys:
            row = self._index.get(key)
            if row is None:
                break
            rows.append(row)
        self._touch(keys[: len(rows)])
        return len(rows) * self.block, rows

    def load(self, blocks: list[int], cache: SlotKVCache, slot: int) -> None:
        """Copy ``blocks`` (from :meth:`lookup`) into positions ``[0, len(blocks) * block)`` of ``slot``."""
        if not blocks:
            return
        assert self._pool is not None
        n = len(blocks) * self.block
        got = self._pool[torch.tensor(blocks, device=self._pool.device)]  # [m, L, 2, H, block, D]
        got = got.permute(1, 2, 3, 0, 4, 5)  # [L, 2, H, m, block, D]
        for layer in range(self.n_layer):
            kv = got[layer].reshape(2, got.shape[2], n, got.shape[-1])
            cache.keys[layer][slot, :, :n] = kv[0]
            cache.values[layer][slot, :, :n] = kv[1]

    # ---- writing --------------------------------------------------------------------------
    def insert(self, prompt: Sequence[int], cache: SlotKVCache, slot: int, length: int | None = None) -> int:
        """Store the full blocks of ``prompt`` whose keys and values sit in positions ``[0, length)``
        of ``slot`` (default: the whole prompt) and are not cached yet; returns how many were added.
        A prompt longer than the whole store keeps its first ``capacity`` blocks."""
        if not self.enabled:
            return 0
        upto = len(prompt) if length is None else min(length, len(prompt))
        n = min(upto // self.block, self.capacity)
        keys = block_keys(prompt, self.block, n)
        have = 0
        while have < n and keys[have] in self._index:
            have += 1
        if have == n:
            self._touch(keys)
            return 0
        # What the prompt has cached already is touched first: making room never evicts its own blocks
        # (at most n - 1 <= capacity - 1 of them sit at the newest end of the order).
        self._touch([k for k in keys if k in self._index])
        if self._pool is None:
            self._pool = torch.empty((self.capacity, *self.shape), dtype=self.dtype, device=self.device)
        rows, added = [], 0
        for key in keys[have:]:
            row = self._index.get(key)  # a later block may be cached while an earlier one was evicted
            if row is None:
                if not self._free:
                    _, old = self._index.popitem(last=False)
                    self._free.append(old)
                    self.evictions += 1
                row = self._free.pop()
                self._index[key] = row
                added += 1
            rows.append(row)
        self._copy_out(cache, slot, have, n, torch.tensor(rows, device=self._pool.device))
        self._touch(keys)
        return added

    def _copy_out(self, cache: SlotKVCache, slot: int, first: int, end: int, rows: Tensor) -> None:
        """Blocks ``first .. end-1`` of ``slot`` into pool rows ``rows``."""
        assert self._pool is not None
        B, m = self.block, end - first
        for layer in range(self.n_layer):
            for j, buf in enumerate((cache.keys[layer], cache.values[layer])):
                part = buf[slot, :, first * B : end * B]  # [H, m * block, D]
                part = part.reshape(part.shape[0], m, B, part.shape[-1]).transpose(0, 1)
                self._pool[rows, layer, j] = part

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a prompt's blocks used now, the last first: its first blocks end up the newest."""
        for key in reversed(keys):
            self._index.move_to_end(key)
