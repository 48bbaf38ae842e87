"""Stage `tokenizer`: train byte-level BPE on the train split; report bytes per token on val.

The training text streams from the ingested Parquet files (the text split's documents, then, with
`include_dialogues`, every message of the SFT train dialogues) into `train_from_iterator`, so neither
the text nor the tokenizer trainer's input is ever held whole in memory.

`tokenizer.max_train_bytes` caps that input: the sample is the documents (a dialogue message counts
as one) with the smallest keys `blake2b(text)` whose sizes add up to at most the budget (a uniform
sample of documents that depends only on the corpus, not on its order or on the machine), fed in
corpus order. It takes two streaming
passes: one to choose (holding a key per chosen document), one to train. None: every document, in
corpus order, in one pass.

Helpers the shards stage shares: `split_files`/`iter_column` (stream one ingested split) and
`lmforge.progress.Progress` (a tqdm bar of records/s with MB/s, shown on a terminal).
"""

from __future__ import annotations

import hashlib
import heapq
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lmforge.params import Params
from lmforge.progress import Progress
from lmforge.tokenizer import ChatTokenizer, train_bpe

BATCH_ROWS = 1024  # Parquet rows per streamed batch
_SAMPLE_KEY = b"lmforge/tok"  # personalizes the sampling hash (blake2b `person`, at most 16 bytes)


# ---- streaming the ingested splits -----------------------------------------------------------
def split_files(root: Path, out_dir: str, kind: str, split: str) -> list[Path]:
    """The Parquet file(s) of one ingested split: `<out_dir>/<kind>/<split>.parquet`, a file or a
    folder of `*.parquet` parts read in name order (as `lmforge.ingest.build.load_split` finds it)."""
    path = root / out_dir / kind / f"{split}.parquet"
    if path.is_file():
        return [path]
    parts = sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not parts:
        raise FileNotFoundError(f"{path}: not found; run the ingest stage first (dvc repro ingest)")
    return parts


def count_values(files: Iterable[Path], leaf: str | None = None) -> int:
    """From the Parquet footers only: the rows of `files`, or the values of their nested column
    whose path ends with `leaf` (the messages of a dialogue column: "content"). For progress totals."""
    import pyarrow.parquet as pq

    n = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        if leaf is None:
            n += meta.num_rows
            continue
        col = next(i for i in range(meta.num_columns) if meta.schema.column(i).path.endswith(leaf))
        n += sum(meta.row_group(g).column(col).num_values for g in range(meta.num_row_groups))
    return n


def iter_column(files: Iterable[Path], column: str, batch_rows: int | None = None) -> Iterator[Any]:
    """One column of Parquet files as Arrow arrays of at most `batch_rows` rows (default
    `BATCH_ROWS`), in file order."""
    import pyarrow.parquet as pq

    for f in files:
        # pre_buffer=False: pyarrow's default pre-buffers every row group it is asked for, so
        # memory grew with the file (1.37 GB for a 1.2 GB file; 0.25 GB without).
        with pq.ParquetFile(f, pre_buffer=False) as pf:
            for batch in pf.iter_batches(batch_size=batch_rows or BATCH_ROWS, columns=[column]):
                yield batch.column(0)


def counted(texts: Iterable[str], progress: Progress) -> Iterator[str]:
    """`texts` unchanged, each one counted (records and UTF-8 bytes) on `progress`."""
    for text in texts:
        progress.update(1, len(text.encode("utf-8")))
        yield text


# ---- the training input ----------------------------------------------------------------------
def training_texts(root: Path, params: Params) -> Iterator[str]:
    """Every training document in corpus order: the text train split, then (include_dialogues)
    each message of every SFT train dialogue."""
    out_dir = params.ingest.out_dir
    for column in iter_column(split_files(root, out_dir, "text", "train"), "text"):
        yield from column.to_pylist()
    if params.tokenizer.include_dialogues and params.ingest.sft_sources:
        for column in iter_column(split_files(root, out_dir, "sft", "train"), "messages"):
            for messages in column.to_pylist():
                yield from (m["content"] for m in messages)


def training_records(root: Path, params: Params) -> int:
    """How many texts `training_texts` yields (from the Parquet footers; for progress bars)."""
    n = count_values(split_files(root, params.ingest.out_dir, "text", "train"))
    if params.tokenizer.include_dialogues and params.ingest.sft_sources:
        n += count_values(split_files(root, params.ingest.out_dir, "sft", "train"), "content")
    return n


