"""Stage `shards`: encode the text splits once into flat memmap token files for pretraining.

Layout (read by `lmforge.training.data`): each document is `<|bos|> + ids`, back to back, in uint16
(uint32 when the vocabulary needs it). A split goes to files of at most `tokenizer.shard_tokens`
tokens, documents whole (one longer than that gets a file of its own): `<split>.bin` when the split
fits in one file, else `<split>-00000.bin`, `<split>-00001.bin`, ... The files of a split,
concatenated in index order, are its token stream: the same bytes for any `shard_tokens` and any
`num_proc`. `shards.json` records dtype, vocab size, per split the token, byte and document
counts, the special ids, and the index `files: {split: [{name, tokens, bytes, documents}, ...]}`.

Encoding: batches of documents stream from the split's Parquet file(s) to `tokenizer.num_proc`
worker processes and come back in order (at most two batches per worker in flight, so memory
stays flat); num_proc 1 encodes in this process. Writing: every file atomically; the old sidecar
goes first and the new one comes last (shards are only read through it, so a killed run leaves
nothing readable), and files of an earlier layout that the new index does not list are removed.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import atomic_path, atomic_write_text, remove_stale_temporaries
from lmforge.params import Params
from lmforge.progress import Progress
from lmforge.stages.tokenizer import count_values, iter_column, split_files
from lmforge.tokenizer import ChatTokenizer

SPLITS = ("train", "val")
SIDECAR = "shards.json"  # lmforge.training.data.SIDECAR (not imported: that module loads Lightning)
_PARALLELISM = "TOKENIZERS_PARALLELISM"

# (token ids, tokens per document, UTF-8 bytes per document) of one batch of documents.
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if count is not None:
        return count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# ---- encoding ---------------------------------------------------------------------------------
def encode_documents(texts: Any, tok: ChatTokenizer, dtype: np.dtype) -> Encoded:
    """`<|bos|> + ids` of each document of `texts` (a list of str or an Arrow string array), back to back."""
    texts = texts.to_pylist() if hasattr(texts, "to_pylist") else list(texts)
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(
        chain.from_iterable(chain((tok.bos_id,), x) for x in ids), dtype=dtype, count=int(lengths.sum())
    )
    doc_bytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    return flat, lengths, doc_bytes


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, dtype: str) -> None:
    from tokenizers import Tokenizer

    os.environ[_PARALLELISM] = "false"  # one thread per worker: the processes are the parallelism
    _WORKER.update(tok=ChatTokenizer(Tokenizer.from_str(tokenizer_json)), dtype=np.dtype(dtype))


def _encode_in_worker(texts: Any) -> Encoded:
    return encode_documents(texts, _WORKER["tok"], _WORKER["dtype"])


def _in_order(pool: Any, batches: Iterable[Any], window: int) -> Iterator[Encoded]:
    """`pool` maps the batches, results in input order, at most `window` batches in flight
    (Pool.imap would read the whole input ahead)."""
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(_encode_in_worker, (batch,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@contextlib.contextmanager
def encoder(
    tok: ChatTokenizer, dtype: np.dtype, num_proc: int
) -> Iterator[Callable[[Iterable[Any]], Iterator[Encoded]]]:
    """A function from batches of documents to their `Encoded` batches, in order, on `num_proc`
    processes, started by a fork server where there is one (spawned elsewhere): never forked from
    this process, which has threads (MLflow's, Prefect's), where a fork can copy a held lock into
    the child and hang it."""
    if num_proc <= 1:
        yield lambda batches: (encode_documents(b, tok, dtype) for b in batches)
        return
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    saved = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = "false"  # inherited by the workers: no fork warning from tokenizers
    try:
        pool = ctx.Pool(num_proc, _init_worker, (tok.tok.to_str(), dtype.name))
    finally:
        if saved is None:
            os.environ.pop(_PARALLELISM, None)
        else:
            os.environ[_PARALLELISM] = saved
    with pool:  # terminates the workers on the way out
        yield lambda batches: _in_order(pool, batches, 2 * num_proc)


# ---- writing ----------------------------------------------------------------------------------
class ShardWriter:
    """Writes one split's documents to files of at most `shard_tokens` tokens (see module docstring).

    Use as a context manager: on an exception the file being written is discarded. `files` is the
    split's index once `finish()` returned."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.files: list[dict] = []
        self._stack: contextlib.ExitStack | None = None
        self._fh: Any = None
        self._cur: dict = {}

    def _open(self) -> None:
        name = f"{self.split}-{len(self.files):05d}.bin"
        stack = contextlib.ExitStack()
        tmp = stack.enter_context(atomic_path(self.out / name))
        self._fh = stack.enter_context(tmp.open("wb"))
        self._stack = stack
        self._cur = {"name": name, "tokens": 0, "bytes": 0, "documents": 0}

    def _close(self) -> None:
        assert self._stack is not None
        self._stack.close()  # closes the file, then moves it into place
        self._stack = None
        self.files.append(self._cur)

    def write(self, flat: np.ndarray, lengths: np.ndarray, doc_bytes: np.ndarray) -> None:
        ends = np.cumsum(lengths)
        i = t = 0  # next document, its first token in `flat`
        while i < len(lengths):
            if self._stack is None:
                self._open()
            room = self.shard_tokens - self._cur["tokens"]  # < 0 after a document longer than a file
            k = int(np.searchsorted(ends, t + room, side="right")) if room > 0 else i  # i..k-1 fit
            if k <= i:
                if self._cur["tokens"]:  # the next document starts a new file
                    self._close()
                    continue
                k = i + 1  # longer than a whole file: a file of its own
            end = int(ends[k - 1])
            flat[t:end].tofile(self._fh)
            self._cur["tokens"] += end - t
            self._cur["documents"] += k - i
            self._cur["bytes"] += int(doc_bytes[i:k].sum())
            i, t = k, end

    def finish(self) -> list[dict]:
        if self._stack is None and not self.files:
            self._open()  # an empty split: one empty file, as before
        if self._stack is not None:
            self._close()
        if len(self.files) == 1:  # one file keeps the plain name
            name = f"{self.split}.bin"
            os.replace(self.out / self.files[0]["name"], self.out / name)
            self.files[0]["name"] = name
        return self.files

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:  # only after an exception: finish() closed it otherwise
            self._stack.__exit__(*exc)  # discards the temporary file
            self._stack = None


