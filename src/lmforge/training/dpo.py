"""Direct Preference Optimisation (offline, on preference pairs) on the shared Lightning core.

A batch stacks B chosen rows, then B rejected rows::

    {"input_ids": [2B, T], "attention_mask": [2B, T], "response_mask": [2B, T] (optional)}

``response_mask`` marks the reply tokens whose log-probs count. Without it every real token
after the first counts: the shared prompt then contributes the same tokens to both rows of a
pair, and its terms cancel in the DPO margin (chosen - rejected) as long as both rows carry the
same prompt. This is the format of `chat_data.PreferenceDataModule` batches.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lmforge.training.config import OptimConfig
from lmforge.training.module import TrainModule
from lmforge.training.rl import dpo_loss, model_attention_mask, token_logprobs

if TYPE_CHECKING:
    from lmforge.tokenizer import ChatTokenizer

DPOExample = dict[str, list[int]]  # chosen_ids, chosen_mask, rejected_ids, rejected_mask


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


def encode_dpo_pairs(tok: ChatTokenizer, pairs: Sequence[dict], block_size: int) -> list[DPOExample]:
    """Render ``prompt + [assistant reply]`` for both replies, with assistant masks.

    Too-long rows lose prompt tokens from the left (after <|bos|>) so the reply survives; a pair
    whose rows are identical (no preference signal) is dropped.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    out = []
    for n, pair in enumerate(pairs):
        try:
            prompt, replies = list(pair["prompt"]), (pair["chosen"], pair["rejected"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"pairs[{n}] must be a dict with prompt, chosen and rejected") from e
        rows = []
        for reply in replies:
            enc = tok.render_chat([*prompt, {"role": "assistant", "content": reply}])
            ids, mask = list(enc.ids), list(enc.assistant_mask)
            if len(ids) > block_size:
                cut = len(ids) - block_size + 1
                ids, mask = ids[:1] + ids[cut:], mask[:1] + mask[cut:]
            rows.append((ids, mask))
        if rows[0][0] != rows[1][0]:
            ex = {"chosen_ids": rows[0][0], "chosen_mask": rows[0][1]}
            out.append({**ex, "rejected_ids": rows[1][0], "rejected_mask": rows[1][1]})
    return out


def collate_dpo(examples: Sequence[DPOExample], pad_id: int) -> dict[str, Tensor]:
    """Right-padded [2B, T] batch: the B chosen rows, then the B rejected rows."""
    rows = [(e["chosen_ids"], e["chosen_mask"]) for e in examples]
    rows += [(e["rejected_ids"], e["rejected_mask"]) for e in examples]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    resp = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, m) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
        resp[i, : len(m)] = torch.tensor(m, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


class DPODataModule(L.LightningDataModule):
    """Seeded-shuffle train batches and fixed-order val batches of `encode_dpo_pairs` examples.

    Map-style, so under DDP Lightning inserts a DistributedSampler for the train loader.
    """

    def __init__(
        self,
        train: Sequence[DPOExample],
        val: Sequence[DPOExample] = (),
        *,
        batch_size: int,
        pad_id: int,
        seed: int = 1337,
    ) -> None:
        super().__init__()
        if not train or batch_size < 1:
            raise ValueError("DPODataModule needs at least one training pair and batch_size >= 1")
        self.train_pairs, self.val_pairs = list(train), list(val)
        self.batch_size, self.seed = batch_size, seed
        self.collate = partial(collate_dpo, pad_id=pad_id)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)  # epoch k's order is a function of the seed
        return DataLoader(
            self.train_pairs, batch_size=self.batch_size, shuffle=True, generator=gen, collate_fn=self.collate
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_pairs, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)