def sample_key(text: str) -> int:
    """A document's sampling key: 64 bits of blake2b over its UTF-8 bytes."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=_SAMPLE_KEY).digest()
    return int.from_bytes(digest, "big")


def choose_sample(texts: Iterable[str], max_bytes: int) -> tuple[list[int], int, int]:
    """Positions (sorted) of the budget sample of `texts`, and the total documents and bytes seen.

    The sample is the longest prefix of the documents ordered by (sample_key, position) whose UTF-8
    sizes sum to at most `max_bytes`. One streaming pass; memory: one small tuple per chosen
    document (a max-heap of the prefix, and `cut`, the first (key, position) left out).
    """
    heap: list[tuple[int, int, int]] = []  # (-key, -position, bytes): the largest on top
    total = n_docs = n_bytes = 0
    cut: tuple[int, int] | None = None
    for pos, text in enumerate(texts):
        size = len(text.encode("utf-8"))
        n_docs, n_bytes = n_docs + 1, n_bytes + size
        key = (sample_key(text), pos)
        if cut is not None and key > cut:
            continue
        heapq.heappush(heap, (-key[0], -pos, size))
        total += size
        while total > max_bytes:
            neg_key, neg_pos, dropped = heapq.heappop(heap)
            total -= dropped
            cut = (-neg_key, -neg_pos)
    return sorted(-neg_pos for _, neg_pos, _ in heap), n_docs, n_bytes


def take_positions(texts: Iterable[str], positions: list[int]) -> Iterator[str]:
    """The items of `texts` at `positions` (sorted ascending), in order."""
    want = iter(positions)
    nxt = next(want, None)
    for pos, text in enumerate(texts):
        if nxt is None:
            return
        if pos == nxt:
            yield text
            nxt = next(want, None)


def budget_texts(
    make_texts: Callable[[], Iterable[str]], max_bytes: int | None, records: int | None = None
) -> tuple[Iterator[str], dict]:
    """The tokenizer's training input (see module docstring) and its size.

    `make_texts()` streams the corpus (called twice under a budget). The returned dict is filled in
    as the iterator is consumed: `documents`, `bytes` (the input), `corpus_documents`,
    `corpus_bytes` (everything available) and `mb_per_second` (the training pass).
    """
    stats: dict = {}

    def run() -> Iterator[str]:
        if max_bytes is None:
            texts: Iterable[str] = make_texts()
            total = records
        else:
            with Progress("tokenizer: sampling", total=records, check_every=4096) as bar:
                positions, n_docs, n_bytes = choose_sample(counted(make_texts(), bar), max_bytes)
            stats.update(corpus_documents=n_docs, corpus_bytes=n_bytes)
            texts, total = take_positions(make_texts(), positions), len(positions)
        with Progress("tokenizer: training input", total=total, check_every=4096) as bar:
            yield from counted(texts, bar)
        stats.update(documents=bar.records, bytes=bar.bytes, mb_per_second=round(bar.mb_per_second, 3))
        stats.setdefault("corpus_documents", bar.records)
        stats.setdefault("corpus_bytes", bar.bytes)

    return run(), stats


# ---- the stage --------------------------------------------------------------------------------
def val_bytes_per_token(root: Path, params: Params, tok: ChatTokenizer) -> tuple[int, int]:
    """Tokens and UTF-8 bytes of the val text split, streamed."""
    n_tokens = n_bytes = 0
    for column in iter_column(split_files(root, params.ingest.out_dir, "text", "val"), "text"):
        texts = column.to_pylist()
        n_tokens += sum(len(ids) for ids in tok.encode_batch(texts))
        n_bytes += sum(len(t.encode("utf-8")) for t in texts)
    return n_tokens, n_bytes


def val_text(root: Path, params: Params, max_bytes: int) -> tuple[str, int]:
    """The val text documents joined by a blank line, whole documents up to `max_bytes` UTF-8 bytes
    (at least one); and how many documents that is."""
    parts: list[str] = []
    size = 0
    for column in iter_column(split_files(root, params.ingest.out_dir, "text", "val"), "text"):
        for text in column.to_pylist():
            n = len(text.encode("utf-8")) + 2 * bool(parts)
            if parts and size + n > max_bytes:
                return "\n\n".join(parts), len(parts)
            parts.append(text)
            size += n
    return "\n\n".join(parts), len(parts)


def run(params: Params, root: Path) -> dict:
    cfg = params.tokenizer
    start = time.perf_counter()
    texts, sample = budget_texts(
        lambda: training_texts(root, params), cfg.max_train_bytes, training_records(root, params)
    )
    tok = ChatTokenizer(train_bpe(texts, cfg.vocab_size, cfg.min_frequency))
    seconds = time.perf_counter() - start
    tok.save(root / cfg.out_dir)
    n_tokens, n_bytes = val_bytes_per_token(root, params, tok)
    return {
        "vocab_size": tok.vocab_size,
        "val_bytes_per_token": round(n_bytes / max(n_tokens, 1), 4),
        "val_tokens": n_tokens,
        "val_bytes": n_bytes,
        # The training input: the budget sample (or everything) and what it was drawn from.
        "train_documents": sample["documents"],
        "train_bytes": sample["bytes"],
        "train_corpus_documents": sample["corpus_documents"],
        "train_corpus_bytes": sample["corpus_bytes"],
        "train_input_mb_per_second": sample["mb_per_second"],
        "train_seconds": round(seconds, 3),
    }
