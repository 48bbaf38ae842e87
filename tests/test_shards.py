"""The shards stage: documents streamed from the ingested splits, encoded on worker processes and
written to one or more files per split; the same bytes for any `num_proc` and any file size,
written atomically with the sidecar last; read back by the pretraining data module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.stages import is_run_record_key, shards, tokenizer
from lmforge.tokenizer import ChatTokenizer, train_bpe
from lmforge.training import ShardInfo, TokenShardDataModule, load_shard
from test_tokenizer import DOCS, tiny_project

LONG = "a long document that needs more than one file of its own. " * 60
TRAIN = [" ".join(DOCS[i : i + 3]) for i in range(0, 300, 2)] + [LONG] + DOCS[:20]
VAL = DOCS[300:]
LIMIT = 200  # shard_tokens for the several-files layout


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "BATCH_ROWS", 8)  # many batches in flight on the workers
    params = tiny_project(tmp_path, TRAIN, VAL)
    tok = ChatTokenizer(train_bpe(TRAIN, vocab_size=300))
    tok.save(tmp_path / params.tokenizer.out_dir)
    return tmp_path, params, tok


def with_cfg(params, **cfg):
    return params.model_copy(update={"tokenizer": params.tokenizer.model_copy(update=cfg)})


def run(root: Path, params, **cfg) -> dict:
    metrics = shards.run(with_cfg(params, **cfg), root)
    return {k: v for k, v in metrics.items() if not is_run_record_key(k)}


def outputs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "data/tokens").iterdir())}


def split_stream(root: Path, split: str) -> bytes:
    info = json.loads((root / "data/tokens/shards.json").read_text())
    return b"".join((root / "data/tokens" / f["name"]).read_bytes() for f in info["files"][split])


def test_same_bytes_for_any_num_proc_and_file_size(project):
    root, params, tok = project
    metrics = run(root, params, num_proc=1)
    one = outputs(root)
    assert sorted(one) == ["shards.json", "train.bin", "val.bin"]  # the default: one file per split
    assert metrics["files"] == {"train": 1, "val": 1} and metrics["documents"]["train"] == len(TRAIN)
    # Each document is <|bos|> + its ids, back to back, in corpus order (what the stage always wrote).
    expected = np.concatenate([[tok.bos_id, *tok.encode(t)] for t in TRAIN]).astype(np.uint16)
    assert one["train.bin"] == expected.tobytes()
    assert run(root, params, num_proc=2) == metrics
    assert outputs(root) == one

    several = run(root, params, num_proc=2, shard_tokens=LIMIT)
    many = outputs(root)
    assert run(root, params, num_proc=1, shard_tokens=LIMIT) == several
    assert outputs(root) == many  # byte-identical files under 1 and 2 processes
    # Concatenated in index order, the files are the one-file split.
    assert split_stream(root, "train") == one["train.bin"] and split_stream(root, "val") == one["val.bin"]
    info = json.loads(many["shards.json"])
    files = info["files"]["train"]
    assert several["files"]["train"] == len(files) > 3
    assert [f["name"] for f in files] == [f"train-{k:05d}.bin" for k in range(len(files))]
    assert sum(f["documents"] for f in files) == len(TRAIN) and sum(f["tokens"] for f in files) == len(
        expected
    )
    assert sum(f["bytes"] for f in files) == info["bytes"]["train"] == sum(len(t.encode()) for t in TRAIN)
    for f in files:
        assert np.frombuffer(many[f["name"]], dtype=np.uint16)[0] == tok.bos_id  # files start at a document
        assert f["tokens"] <= LIMIT or f["documents"] == 1  # only a document longer than a file overflows
    assert any(f["tokens"] > LIMIT for f in files)  # LONG
    assert {k: v for k, v in several.items() if k != "files"} == {
        k: v for k, v in metrics.items() if k != "files"
    }


def test_data_module_reads_several_files_as_the_one_file_stream(project, tmp_path):
    root, params, _ = project
    run(root, params, num_proc=2)
    single = tmp_path / "single"
    (root / "data/tokens").rename(single)
    run(root, params, num_proc=2, shard_tokens=LIMIT)
    multi = root / "data/tokens"
    assert ShardInfo.load(multi).tokens_per_byte("val") == ShardInfo.load(single).tokens_per_byte("val")
    assert np.array_equal(np.asarray(load_shard(multi, "train")), load_shard(single, "train"))
    a = TokenShardDataModule(multi, block_size=64, batch_size=4, seed=1, val_batches=3)
    b = TokenShardDataModule(single, block_size=64, batch_size=4, seed=1, val_batches=3)
    for i in range(10):
        assert torch.equal(a.train_dataset().batch(i)["input_ids"], b.train_dataset().batch(i)["input_ids"])
    for u, v in zip(a.val_dataloader(), b.val_dataloader(), strict=True):
        assert torch.equal(u["labels"], v["labels"])


def test_writer_gives_a_long_document_its_own_file_and_an_empty_split_one_empty_file(tmp_path):
    dtype = np.dtype(np.uint16)
    with shards.ShardWriter(tmp_path, "train", dtype, shard_tokens=10) as w:
        lengths = np.array([4, 5, 12, 3, 7, 1])
        w.write(np.arange(lengths.sum(), dtype=dtype), lengths, lengths * 2)
        files = w.finish()
    assert [(f["name"], f["tokens"], f["documents"]) for f in files] == [
        ("train-00000.bin", 9, 2),
        ("train-00001.bin", 12, 1),
        ("train-00002.bin", 10, 2),
        ("train-00003.bin", 1, 1),
    ]
    stream = np.concatenate([np.fromfile(tmp_path / f["name"], dtype=dtype) for f in files])
    assert np.array_equal(stream, np.arange(32))
    with shards.ShardWriter(tmp_path, "val", dtype, shard_tokens=10) as w:
        files = w.finish()
    assert files == [{"name": "val.bin", "tokens": 0, "bytes": 0, "documents": 0}]
    assert (tmp_path / "val.bin").stat().st_size == 0


def test_a_new_layout_replaces_the_old_and_a_failed_run_leaves_nothing_readable(project, monkeypatch):
    root, params, _ = project
    out = root / "data/tokens"
    run(root, params, num_proc=1, shard_tokens=LIMIT)
    assert len(list(out.glob("train-*.bin"))) > 3
    run(root, params, num_proc=1)
    assert sorted(p.name for p in out.iterdir()) == ["shards.json", "train.bin", "val.bin"]

    calls = []

    def failing(texts, tok, dtype):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("killed")
        return real(texts, tok, dtype)

    real = shards.encode_documents
    monkeypatch.setattr(shards, "encode_documents", failing)
    with pytest.raises(RuntimeError, match="killed"):
        run(root, params, num_proc=1, shard_tokens=LIMIT)
    # The old sidecar went first and no new one came: nothing readable, no temporary file left.
    with pytest.raises(FileNotFoundError, match="shards.json"):
        ShardInfo.load(out)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
