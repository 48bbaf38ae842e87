"""Stage `tokenizer`: train byte-level BPE on the train split; report bytes per token on val."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.ingest.build import load_split
from lmforge.params import Params
from lmforge.tokenizer import ChatTokenizer, train_bpe


def training_texts(root: Path, params: Params) -> Iterator[str]:
    yield from load_split(root, params.ingest.out_dir, "text", "train")["text"]
    if params.tokenizer.include_dialogues and params.ingest.sft_sources:
        for messages in load_split(root, params.ingest.out_dir, "sft", "train")["messages"]:
            yield from (m["content"] for m in messages)


def run(params: Params, root: Path) -> dict:
    cfg = params.tokenizer
    start = time.perf_counter()
    tok = ChatTokenizer(train_bpe(training_texts(root, params), cfg.vocab_size, cfg.min_frequency))
    seconds = time.perf_counter() - start
    tok.save(root / cfg.out_dir)
    val = list(load_split(root, params.ingest.out_dir, "text", "val")["text"])
    n_tokens = sum(len(ids) for ids in tok.encode_batch(val))
    n_bytes = sum(len(t.encode("utf-8")) for t in val)
    return {
        "vocab_size": tok.vocab_size,
        "val_bytes_per_token": round(n_bytes / max(n_tokens, 1), 4),
        "val_tokens": n_tokens,
        "val_bytes": n_bytes,
        "train_seconds": round(seconds, 3),
    }