def remove_other_shards(out: Path, index: dict[str, list[dict]]) -> list[Path]:
    """Delete `<split>.bin` / `<split>-NNNNN.bin` files that `index` does not list (an old layout)."""
    removed = []
    for split, files in index.items():
        keep = {f["name"] for f in files}
        for path in sorted({*out.glob(f"{split}.bin"), *out.glob(f"{split}-[0-9]*.bin")}):
            if path.name not in keep:
                path.unlink()
                removed.append(path)
    return removed


def run(params: Params, root: Path) -> dict:
    cfg = params.tokenizer
    tok = ChatTokenizer.load(root / cfg.out_dir)
    out = root / cfg.shards_dir
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    (out / SIDECAR).unlink(missing_ok=True)  # until the new one: no readable half-written shards
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    info: dict = {
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "tokens": {},
        "bytes": {},
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "documents": {},
        "files": {},
    }
    rates = {}
    with encoder(tok, dtype, cfg.num_proc or available_cpus()) as encode:
        for split in SPLITS:
            sources = split_files(root, params.ingest.out_dir, "text", split)
            with (
                Progress(f"shards: {split}", total=count_values(sources)) as bar,
                ShardWriter(out, split, dtype, cfg.shard_tokens) as writer,
            ):
                for flat, lengths, doc_bytes in encode(iter_column(sources, "text")):
                    writer.write(flat, lengths, doc_bytes)
                    bar.update(len(lengths), int(doc_bytes.sum()))
                files = writer.finish()
            rates[split] = bar.mb_per_second
            info["files"][split] = files
            for key in ("tokens", "bytes", "documents"):
                info[key][split] = sum(f[key] for f in files)
    remove_other_shards(out, info["files"])
    # The sidecar last: shards are only read through it.
    atomic_write_text(out / SIDECAR, json.dumps(info, indent=2) + "\n")
    return {
        "tokens": info["tokens"],
        "bytes": info["bytes"],
        "documents": info["documents"],
        "files": {split: len(files) for split, files in info["files"].items()},
        "val_tokens_per_byte": round(info["tokens"]["val"] / max(info["bytes"]["val"], 1), 5),
        "encode_mb_per_second": round(rates["train"], 3),
    }
