"""Tests for reward modelling: Bradley-Terry loss, preference data, ScalarHeadModel, RewardModule."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import cpu_trainer_config, tiny_gpt
from lmforge.heads import ScalarHeadModel
from lmforge.tokenizer import ChatTokenizer, train_bpe
from lmforge.training import (
    OptimConfig,
    PreferenceDataModule,
    RewardModule,
    bradley_terry_loss,
    collate_pairs,
    encode_pairs,
    fit,
)

GOOD, BAD = "yes thank you", "no go away"
TOPICS = ["tea", "a walk", "some help", "a book", "cake", "a song", "a map", "music", "a game", "bread"]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    texts = [f"would you like {t}? {GOOD}. {BAD}." for t in TOPICS] * 10
    return ChatTokenizer(train_bpe(texts, vocab_size=300))


def pair(topic: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"would you like {topic}?"}],
        "chosen": GOOD,
        "rejected": BAD,
    }


def tiny_reward_model(vocab: int, block: int = 32, seed: int = 0) -> ScalarHeadModel:
    return ScalarHeadModel(tiny_gpt(vocab, seed=seed, block_size=block, n_kv_head=4))


def test_bradley_terry_values_and_gradient_signs() -> None:
    r_c = torch.tensor([1.0], requires_grad=True)
    r_r = torch.tensor([0.0], requires_grad=True)
    loss = bradley_terry_loss(r_c, r_r)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    loss.backward()
    assert r_c.grad is not None and r_r.grad is not None
    # d/dr_c = -sigmoid(-(r_c - r_r)) = -1 / (1 + e)
    assert r_c.grad.item() == pytest.approx(-1 / (1 + math.e)) and r_c.grad.item() < 0
    assert r_r.grad.item() == pytest.approx(1 / (1 + math.e)) and r_r.grad.item() > 0
    # Mean over pairs; equal rewards cost log 2; huge margins stay finite.
    both = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert both.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4])))


def test_encode_pairs_truncates_prompt_from_left(tok: ChatTokenizer) -> None:
    long = {**pair("a book"), "prompt": [{"role": "user", "content": "would you like a book? " * 8}]}
    same = {**pair("tea"), "rejected": GOOD}
    encoded, stats = encode_pairs(tok, [pair("tea"), long, same], block_size=20)
    assert (stats.total, stats.truncated, stats.dropped, stats.kept) == (3, 1, 1, 2)
    full_c = tok.render_chat([*pair("tea")["prompt"], {"role": "assistant", "content": GOOD}]).ids
    assert encoded[0][0] == full_c
    assert max(len(ids) for ids in encoded[1]) == 20  # the longer row fills the block
    assert all(ids[0] == tok.bos_id for ids in encoded[1])  # <|bos|> kept, prompt cut after it
    reply_c = [tok.role_ids["assistant"], *tok.encode(GOOD), tok.end_id]
    reply_r = [tok.role_ids["assistant"], *tok.encode(BAD), tok.end_id]
    assert encoded[1][0][-len(reply_c) :] == reply_c and encoded[1][1][-len(reply_r) :] == reply_r
    # Both rows lost the same prompt tokens, so their prompts are still identical (DPO margins exact).
    assert encoded[1][0][: -len(reply_c)] == encoded[1][1][: -len(reply_r)]
    with pytest.raises(ValueError, match="pairs\\[0\\]"):
        encode_pairs(tok, [{"prompt": []}], block_size=20)


def test_preference_batch_layout(tok: ChatTokenizer) -> None:
    pairs = [([1, 2, 3], [1, 4]), ([5, 6], [7, 8, 9, 10])]
    batch = collate_pairs(pairs, pad_id=tok.pad_id)
    p = tok.pad_id
    assert batch["input_ids"].tolist() == [[1, 2, 3, p], [5, 6, p, p], [1, 4, p, p], [7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    dm = PreferenceDataModule(pairs * 3, pairs, batch_size=2, pad_id=p, seed=0)
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape[0] == 4
    assert next(iter(dm.val_dataloader()))["input_ids"].tolist() == batch["input_ids"].tolist()


def test_scalar_head_reads_last_real_token() -> None:
    model = tiny_reward_model(64).eval()
    seqs = [torch.randint(1, 64, (n,)) for n in (7, 4, 10)]
    with torch.no_grad():
        alone = torch.stack([model(s[None])[0] for s in seqs])
        T = 12
        for side in ("right", "left"):
            ids = torch.zeros(3, T, dtype=torch.long)
            mask = torch.zeros(3, T, dtype=torch.long)
            for i, s in enumerate(seqs):
                span = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
                ids[i, span], mask[i, span] = s, 1
            torch.testing.assert_close(model(ids, mask), alone, atol=1e-5, rtol=0)


def test_reward_module_learns_obvious_preference(tok: ChatTokenizer, tmp_path) -> None:
    train, _ = encode_pairs(tok, [pair(t) for t in TOPICS[:8]], block_size=32)
    val, _ = encode_pairs(tok, [pair(t) for t in TOPICS[8:]], block_size=32)
    model = tiny_reward_model(tok.vocab_size)
    module = RewardModule(model, OptimConfig(lr=3e-3, warmup_steps=5, max_steps=50, weight_decay=0.0))
    cfg = cpu_trainer_config(
        50, val_every_steps=25, val_batches=1, log_every_steps=5, checkpoint_every_steps=0
    )
    trainer = fit(
        module,
        PreferenceDataModule(train, val, 4, tok.pad_id, seed=0),
        cfg,
        resume=False,
        default_root_dir=tmp_path,
    )
    metrics = trainer.callback_metrics
    assert {"val/loss", "val/accuracy", "val/margin", "train/accuracy", "train/margin"} <= set(metrics)
    assert metrics["val/accuracy"].item() == 1.0 and metrics["val/margin"].item() > 0

    # A held-out pair with an unseen prompt is ranked by the reply alone.
    held_out = {**pair("a cup of coffee"), "prompt": [{"role": "user", "content": "coffee?"}]}
    [(chosen, rejected)], _ = encode_pairs(tok, [held_out], block_size=32)
    batch = collate_pairs([(chosen, rejected)], tok.pad_id)
    model.eval()
    with torch.no_grad():
        r_c, r_r = module.split_rewards(batch)
        loss, extra = module.compute_loss(batch)
    assert r_c.item() > r_r.item()
    assert extra["accuracy"].item() == 1.0 and loss.item() < math.log(2)
    assert module.tokens_in_batch(batch) == len(chosen) + len(rejected)
