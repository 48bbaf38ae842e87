"""Held-out measurements shared by the pretrain, SFT, reward, RLHF and evaluate stages.

- `full_val_loss`: next-token loss over every window of the val token shard (-> bits per byte);
- `text_bits_per_byte`: bits per byte of a raw text, every byte counted (issue 17's protocol rule);
- `document_nll`: per document, the summed NLL of every token after `<|bos|>` and its UTF-8 bytes
  (the held-out items of the per-document val bits/byte, the rule lm-evaluation-harness's
  `loglikelihood_rolling` follows);
- `assistant_loss`: mean next-token loss on assistant tokens only (what SFT optimizes);
- `preference_accuracy`: a reward model's share of pairs ranked chosen > rejected, and margin;
- `reply_stats`: replies to held-out prompts: how many end with <|end|> before the length
  limit, their length, and (given a reward model) their mean reward;
- `item_scores`: all of the above per held-out item (window, dialogue, prompt), the material of
  intervals and of paired comparisons with another model on the same items (`lmforge.stats`).
Every batch is moved to the device of the model that reads it; results come back as Python numbers.
Core only: torch and lmforge's core modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.generation.chat import ChatEngine
from lmforge.generation.sampling_params import SamplingParams
from lmforge.heads import ScalarHeadModel
from lmforge.model import GPT
from lmforge.tokenizer import ChatTokenizer
from lmforge.training.chat_data import Example, SFTDataset, collate_pairs, collate_sft, encode_sft
from lmforge.training.data import ShardInfo, load_shard
from lmforge.training.module import IGNORE_INDEX
from lmforge.training.rollouts import RewardModelFn


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def val_window_losses(
    model: GPT, shard_dir: Path, info: ShardInfo, block_size: int, batch_size: int = 32
) -> np.ndarray:
    """Summed next-token loss (nats) of each full window of val.bin: the held-out items of the
    val bits/byte (every window has ``block_size`` tokens)."""
    data = torch.from_numpy(np.asarray(load_shard(shard_dir, "val", info), dtype=np.int64))
    n = (len(data) - 1) // block_size
    x = data[: n * block_size].view(n, block_size)
    y = data[1 : n * block_size + 1].view(n, block_size)
    model.eval()
    device = _device(model)
    sums = []
    for i in range(0, n, batch_size):
        logits = model(x[i : i + batch_size].to(device)).float()
        targets = y[i : i + batch_size].to(device)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        sums.append(nll.view(len(targets), -1).double().sum(dim=1).cpu().numpy())
    return np.concatenate(sums) if sums else np.zeros(0)


def full_val_loss(
    model: GPT, shard_dir: Path, info: ShardInfo, block_size: int, batch_size: int = 32
) -> float:
    """Mean next-token loss (nats) over every full window of val.bin (not just the monitored batches)."""
    windows = val_window_losses(model, shard_dir, info, block_size, batch_size)
    return float(windows.sum() / (len(windows) * block_size))


@torch.inference_mode()
def text_bits_per_byte(
    model: GPT, tok: ChatTokenizer, text: str, block_size: int, batch_size: int = 16
) -> tuple[float, int]:
    """(bits per byte, bytes scored) of `text` as one raw stream, no special tokens.

    The rule: encode the whole text; predict each token from the tokens before it in non-overlapping
    windows of `block_size` (the first token has no context and is not scored); divide the summed NLL
    by ln 2 x the UTF-8 bytes of the predicted tokens.
    """
    ids = tok.encode(text)
    if len(ids) < 2:
        raise ValueError(f"text_bits_per_byte needs at least 2 tokens, the text encodes to {len(ids)}")
    model.eval()
    device = _device(model)
    data = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, len(ids) - 1, block_size))
    nll = 0.0
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        width = max(min(block_size, len(ids) - 1 - s) for s in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(chunk):
            n = min(block_size, len(ids) - 1 - s)
            x[row, :n], y[row, :n] = data[s : s + n], data[s + 1 : s + 1 + n]
        logits = model(x.to(device)).float()
        nll += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
    n_bytes = sum(len(b) for b, _ in tok.token_bytes(ids[1:]))
    return nll / (math.log(2) * n_bytes), n_bytes


@torch.inference_mode()
def document_nll(
    model: GPT, tok: ChatTokenizer, texts: Sequence[str], block_size: int, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Per document of ``texts``: the summed NLL (nats) of all its tokens, and its UTF-8 bytes.

    The rule: ``<|bos|> + ids``; every token of ``ids`` is predicted once, in windows of
    ``block_size`` predictions from the start; the last, shorter window reaches back for a full
    ``block_size`` of context (tokens already predicted are context only). Documents are independent
    (no context crosses a document boundary); bits per byte is ``sum(nll) / (ln 2 * sum(bytes))``.
    """
    model.eval()
    device = _device(model)
    rows: list[tuple[int, list[int], int]] = []  # (document, window input, predictions at its end)
    for d, text in enumerate(texts):
        full = [tok.bos_id, *tok.encode(text)]
        for start in range(0, len(full) - 1, block_size):
            end = min(start + block_size, len(full) - 1)  # predict full[start + 1 : end + 1]
            first = max(0, end - block_size)
            rows.append((d, full[first : end + 1], end - start))
    nll = np.zeros(len(texts), dtype=np.float64)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(r[1]) - 1 for r in chunk)
        x = torch.full((len(chunk), width), tok.pad_id, dtype=torch.long)
        y = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, (_, window, predicted) in enumerate(chunk):
            n = len(window) - 1
            x[row, :n] = torch.tensor(window[:-1])
            y[row, n - predicted : n] = torch.tensor(window[-predicted:])
        logits = model(x.to(device)).float()
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )
        sums = losses.view(len(chunk), width).double().sum(dim=1).cpu().numpy()
        for (d, _, _), value in zip(chunk, sums, strict=True):
            nll[d] += value
    n_bytes = np.asarray([len(t.encode("utf-8")) for t in texts], dtype=np.float64)
    return nll, n_bytes


