"""Chat data for supervised fine-tuning (SFT) and preference (reward model / DPO) training.

SFT examples are ``(ids, assistant_mask)`` from `ChatTokenizer.render_chat`, cut to
``block_size + 1`` tokens, then shifted: ``input_ids = ids[:-1]``, ``labels[t] = ids[t + 1]``
where token ``t + 1`` is the assistant's, else -100 (loss only on assistant tokens and their
closing <|end|>). Packing puts several shifted examples into one row of <= ``block_size``
tokens numbered by ``segment_ids`` (1, 2, ...; 0 = padding): shifting each example before
packing means no label points into the next segment, and the model's block-diagonal mask
keeps attention inside each segment.

Preference pairs render ``prompt + [assistant reply]`` for the chosen and the rejected reply;
a batch stacks the B chosen rows first, then the B rejected rows ([2B, T], right-padded).
Runtime imports: torch, lightning, stdlib only (ChatTokenizer is a type hint).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import pytorch_lightning as L
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lmforge.padding import attention_mask, pad
from lmforge.training.data import SeededBatches, consumed_batches, content_digest
from lmforge.training.module import IGNORE_INDEX

if TYPE_CHECKING:
    from lmforge.tokenizer import ChatTokenizer

Example = tuple[list[int], list[int]]  # (ids, assistant_mask) or (chosen_ids, rejected_ids)


@dataclass
class EncodeStats:
    """What encoding did to the raw data (log these: silent truncation hides data problems)."""

    total: int = 0
    truncated: int = 0  # cut to fit block_size (kept unless nothing learnable is left)
    dropped: int = 0  # SFT: no assistant token left after truncation; pairs: chosen == rejected

    @property
    def kept(self) -> int:
        return self.total - self.dropped

    @staticmethod
    def summary(train: EncodeStats, val: EncodeStats) -> dict[str, int]:
        """What a stage reports of its encoded train and val data (kept per split, and the losses)."""
        return {
            "train": train.kept,
            "val": val.kept,
            "truncated": train.truncated + val.truncated,
            "dropped": train.dropped + val.dropped,
        }


def encode_sft(
    tok: ChatTokenizer, conversations: Sequence[Sequence[dict]], block_size: int
) -> tuple[list[Example], EncodeStats]:
    """Render conversations to ``(ids, assistant_mask)``, each at most ``block_size + 1`` tokens."""
    limit = block_size + 1  # inputs and shifted labels are both block_size long
    stats, out = EncodeStats(), []
    for conv in conversations:
        stats.total += 1
        enc = tok.render_chat(conv)
        ids, mask = list(enc.ids), list(enc.assistant_mask)
        if len(ids) > limit:
            ids, mask = ids[:limit], mask[:limit]
            stats.truncated += 1
        # mask[0] is never a label target (labels start at token 1).
        if not any(mask[1:]):
            stats.dropped += 1
            continue
        out.append((ids, mask))
    return out, stats


def sft_features(ids: Sequence[int], mask: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: shift by one, label only where the next token is the assistant's."""
    labels = [nxt if m else IGNORE_INDEX for nxt, m in zip(ids[1:], mask[1:], strict=True)]
    return list(ids[:-1]), labels


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices grouped into bins whose lengths sum to <= capacity.

    Deterministic (ties keep input order); near-optimal fill, so few padded tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the pack capacity {capacity}")
        j = bisect.bisect_left(free, (n, -1))  # the tightest bin that still fits
        if j == len(free):
            bins.append([i])
            rem, b = capacity - n, len(bins) - 1
        else:
            rem, b = free.pop(j)
            bins[b].append(i)
            rem -= n
        bisect.insort(free, (rem, b))
    return bins


class SFTDataset(Dataset):
    """Rows of ``input_ids``/``labels`` (+ ``segment_ids`` when packed) as int lists."""

    def __init__(self, examples: Sequence[Example], block_size: int, pack: bool = False) -> None:
        feats = [sft_features(ids, mask) for ids, mask in examples]
        for i, (inp, _) in enumerate(feats):
            if len(inp) > block_size:
                raise ValueError(f"example {i} has {len(inp) + 1} tokens > block_size + 1; use encode_sft")
        self.pack = pack
        self.rows: list[dict[str, list[int]]] = []
        if not pack:
            self.rows = [{"input_ids": inp, "labels": lab} for inp, lab in feats]
            return
        for group in pack_bins([len(inp) for inp, _ in feats], block_size):
            row: dict[str, list[int]] = {"input_ids": [], "labels": [], "segment_ids": []}
            for seg, i in enumerate(sorted(group), start=1):
                inp, lab = feats[i]
                row["input_ids"] += inp
                row["labels"] += lab
                row["segment_ids"] += [seg] * len(inp)
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


