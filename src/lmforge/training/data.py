"""Token-shard data: flat numpy memmaps plus a `shards.json` sidecar.

Layout of a shard directory::

    train.bin, val.bin          flat token ids (uint16 or uint32), no headers: a split in one file
    train-00000.bin, ...        or a split over several files, concatenated in index order
    shards.json                 {"dtype", "vocab_size", "tokens": {split: n}, "bytes": {split: n},
                                 "bos_id", "eos_id", "files": {split: [{"name", "tokens", ...}, ...]}}

(`files` may be absent: then each split is the one file `<split>.bin`.)

A split is read as one token stream, its files concatenated logically (`TokenStream`, memmaps
underneath): the shards stage cuts files only between documents, so the stream is the same
whatever the file size, and so are the windows, which may span two files like any two documents.

Training windows are random but a pure function of (seed, global batch index): batch g starts its
windows at uniform positions drawn from default_rng([seed, 0, g]). DDP rank r of w takes the
global batches i*w + r, so ranks never share a batch and one step of w ranks sees the same windows
as one process accumulating w batches (the stream does not depend on the world size); a resumed
run replays exactly the batches an uninterrupted run would have seen. Windows are drawn with
replacement, so two of them (on one rank or two) overlap only by chance.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

SIDECAR = "shards.json"
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass(frozen=True)
class ShardFile:
    """One file of a split: its name in the shard directory and its token count."""

    name: str
    tokens: int


@dataclass(frozen=True)
class ShardInfo:
    """Parsed `shards.json` sidecar."""

    dtype: str
    vocab_size: int
    tokens: dict[str, int]
    bytes: dict[str, int]
    bos_id: int
    eos_id: int
    # Each split's files in stream order; a split missing here is the one file <split>.bin.
    files: dict[str, tuple[ShardFile, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, shard_dir: str | Path) -> ShardInfo:
        path = Path(shard_dir) / SIDECAR
        if not path.is_file():
            raise FileNotFoundError(
                f"missing shard sidecar {path}; token shards need {SIDECAR} next to the .bin files"
            )
        try:
            raw = json.loads(path.read_text())
            info = cls(
                dtype=str(raw["dtype"]),
                vocab_size=int(raw["vocab_size"]),
                tokens={k: int(v) for k, v in raw["tokens"].items()},
                bytes={k: int(v) for k, v in raw["bytes"].items()},
                bos_id=int(raw["bos_id"]),
                eos_id=int(raw["eos_id"]),
                files={
                    split: tuple(ShardFile(str(f["name"]), int(f["tokens"])) for f in files)
                    for split, files in (raw.get("files") or {}).items()
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed shard sidecar {path}: {e!r}") from e
        if info.dtype not in _DTYPES:
            raise ValueError(f"{path}: dtype must be one of {sorted(_DTYPES)}, got {info.dtype!r}")
        if info.dtype == "uint16" and info.vocab_size > 2**16:
            raise ValueError(f"{path}: vocab_size {info.vocab_size} does not fit dtype uint16")
        for split, files in info.files.items():
            if any(Path(f.name).name != f.name or not f.name.endswith(".bin") for f in files):
                raise ValueError(f"{path}: files of {split!r} must be .bin names in the shard directory")
            if sum(f.tokens for f in files) != info.tokens.get(split):
                raise ValueError(f"{path}: the files of {split!r} do not add up to its token count")
        return info

    @property
    def np_dtype(self) -> type[np.unsignedinteger]:
        return _DTYPES[self.dtype]

    def split_files(self, split: str) -> tuple[ShardFile, ...]:
        """The files of `split` in stream order."""
        if split not in self.tokens:
            raise ValueError(f"sidecar has no token count for split {split!r}")
        return self.files.get(split) or (ShardFile(f"{split}.bin", self.tokens[split]),)

    def tokens_per_byte(self, split: str = "val") -> float | None:
        """Tokens per UTF-8 byte of `split` (for bits-per-byte), None when unknown."""
        n_bytes = self.bytes.get(split, 0)
        return self.tokens[split] / n_bytes if n_bytes > 0 and split in self.tokens else None


class TokenStream:
    """The files of a split as one read-only token sequence (memmaps underneath).

    Supports `len`, an int index, a slice with step 1 (a view inside one file, a copy across
    files) and `np.asarray` (the whole split, in memory)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.dtype = parts[0].dtype if parts else np.dtype(np.uint16)
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                raise ValueError("TokenStream slices take step 1")
            if a >= b:
                return np.empty(0, self.dtype)
            first = int(np.searchsorted(self.starts, a, side="right")) - 1
            last = int(np.searchsorted(self.starts, b - 1, side="right")) - 1
            pieces = [
                self.parts[f][
                    max(a, self.starts[f]) - self.starts[f] : min(b, self.starts[f + 1]) - self.starts[f]
                ]
                for f in range(first, last + 1)
            ]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        i = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"index {key} out of range for {len(self)} tokens")
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[f][i - self.starts[f]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate(self.parts) if self.parts else np.empty(0, self.dtype)
        return whole if dtype is None else whole.astype(dtype, copy=False)


def load_shards(shard_dir: str | Path, split: str, info: ShardInfo | None = None) -> list[np.ndarray]:
    """Open every file of `split` read-only (memmaps; an empty file as an empty array), each
    checked against the sidecar."""
    info = info or ShardInfo.load(shard_dir)
    if split not in info.tokens:
        raise ValueError(f"sidecar of {shard_dir} has no token count for split {split!r}")
    itemsize = np.dtype(info.np_dtype).itemsize
    out: list[np.ndarray] = []
    for f in info.split_files(split):
        path = Path(shard_dir) / f.name
        if not path.is_file():
            raise FileNotFoundError(f"missing token shard {path}")
        size, expected = path.stat().st_size, f.tokens * itemsize
        if size != expected:
            raise ValueError(
                f"{path} is {size} bytes but sidecar says {f.tokens} tokens x {itemsize} bytes "
                f"({info.dtype}) = {expected}; wrong dtype or truncated shard?"
            )
        out.append(np.memmap(path, dtype=info.np_dtype, mode="r") if size else np.empty(0, info.np_dtype))
    return out


def load_shard(shard_dir: str | Path, split: str, info: ShardInfo | None = None) -> np.ndarray | TokenStream:
    """The token stream of `split`: the file's memmap when the split is one file, else a
    `TokenStream` over its files (indexable like an array; `np.asarray` gives the whole split)."""
    parts = load_shards(shard_dir, split, info)
    return parts[0] if len(parts) == 1 else TokenStream(parts)


def _window_batch(
    data: np.ndarray | TokenStream, starts: np.ndarray, block_size: int
) -> dict[str, torch.Tensor]:
    w = np.stack([np.asarray(data[s : s + block_size + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(w)
    return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}


class RandomWindows(IterableDataset):
    """Infinite stream of whole batches for rank `rank` of `world`: its batch i is the global batch
    g = i*world + rank, whose windows start at positions drawn from default_rng([seed, 0, g])
    (the 0 keeps the stream a single process has always drawn)."""

    def __init__(
        self,
        data: np.ndarray | TokenStream,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        start_batch: int = 0,
        *,
        world: int = 1,
    ) -> None:
        if len(data) < block_size + 1:
            raise ValueError(f"shard has {len(data)} tokens, fewer than block_size+1={block_size + 1}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.seed, self.rank, self.world, self.start_batch = seed, rank, world, start_batch

    def global_batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch `index` of the one global stream (whichever rank takes it)."""
        rng = np.random.default_rng([self.seed, 0, index])
        starts = rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        return _window_batch(self.data, starts, self.block_size)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """This rank's batch `index`."""
        return self.global_batch(index * self.world + self.rank)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        i = self.start_batch
        while True:
            yield self.batch(i)
            i += 1


class SeededBatches(IterableDataset):
    """Endless batches of `items`: batch i is slots [i*bs, (i+1)*bs) of a stream of per-epoch
    permutations, epoch e's from default_rng([seed, e]). A pure function of (seed, i): a resumed run
    (`start` = batches already consumed) sees exactly the batches an uninterrupted run would, and
    DDP ranks interleave global batches (rank r of w takes i*w + r), so they never share one.
    """

    def __init__(
        self,
        items: Sequence[Any],
        batch_size: int,
        seed: int,
        *,
        collate: Callable[[list[Any]], Any] = list,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if not len(items) or batch_size < 1:
            raise ValueError("SeededBatches needs at least one item and batch_size >= 1")
        self.items, self.batch_size, self.seed, self.collate = items, batch_size, seed, collate
        self.start, self.rank, self.world = start, rank, world

    def indices(self, index: int) -> list[int]:
        n, out, perms = len(self.items), [], {}
        for slot in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch = slot // n
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.append(int(perms[epoch][slot % n]))
        return out

    def batch(self, index: int) -> Any:
        return self.collate([self.items[j] for j in self.indices(index)])

    def __iter__(self) -> Iterator[Any]:
        i = self.start
        while True:
            yield self.batch(i * self.world + self.rank)
            i += 1


def consumed_batches(trainer: Any) -> int:
    """Batches a (resumed) run has already taken from its stream: Lightning restores global_step
    before it builds the loaders, and each optimizer step takes `accumulate_grad_batches` batches.
    """
    return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches


def content_digest(*parts: Any) -> str:
    """sha256 of JSON-able parts (examples, id lists, settings): a data module's fingerprint."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


class FixedWindows(Dataset):
    """Consecutive windows with stride block_size from the start of a split (each target scored once)."""

    def __init__(
        self, data: np.ndarray | TokenStream, block_size: int, max_windows: int | None = None
    ) -> None:
        n = max(0, (len(data) - 1) // block_size)
        self.data, self.block_size = data, block_size
        self.n = n if max_windows is None else min(n, max_windows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = _window_batch(self.data, np.array([i * self.block_size]), self.block_size)
        return {k: v[0] for k, v in b.items()}


class TokenShardDataModule(L.LightningDataModule):
    """Random training windows from the train split, fixed validation windows from the val split."""

    def __init__(
        self, shard_dir: str | Path, block_size: int, batch_size: int, seed: int = 1337, val_batches: int = 20
    ) -> None:
        super().__init__()
        if block_size < 1 or batch_size < 1 or val_batches < 0:
            raise ValueError("block_size and batch_size must be >= 1 and val_batches >= 0")
        self.shard_dir, self.block_size, self.batch_size = Path(shard_dir), block_size, batch_size
        self.seed, self.val_batches = seed, val_batches
        self.info = ShardInfo.load(self.shard_dir)
        self._train: np.ndarray | TokenStream | None = None
        self._val: np.ndarray | TokenStream | None = None

    def _has_split(self, split: str) -> bool:
        return split in self.info.tokens and all(
            (self.shard_dir / f.name).exists() for f in self.info.split_files(split)
        )

    def setup(self, stage: str | None = None) -> None:
        # Opened here, not in __init__, so the module pickles cheaply for spawn-style launchers.
        if self._train is None:
            self._train = load_shard(self.shard_dir, "train", self.info)
        if self._val is None and self._has_split("val"):
            self._val = load_shard(self.shard_dir, "val", self.info)

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)  # plain attribute, set by Lightning when attached
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _start_batch(self) -> int:
        return consumed_batches(getattr(self, "trainer", None))  # resume: right after them

    def train_dataset(self) -> RandomWindows:
        self.setup("fit")
        rank, world = self._rank_world()
        assert self._train is not None
        return RandomWindows(
            self._train, self.block_size, self.batch_size, self.seed, rank, self._start_batch(), world=world
        )

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the dataset already yields whole batches.
        return DataLoader(self.train_dataset(), batch_size=None, num_workers=0)

    def val_dataset(self) -> FixedWindows:
        self.setup("validate")
        if self._val is None:
            names = (
                [f.name for f in self.info.split_files("val")] if "val" in self.info.tokens else ["val.bin"]
            )
            raise FileNotFoundError(f"missing token shard {self.shard_dir / names[0]}")
        return FixedWindows(self._val, self.block_size, self.val_batches * self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset(), batch_size=self.batch_size, shuffle=False, num_workers=0)

    def state_dict(self) -> dict[str, Any]:
        # Recorded for provenance; the stream position itself is derived from global_step.
        return {"seed": self.seed, "block_size": self.block_size, "batch_size": self.batch_size}

    def fingerprint(self) -> str:
        """The shards' sidecar, file sizes and settings (cheap at any size; the sidecar holds counts)."""
        names = sorted({f.name for split in self.info.tokens for f in self.info.split_files(split)})
        sizes = {n: (self.shard_dir / n).stat().st_size for n in names if (self.shard_dir / n).exists()}
        sidecar = (self.shard_dir / SIDECAR).read_text()
        return content_digest(sidecar, sizes, self.state_dict(), self.val_batches)
