"""Tests for SFT data (lmforge.training.chat_data): label masking, padding, packing, truncation."""

from __future__ import annotations

import pytest
import torch

from conftest import cpu_trainer_config, tiny_gpt
from lmforge.tokenizer import ChatTokenizer, train_bpe
from lmforge.training import (
    CausalLMModule,
    OptimConfig,
    SFTDataModule,
    SFTDataset,
    collate_sft,
    encode_sft,
    fit,
)
from lmforge.training.chat_data import pack_bins, sft_features

IGNORE = -100
CORPUS = [
    "hello there, how are you today?",
    "I am fine, thank you for asking.",
    "what is the capital of france? paris is the capital.",
    "you are a helpful assistant who answers briefly.",
    "tell me a short story about a cat and a dog.",
] * 20


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer(train_bpe(CORPUS, vocab_size=300))


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


CONVS = [
    chat(
        ("system", "you are a helpful assistant"), ("user", "hello there"), ("assistant", "hi, how are you?")
    ),
    chat(
        ("user", "what is the capital of france?"),
        ("assistant", "paris"),
        ("user", "thank you"),
        ("assistant", "you are welcome"),
    ),
    chat(("user", "tell me a story"), ("assistant", "a cat and a dog")),
    chat(("user", "hi"), ("assistant", "hello")),
    chat(
        ("system", "answer briefly"), ("user", "how are you today?"), ("assistant", "I am fine, thank you.")
    ),
]


def hand_labels(tok: ChatTokenizer, ids: list[int]) -> list[int]:
    """Expected labels from the token stream alone: targets inside an assistant turn, up to its <|end|>."""
    in_assistant, keep = False, []
    for t in ids:
        if t in tok.role_ids.values():
            keep.append(False)
            in_assistant = t == tok.role_ids["assistant"]
        else:
            keep.append(in_assistant)
            if t == tok.end_id:
                in_assistant = False
    return [t if k else IGNORE for t, k in zip(ids[1:], keep[1:], strict=True)]


def test_labels_only_on_next_assistant_tokens(tok: ChatTokenizer) -> None:
    examples, stats = encode_sft(tok, CONVS, block_size=128)
    assert (stats.total, stats.truncated, stats.dropped, stats.kept) == (5, 0, 0, 5)
    batch = collate_sft(SFTDataset(examples, 128).rows, pad_id=tok.pad_id)
    for row, (ids, mask), conv in zip(range(len(CONVS)), examples, CONVS, strict=True):
        n = len(ids) - 1
        labels = batch["labels"][row].tolist()
        assert batch["input_ids"][row, :n].tolist() == ids[:-1]
        assert labels[:n] == hand_labels(tok, ids)
        assert labels[:n] == [ids[t + 1] if mask[t + 1] else IGNORE for t in range(n)]
        # The kept targets are exactly each assistant reply plus its closing <|end|>.
        want = [t for m in conv if m["role"] == "assistant" for t in [*tok.encode(m["content"]), tok.end_id]]
        assert [t for t in labels if t != IGNORE] == want
        specials = {tok.bos_id, *tok.role_ids.values()}
        assert not specials & {t for t in labels if t != IGNORE}
        # Right padding: pad ids, no labels, attention mask 0.
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert set(batch["input_ids"][row, n:].tolist()) <= {tok.pad_id}
        assert set(labels[n:]) <= {IGNORE}
    assert "segment_ids" not in batch


def test_truncation_counts(tok: ChatTokenizer) -> None:
    long_prompt = chat(
        ("system", "you are a helpful assistant " * 10), ("user", "hi"), ("assistant", "hello")
    )
    long_reply = chat(("user", "hi"), ("assistant", "tell me a short story about a cat and a dog " * 5))
    short = chat(("user", "hi"), ("assistant", "hello"))
    block = 24
    examples, stats = encode_sft(tok, [long_prompt, long_reply, short], block_size=block)
    assert (stats.total, stats.truncated, stats.dropped, stats.kept) == (3, 2, 1, 2)
    assert len(examples) == 2
    assert len(examples[0][0]) == block + 1 and any(examples[0][1][1:])
    assert examples[1] == (tok.render_chat(short).ids, tok.render_chat(short).assistant_mask)
    assert all(len(ids) == len(mask) <= block + 1 for ids, mask in examples)