@torch.no_grad()
def assistant_nll(
    model: GPT, examples: Sequence[Example], block_size: int, pad_id: int, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Per example of `examples` (from encode_sft): the summed cross-entropy over its assistant
    tokens, and how many there are (the held-out items of the assistant loss)."""
    data = SFTDataset(examples, block_size, pack=False)
    model.eval()
    device = _device(model)
    sums, counts = [], []
    for i in range(0, len(data), batch_size):
        batch = collate_sft([data[j] for j in range(i, min(i + batch_size, len(data)))], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        labels = batch["labels"]
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )
        sums.append(nll.view(labels.shape).double().sum(dim=1).cpu().numpy())
        counts.append((labels != IGNORE_INDEX).sum(dim=1).cpu().numpy())
    if not sums:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(sums), np.concatenate(counts).astype(np.float64)


def assistant_loss(
    model: GPT, examples: Sequence[Example], block_size: int, pad_id: int, batch_size: int = 16
) -> float:
    """Token-weighted mean cross-entropy over assistant tokens of `examples` (from encode_sft)."""
    sums, counts = assistant_nll(model, examples, block_size, pad_id, batch_size)
    return float(sums.sum() / max(counts.sum(), 1))


@torch.no_grad()
def preference_margins(
    rm: ScalarHeadModel, pairs: Sequence[Example], pad_id: int, batch_size: int = 32
) -> np.ndarray:
    """r(chosen) - r(rejected) of each pair (the held-out items of the reward model's accuracy)."""
    rm.eval()
    device = _device(rm)
    margins: list[float] = []
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i : i + batch_size], pad_id)
        rewards = rm(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
        chosen, rejected = rewards.chunk(2)
        margins += (chosen - rejected).tolist()
    return np.asarray(margins, dtype=np.float64)


def preference_accuracy(
    rm: ScalarHeadModel, pairs: Sequence[Example], pad_id: int, batch_size: int = 32
) -> dict:
    """Share of pairs with r(chosen) > r(rejected), and the mean margin."""
    margins = preference_margins(rm, pairs, pad_id, batch_size)
    return {
        "accuracy": float((margins > 0).sum()) / max(len(pairs), 1),
        "margin": float(margins.sum()) / max(len(margins), 1),
    }


def reply_stats(
    engine: ChatEngine,
    prompts: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    rm: ScalarHeadModel | None = None,
    batch_size: int = 16,
) -> dict:
    """Generate replies to held-out prompts; end-of-turn rate, length, mean reward, the replies, and
    per prompt (the held-out items): ``ended`` (1/0), ``lengths`` and, with ``rm``, ``rewards``."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        top_k=None if temperature == 0 else 50,
    )
    gens = []
    for i in range(0, len(prompts), batch_size):
        gens += engine.chat(list(prompts[i : i + batch_size]), params)
    ended = [g.finish_reason == "stop" and g.stop_token_id == engine.tok.end_id for g in gens]
    out = {
        "end_of_turn_rate": sum(ended) / max(len(gens), 1),
        "mean_length": sum(len(g.token_ids) for g in gens) / max(len(gens), 1),
        "replies": [g.text or "" for g in gens],
        "ended": [int(e) for e in ended],
        "lengths": [len(g.token_ids) for g in gens],
    }
    if rm is not None:
        # The same scorer as RL (the ids the policy produced, closed with <|end|> if it did not).
        score = RewardModelFn(rm, engine.tok.end_id, engine.tok.pad_id)
        prompt_ids = [engine.chat_ids(p) for p in prompts]
        scores: list[float] = []
        for i in range(0, len(gens), batch_size):
            chunk = slice(i, i + batch_size)
            scores += score(prompt_ids[chunk], [g.ids_with_stop for g in gens[chunk]]).cpu().tolist()
        out["mean_reward"] = sum(scores) / max(len(scores), 1)
        out["rewards"] = scores
    return out


def item_scores(
    model: GPT,
    tok: ChatTokenizer,
    *,
    shard_dir: Path,
    info: ShardInfo,
    dialogues: Sequence[Sequence[dict]],
    prompts: Sequence[Sequence[dict]],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    rm: ScalarHeadModel | None = None,
    tasks: Sequence[Sequence[dict]] = (),
    texts: Sequence[str] = (),
) -> dict:
    """One model's scores on every held-out item: per window of the val text its bits/byte, per
    val document of ``texts`` its summed NLL in bits and its bytes (:func:`document_nll`), per
    dialogue its assistant-token loss (summed, and its token count), per prompt whether the reply
    ended with <|end|>, its length and (with ``rm``) its reward; per verifiable-task question of
    ``tasks`` (dialogues ending with the question) 1 when the greedy reply is correct; and the replies. Each
    :data:`lmforge.names.FIXED_JUDGE` figure is the mean of its item list (the loss: a ratio of sums)."""
    block = model.config.block_size
    windows = val_window_losses(model, shard_dir, info, block)
    examples, _ = encode_sft(tok, list(dialogues), block)
    nll, counts = assistant_nll(model, examples, block, tok.pad_id)
    replied = reply_stats(
        ChatEngine(model, tok),
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        rm=rm,
    )
    scale = info.tokens_per_byte("val") / (math.log(2) * block)  # a window's summed nats -> its bits/byte
    doc_nll, doc_bytes = document_nll(model, tok, texts, block)
    return {
        "val_text_bits": (doc_nll / math.log(2)).tolist(),
        "val_text_bytes": doc_bytes.tolist(),
        "task_accuracy": task_scores(ChatEngine(model, tok), tasks, max_new_tokens=max_new_tokens),
        "val_bits_per_byte": (windows * scale).tolist(),
        "assistant_nll": nll.tolist(),
        "assistant_tokens": counts.tolist(),
        "end_of_turn_rate": [float(e) for e in replied["ended"]],
        "mean_length": [float(n) for n in replied["lengths"]],
        "mean_reward": replied.get("rewards", []),
        "replies": replied["replies"],
    }


def task_scores(
    engine: ChatEngine, tasks: Sequence[Sequence[dict]], *, max_new_tokens: int, batch_size: int = 32
) -> list[float]:
    """1.0 per verifiable-task question (the last user turn of each of ``tasks``) whose greedy reply a
    program finds correct (:mod:`lmforge.training.verifiable`), else 0.0."""
    from lmforge.training.verifiable import is_correct, question_of, question_turn

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    conversations = [question_turn(t) for t in tasks]
    out: list[float] = []
    for i in range(0, len(conversations), batch_size):
        chunk = conversations[i : i + batch_size]
        for conv, gen in zip(chunk, engine.chat(chunk, params), strict=True):
            letters = question_of(str(conv[-1]["content"]))
            out.append(float(letters is not None and is_correct(letters, gen.text or "")))
    return out


def judged_items(scores: dict, figure: str) -> list[float]:
    """The per-item values whose mean is ``figure`` (a :data:`lmforge.names.FIXED_JUDGE` key). A
    ratio of sums becomes one: the assistant loss per dialogue is its summed loss over the mean token
    count (the mean is the token-weighted loss), a document's bits over the mean bytes likewise."""
    ratios = {
        "assistant_loss": ("assistant_nll", "assistant_tokens"),
        "val_text_bits_per_byte": ("val_text_bits", "val_text_bytes"),
    }
    if figure in ratios:
        top, bottom = (np.asarray(scores[k], dtype=np.float64) for k in ratios[figure])
        if len(bottom) == 0:
            return []
        return (top / max(bottom.mean(), 1e-12)).tolist()
    return list(scores[figure])
