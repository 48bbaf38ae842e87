"""Streaming ingest: lazy readers, Parquet in batches, HF streaming, row-group output, dedup by
digest, all-or-nothing outputs, and the same bytes and order as the whole-table writer."""

import gzip
import json
import os
import random

import datasets
import pyarrow.parquet as pq
import pytest
import zstandard

import lmforge.ingest.readers as readers
import lmforge.ingest.streams as streams
import lmforge.ingest.writer as writer_mod
import lmforge.progress as progress_mod
from lmforge.ingest.build import ingest, load_split
from lmforge.ingest.clean import Deduper, clean_text, is_val
from lmforge.ingest.readers import IngestError, Problems, read_source
from lmforge.ingest.writer import Outputs, features
from lmforge.params import IngestParams, SourceSpec


def run(tmp_path, mode="strict", **sources):
    params = IngestParams(mode=mode, out_dir=str(tmp_path / "out"), min_chars=1, **sources)
    return ingest(params, tmp_path)


def rows(tmp_path, kind="text", split=None):
    """Rows of the outputs in file order (train, then val)."""
    out = str(tmp_path / "out")
    return [r for s in ([split] if split else ["train", "val"]) for r in load_split(tmp_path, out, kind, s)]


def jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


class Spy:
    """A progress stand-in: what the readers told it."""

    def __init__(self):
        self.total, self.bytes = None, 0

    def set_total(self, n):
        self.total = n

    def add_bytes(self, n):
        self.bytes += n


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


# --- lazy readers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, compress",
    [
        ("big.jsonl", lambda b: b),
        ("big.jsonl.gz", gzip.compress),
        ("big.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    ],
)
def test_readers_stream_records_before_the_file_is_read(tmp_path, monkeypatch, name, compress):
    monkeypatch.setattr(streams, "CHUNK", 4096)
    rng = random.Random(0)
    docs = [rng.randbytes(200).hex() for _ in range(3000)]  # ~1.2 MB, barely compressible
    f = tmp_path / name
    f.write_bytes(compress(jsonl(docs)))
    spy = Spy()
    records = read_source(SourceSpec(path=str(f)), Problems(strict=True), spy)
    where, first = next(records)
    assert first == {"text": docs[0]} and where.line == 1
    assert spy.total == f.stat().st_size and 0 < spy.bytes < spy.total / 4  # only the first chunks
    assert [r["text"] for _, r in records] == docs[1:]
    assert spy.bytes == spy.total  # every byte of the file, compressed bytes when compressed


def test_parquet_is_read_in_record_batches_not_whole(tmp_path, monkeypatch):
    table_rows = [{"text": f"row {i}", "n": i} for i in range(1000)]
    f = tmp_path / "t.parquet"
    pq.write_table(datasets.Dataset.from_list(table_rows).data.table, f, row_group_size=100)

    def no_whole_table(*args, **kwargs):
        raise AssertionError("read the whole table")

    monkeypatch.setattr(pq, "read_table", no_whole_table)
    monkeypatch.setattr(datasets, "load_dataset", no_whole_table)
    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 64)
    batches = []
    real_iter = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in real_iter(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    spy = Spy()
    records = read_source(SourceSpec(path=str(f)), Problems(strict=True), spy)
    assert next(records)[1] == table_rows[0] and batches == [64]  # one batch decoded so far
    got = [table_rows[0]] + [r for _, r in records]
    assert got == table_rows and max(batches) <= 64 and sum(batches) == 1000
    assert spy.bytes == spy.total == f.stat().st_size
    wheres = [w for w, _ in read_source(SourceSpec(path=str(f)), Problems(strict=True))]
    assert (str(wheres[0]), wheres[-1].line) == (f"{f}:row 1", 1000)


def test_compressed_parquet_and_a_damaged_parquet(tmp_path):
    f = tmp_path / "t.parquet"
    datasets.Dataset.from_list([{"text": "zipped parquet"}]).to_parquet(str(f))
    (tmp_path / "t.parquet.zst").write_bytes(zstandard.ZstdCompressor().compress(f.read_bytes()))
    run(tmp_path, text_sources=[{"path": str(tmp_path / "t.parquet.zst")}])
    assert [r["text"] for r in rows(tmp_path)] == ["zipped parquet"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(IngestError, match=r"bad\.parquet: cannot read as parquet"):
        run(tmp_path, text_sources=[{"path": str(tmp_path / "bad.parquet")}])


# --- Hugging Face datasets, streaming ------------------------------------------------------------


def test_hf_dataset_is_loaded_streaming(tmp_path, monkeypatch):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"hub {i}"}) + "\n" for i in range(5)))
    calls = []
    real_load = datasets.load_dataset

    def spy_load(*args, **kwargs):
        calls.append(kwargs)
        ds = real_load(*args, **kwargs)
        assert isinstance(ds, datasets.IterableDataset)
        return ds

    monkeypatch.setattr(datasets, "load_dataset", spy_load)
    spy = Spy()
    got = list(read_source(SourceSpec(hf_dataset=str(folder)), Problems(strict=True), spy))
    assert [r["text"] for _, r in got] == [f"hub {i}" for i in range(5)]
    assert str(got[0][0]) == f"hf:{folder}[train]:row 1"
    assert calls and all(c.get("streaming") is True for c in calls)
    assert spy.total is None  # the size of a hub dataset is not known up front
    metrics = run(tmp_path, text_sources=[{"hf_dataset": str(folder)}])
    assert metrics["text"]["kept"] == 5