def test_pack_bins_best_fit() -> None:
    bins = pack_bins([5, 3, 7, 2, 4, 8], capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 7, 2, 4, 8][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 29 tokens into 10-token bins: optimal
    with pytest.raises(ValueError, match="capacity"):
        pack_bins([11], capacity=10)


def test_packing_boundaries_and_logits(tok: ChatTokenizer) -> None:
    block = 48
    examples, _ = encode_sft(tok, CONVS, block_size=block)
    ds = SFTDataset(examples, block, pack=True)
    assert len(ds) < len(examples)
    batch = collate_sft([ds[i] for i in range(len(ds))], pad_id=tok.pad_id)
    assert batch["input_ids"].shape[1] <= block
    seen = []
    for row in range(len(ds)):
        seg = batch["segment_ids"][row].tolist()
        labels, inputs = batch["labels"][row].tolist(), batch["input_ids"][row].tolist()
        n_real = sum(batch["attention_mask"][row].tolist())
        assert all(s == 0 for s in seg[n_real:]) and all(s > 0 for s in seg[:n_real])
        start = 0
        for s in range(1, max(seg) + 1):
            length = seg.count(s)
            assert seg[start : start + length] == [s] * length  # contiguous, numbered from 1
            piece_in, piece_lab = inputs[start : start + length], labels[start : start + length]
            (k,) = [i for i, (ids, _) in enumerate(examples) if ids[:-1] == piece_in]
            # Labels were shifted inside the example: the last one is its own <|end|>, never the
            # next segment's first token.
            assert (piece_in, piece_lab) == sft_features(*examples[k])
            assert piece_lab[-1] == examples[k][0][-1] == tok.end_id
            seen.append(k)
            start += length
        assert start == n_real
    assert sorted(seen) == list(range(len(examples)))

    model = tiny_gpt(tok.vocab_size, block_size=block, n_kv_head=4).eval()
    with torch.no_grad():
        packed = model(
            batch["input_ids"], segment_ids=batch["segment_ids"], attention_mask=batch["attention_mask"]
        )
        for row in range(len(ds)):
            seg = batch["segment_ids"][row]
            for s in range(1, int(seg.max()) + 1):
                idx = batch["input_ids"][row][seg == s]
                torch.testing.assert_close(packed[row][seg == s], model(idx[None])[0], atol=1e-5, rtol=0)

        # The LM loss over packed rows equals the loss over the same examples unpacked.
        module = CausalLMModule(model, OptimConfig(warmup_steps=0, max_steps=1))
        plain = collate_sft(SFTDataset(examples, block).rows, pad_id=tok.pad_id)
        torch.testing.assert_close(module.compute_loss(batch)[0], module.compute_loss(plain)[0])


def test_datamodule_order_and_training(tok: ChatTokenizer, tmp_path) -> None:
    examples, _ = encode_sft(tok, CONVS * 4, block_size=48)

    per_epoch = len(examples) // 4

    def order(dm: SFTDataModule, split: str) -> list[list[int]]:
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        return [b["input_ids"][:, 0:6].tolist() for b, _ in zip(loader, range(per_epoch))]

    def dm(seed: int, pack: bool = False) -> SFTDataModule:
        return SFTDataModule(examples, examples[:5], 4, tok.pad_id, 48, pack=pack, seed=seed)

    a, b = dm(1), dm(1)
    # The train stream is endless: batch i is a pure function of (seed, i), epochs reshuffled.
    stream = iter(a.train_dataloader())
    epoch1, epoch2 = ([next(stream)["input_ids"].tolist() for _ in range(per_epoch)] for _ in range(2))
    assert epoch1 != epoch2  # reshuffled per epoch...
    assert [x["input_ids"].tolist() for x, _ in zip(b.train_dataloader(), range(per_epoch))] == epoch1
    assert order(dm(2), "train") != order(a, "train")
    assert order(a, "val") == order(dm(2), "val")

    # Packed SFT through the shared trainer: batches flow, epochs roll over until max_steps.
    model = tiny_gpt(tok.vocab_size, block_size=48, n_kv_head=4)
    module = CausalLMModule(model, OptimConfig(lr=3e-3, warmup_steps=2, max_steps=12))
    cfg = cpu_trainer_config(12, val_every_steps=6, val_batches=2, checkpoint_every_steps=0)
    trainer = fit(module, dm(3, pack=True), cfg, resume=False, default_root_dir=tmp_path)
    assert trainer.global_step == 12
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