def collate_sft(items: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest row: pad_id inputs, -100 labels, 0 attention mask / segment id."""
    T = max(len(it["input_ids"]) for it in items)
    batch = {
        "input_ids": pad([it["input_ids"] for it in items], pad_id, T),
        "labels": pad([it["labels"] for it in items], IGNORE_INDEX, T),
        "attention_mask": attention_mask([it["input_ids"] for it in items], T),
    }
    if "segment_ids" in items[0]:
        batch["segment_ids"] = pad([it["segment_ids"] for it in items], 0, T)
    return batch


def encode_pairs(
    tok: ChatTokenizer, pairs: Sequence[dict], block_size: int
) -> tuple[list[Example], EncodeStats]:
    """``(chosen_ids, rejected_ids)`` per pair, each at most ``block_size`` tokens.

    Too-long pairs lose prompt tokens from the left (after <|bos|>), the same number from both
    rows: the reply's end is where a reward model reads its score, so it must survive, and equal
    prompts keep the DPO margin exact.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    stats, out = EncodeStats(), []
    for n, pair in enumerate(pairs):
        stats.total += 1
        try:
            prompt, replies = list(pair["prompt"]), (pair["chosen"], pair["rejected"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"pairs[{n}] must be a dict with prompt, chosen and rejected") from e
        encoded = [list(tok.render_chat([*prompt, {"role": "assistant", "content": r}]).ids) for r in replies]
        # Cut both rows by the same count so their prompts stay identical (DPO's prompt terms cancel).
        excess = max(len(ids) for ids in encoded) - block_size
        if excess > 0:
            encoded = [ids[:1] + ids[1 + excess :] for ids in encoded]
            stats.truncated += 1
        if encoded[0] == encoded[1]:  # no preference signal left
            stats.dropped += 1
            continue
        out.append((encoded[0], encoded[1]))
    return out, stats


def collate_pairs(items: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask`` [2B, T]: the B chosen rows, then the B rejected rows."""
    rows = [c for c, _ in items] + [r for _, r in items]
    return {"input_ids": pad(rows, pad_id), "attention_mask": attention_mask(rows)}


class _ListDataModule(L.LightningDataModule):
    """Train batches from a seeded, resumable stream (`SeededBatches`); val batches in fixed order."""

    def __init__(self, batch_size: int, seed: int, collate: Callable[..., dict[str, Tensor]]) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.collate = batch_size, seed, collate
        self.train_ds: Any = None  # any map-style dataset (len + getitem)
        self.val_ds: Any = None

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        # Batch i is a pure function of (seed, i): a resumed run continues the same order.
        trainer = getattr(self, "trainer", None)
        stream = SeededBatches(
            self.train_ds,
            self.batch_size,
            self.seed,
            collate=self.collate,
            start=consumed_batches(trainer),
            rank=trainer.global_rank if trainer is not None else 0,
            world=trainer.world_size if trainer is not None else 1,
        )
        return DataLoader(stream, batch_size=None, num_workers=0)

    def fingerprint(self) -> str:
        self.setup("fit")
        items = [self.train_ds[i] for i in range(len(self.train_ds))]
        val = [self.val_ds[i] for i in range(len(self.val_ds))]
        return content_digest(items, val, self.batch_size, self.seed)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return DataLoader(self.val_ds, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)


class SFTDataModule(_ListDataModule):
    """SFT batches: input_ids, labels, attention_mask [B, T] (+ segment_ids when ``pack``)."""

    def __init__(
        self,
        train_examples: Sequence[Example],
        val_examples: Sequence[Example],
        batch_size: int,
        pad_id: int,
        block_size: int,
        pack: bool = False,
        seed: int = 1337,
    ) -> None:
        super().__init__(batch_size, seed, partial(collate_sft, pad_id=pad_id))
        self.train_examples, self.val_examples = train_examples, val_examples
        self.block_size, self.pack = block_size, pack

    def setup(self, stage: str | None = None) -> None:
        if self.train_ds is None:
            self.train_ds = SFTDataset(self.train_examples, self.block_size, self.pack)
            self.val_ds = SFTDataset(self.val_examples, self.block_size, self.pack)


class PreferenceDataModule(_ListDataModule):
    """Reward-model / DPO batches: input_ids, attention_mask [2B, T], chosen rows first."""

    def __init__(
        self,
        train_pairs: Sequence[Example],
        val_pairs: Sequence[Example],
        batch_size: int,
        pad_id: int,
        seed: int = 1337,
    ) -> None:
        super().__init__(batch_size, seed, partial(collate_pairs, pad_id=pad_id))
        # A list is already a map-style dataset (len + getitem), which is all samplers need.
        self.train_ds, self.val_ds = list(train_pairs), list(val_pairs)