def test_hf_dataset_error_while_streaming_is_an_ingest_error(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(IngestError, match=r"hub_like: cannot load Hugging Face dataset \(split 'train'\)"):
        run(tmp_path, text_sources=[{"hf_dataset": str(folder)}])


def test_csv_is_read_streaming(tmp_path, monkeypatch):
    (tmp_path / "d.csv").write_text("text,n\nfirst,1\nsecond,2\n")
    calls = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    got = [
        (w.line, r) for w, r in read_source(SourceSpec(path=str(tmp_path / "d.csv")), Problems(strict=True))
    ]
    assert got == [(1, {"text": "first", "n": 1}), (2, {"text": "second", "n": 2})]
    assert [c["streaming"] for c in calls] == [True]


# --- de-duplication by digest --------------------------------------------------------------------


def test_dedup_across_sources_keeps_the_first_occurrence(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.txt"
    a.write_bytes(jsonl(["shared doc", "only in a", "shared   doc "]))  # the third cleans to the first
    b.write_text("only in b\nshared doc\nonly in a\n")
    metrics = run(tmp_path, text_sources=[{"path": str(a)}, {"path": str(b), "split_on": "line"}])
    got = sorted((r["text"], r["source"]) for r in rows(tmp_path))
    assert got == [("only in a", str(a)), ("only in b", str(b)), ("shared doc", str(a))]
    assert metrics["text"]["sources"][str(a)]["dropped"] == {"duplicate": 1}
    assert metrics["text"]["sources"][str(b)]["dropped"] == {"duplicate": 2}


def test_deduper_keeps_digests_not_examples_and_merges_exactly(monkeypatch):
    monkeypatch.setattr(Deduper, "PENDING_MAX", 7)  # many merges into the sorted array
    rng = random.Random(1)
    stream = [{"text": f"doc {rng.randrange(300)}"} for _ in range(2000)]
    dedup, seen = Deduper(), set()
    for example in stream:
        assert dedup.is_new(example) == (example["text"] not in seen)
        seen.add(example["text"])
    assert len(dedup) == len(seen)
    assert dedup._sorted.dtype.itemsize == 8 and not any(isinstance(v, dict) for v in dedup._pending)


def test_clean_text_fast_paths_match_the_regular_expressions():
    rng = random.Random(2)
    alphabet = "ab \t\u00a0\n\r\x00\u2028e\u0301"
    import re
    import unicodedata

    def reference(text):
        text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
        text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text)
        lines = [re.sub(r"[ \t\u00a0]+", " ", line).rstrip() for line in text.split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()

    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert clean_text(text) == reference(text), repr(text)


# --- outputs: row groups, order, bytes, all or nothing -------------------------------------------

DOCS = [f"document {i} " + "word " * (i % 13) for i in range(400)]


def test_outputs_are_written_in_row_groups_in_source_order(tmp_path, monkeypatch):
    f = tmp_path / "a.jsonl"
    f.write_bytes(jsonl(DOCS + DOCS[:50]))  # 50 duplicates at the end
    run(tmp_path, text_sources=[{"path": str(f)}])
    whole = {s: pq.read_table(tmp_path / "out" / "text" / f"{s}.parquet") for s in ("train", "val")}
    monkeypatch.setattr(writer_mod, "ROW_GROUP_BYTES", 1000)
    metrics = run(tmp_path, text_sources=[{"path": str(f)}])
    expected = [d.strip() for d in DOCS]
    for split in ("train", "val"):
        path = tmp_path / "out" / "text" / f"{split}.parquet"
        assert pq.ParquetFile(path).metadata.num_row_groups > 1
        want = [t for t in expected if is_val({"text": t}, 0.1, "lmforge") == (split == "val")]
        assert [r["text"] for r in rows(tmp_path, split=split)] == want  # read order, split by content hash
        assert pq.read_table(path).equals(whole[split])  # same rows as one row group
    assert metrics["text"]["kept"] == 400 and metrics["text"]["dropped"] == {"duplicate": 50}
    monkeypatch.setattr(writer_mod, "ROW_GROUP_BYTES", 1 << 30)
    monkeypatch.setattr(writer_mod, "ROW_GROUP_ROWS", 25)  # many tiny rows: the row cap decides
    run(tmp_path, text_sources=[{"path": str(f)}])
    train = pq.ParquetFile(tmp_path / "out" / "text" / "train.parquet").metadata
    assert (
        train.num_row_groups > 10
        and max(train.row_group(i).num_rows for i in range(train.num_row_groups)) == 25
    )
    assert pq.read_table(tmp_path / "out" / "text" / "train.parquet").equals(whole["train"])


@pytest.mark.parametrize(
    "kind, row",
    [
        ("text", {"text": "héllo\nworld"}),
        ("sft", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}),
        ("preference", {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "A.", "rejected": "B"}),
    ],
)
def test_one_row_group_is_byte_identical_to_dataset_to_parquet(tmp_path, kind, row):
    table = [{**row, "source": f"src{i % 3}"} for i in range(200)]
    with Outputs() as outputs:
        split = outputs.split(tmp_path / "streamed.parquet", kind)
        for r in table:
            split.add(dict(r), 10)
    empty = tmp_path / "empty.parquet"
    with Outputs() as outputs:
        outputs.split(empty, kind)
    feats = features(kind)
    for n, path in ((200, tmp_path / "streamed.parquet"), (0, empty)):
        columns = {name: [r[name] for r in table[:n]] for name in feats}
        datasets.Dataset.from_dict(columns, features=feats).to_parquet(str(tmp_path / "reference.parquet"))
        assert path.read_bytes() == (tmp_path / "reference.parquet").read_bytes()


def test_small_corpus_gives_the_expected_rows_in_order(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_bytes(jsonl(["gamma", "alpha", "  alpha ", "beta", "x" * 3]))
    b = tmp_path / "b.txt"
    b.write_text("delta\n\nalpha\n\nepsilon\n")
    params = IngestParams(
        out_dir=str(tmp_path / "out"),
        min_chars=4,
        val_fraction=0.5,
        text_sources=[{"path": str(a), "name": "a"}, {"path": str(b), "name": "b"}],
    )
    metrics = ingest(params, tmp_path)
    kept = [("gamma", "a"), ("alpha", "a"), ("beta", "a"), ("delta", "b"), ("epsilon", "b")]
    for split in ("train", "val"):
        want = [(t, s) for t, s in kept if is_val({"text": t}, 0.5, "lmforge") == (split == "val")]
        assert [(r["text"], r["source"]) for r in rows(tmp_path, split=split)] == want
    assert metrics["text"]["dropped"] == {"duplicate": 2, "too_short": 1}
    assert {len(rows(tmp_path, split="train")), len(rows(tmp_path, split="val"))} != {0}


def test_strict_failure_leaves_previous_outputs_and_no_temporaries(tmp_path, monkeypatch):
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl(DOCS))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
        + "\n"
    )
    run(
        tmp_path, text_sources=[{"path": str(good)}], sft_sources=[{"path": str(chats), "schema": "messages"}]
    )
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    assert len(before) == 6

    # A new run: text streams out in many row groups, then an SFT record stops the run.
    monkeypatch.setattr(writer_mod, "ROW_GROUP_BYTES", 500)
    good.write_bytes(jsonl(DOCS[::-1] + ["new text"]))
    chats.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(IngestError, match=r"chats\.jsonl:line 1: messages\[0\]\.role"):
        run(
            tmp_path,
            text_sources=[{"path": str(good)}],
            sft_sources=[{"path": str(chats), "schema": "messages"}],
        )
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before
    assert leftovers(out) == []

    fresh = tmp_path / "fresh"
    fresh.mkdir()  # holds nothing but what the run writes
    with pytest.raises(IngestError, match=r"chats\.jsonl:line 1"):
        run(
            fresh,
            text_sources=[{"path": str(good)}],
            sft_sources=[{"path": str(chats), "schema": "messages"}],
        )
    assert sorted(os.listdir(fresh)) == []  # not even the output folders


