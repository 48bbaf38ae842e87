"""Stage `shards`: encode the text splits once into flat memmap token files for pretraining.

Layout (read by `lmforge.training.data`): `<shards_dir>/{train,val}.bin` hold every document
as `<|bos|> + ids`, back to back, in uint16 (uint32 when the vocabulary needs it), and
`shards.json` records dtype, vocab size, token and byte counts, and special ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.atomic import atomic_path, atomic_write_text
from lmforge.ingest.build import load_split
from lmforge.params import Params
from lmforge.tokenizer import ChatTokenizer


def write_shard(
    tok: ChatTokenizer, texts: list[str], path: Path, dtype: np.dtype, batch: int = 1024
) -> tuple[int, int]:
    n_tokens = n_bytes = 0
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        for i in range(0, len(texts), batch):
            chunk = texts[i : i + batch]
            for ids in tok.encode_batch(chunk):
                np.asarray([tok.bos_id, *ids], dtype=dtype).tofile(fh)
                n_tokens += len(ids) + 1
            n_bytes += sum(len(t.encode("utf-8")) for t in chunk)
    return n_tokens, n_bytes


def run(params: Params, root: Path) -> dict:
    tok = ChatTokenizer.load(root / params.tokenizer.out_dir)
    out = root / params.tokenizer.shards_dir
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    info: dict = {
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "tokens": {},
        "bytes": {},
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
    }
    for split in ("train", "val"):
        texts = list(load_split(root, params.ingest.out_dir, "text", split)["text"])
        info["tokens"][split], info["bytes"][split] = write_shard(tok, texts, out / f"{split}.bin", dtype)
    # The sidecar last: shards are only read through it, so a killed run leaves no readable half.
    atomic_write_text(out / "shards.json", json.dumps(info, indent=2) + "\n")
    return {
        "tokens": info["tokens"],
        "bytes": info["bytes"],
        "val_tokens_per_byte": round(info["tokens"]["val"] / max(info["bytes"]["val"], 1), 5),
    }