def test_lenient_counts_and_examples_while_streaming(tmp_path):
    f = tmp_path / "mixed.jsonl.gz"
    f.write_bytes(
        gzip.compress(jsonl(["a doc", "a doc"]) + b'{"text": broken\n{"other": 1}\n' + jsonl(["b doc"]))
    )
    metrics = run(tmp_path, mode="lenient", text_sources=[{"path": str(f)}])
    assert metrics["skipped_bad_input"] == {"malformed_json": 1, "missing_field": 1}
    assert metrics["skipped_examples"]["malformed_json"].startswith(f"{f}:line 3: malformed JSON")
    assert metrics["text"]["dropped"] == {"duplicate": 1, "malformed_json": 1, "missing_field": 1}
    assert sorted(r["text"] for r in rows(tmp_path)) == ["a doc", "b doc"]


# --- progress --------------------------------------------------------------------------------------


def test_progress_bar_shows_bytes_and_records_per_second(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress_mod, "SHOW", True)
    f = tmp_path / "a.jsonl.gz"
    f.write_bytes(gzip.compress(jsonl(DOCS)))
    run(tmp_path, text_sources=[{"path": str(f), "name": "docs"}])
    err = capsys.readouterr().err
    assert "ingest text docs" in err and "100%" in err
    assert "B/s" in err and "400 records" in err and "records/s" in err
    monkeypatch.setattr(progress_mod, "SHOW", None)  # default: only on a terminal (pytest's is not)
    run(tmp_path, text_sources=[{"path": str(f), "name": "docs"}])
    assert "records/s" not in capsys.readouterr().err
