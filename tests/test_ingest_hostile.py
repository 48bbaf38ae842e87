"""Ingest on hostile files: byte-order marks, deep nesting, compressed and damaged archives,
directory and glob sources, and atomic writes of the outputs."""

import bz2
import gzip
import json
import lzma
import os
import re

import pytest
import zstandard

import lmforge.ingest.readers as readers
from lmforge.atomic import atomic_path, atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from lmforge.ingest.build import ingest, load_split
from lmforge.ingest.readers import MAX_JSON_DEPTH, IngestError, Problems, read_source
from lmforge.ingest.schemas import RecordProblem, to_preference, to_sft, to_text
from lmforge.params import IngestParams, SourceSpec

BOM = b"\xef\xbb\xbf"


def run(tmp_path, mode="strict", **sources):
    params = IngestParams(mode=mode, out_dir=str(tmp_path / "out"), min_chars=1, **sources)
    return ingest(params, tmp_path)


def texts(tmp_path):
    out = str(tmp_path / "out")
    return sorted(t for s in ("train", "val") for t in load_split(tmp_path, out, "text", s)["text"])


def wheres(path, **spec):
    """(file name, line) of every record read from `path` (strict)."""
    records = read_source(SourceSpec(path=str(path), **spec), Problems(strict=True))
    return [(os.path.basename(w.source), w.line) for w, _ in records]


def jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


COMPRESS = {
    "gz": gzip.compress,
    "zst": lambda data: zstandard.ZstdCompressor().compress(data),
    "bz2": lambda data: bz2.compress(data, 1),  # 100 kB blocks: a cut file still has whole ones
    "xz": lzma.compress,
}


# --- byte-order marks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, body, spec",
    [
        ("a.txt", b"same\nsame\nother\n", {"split_on": "line"}),
        ("b.txt", b"same\n\nsame\n\nother\n", {}),
        ("c.jsonl", jsonl(["same", "same", "other"]), {}),
        ("d.json", json.dumps([{"text": t} for t in ("same", "same", "other")]).encode(), {}),
        ("e.csv", b"text,n\nsame,1\nsame,2\nother,3\n", {}),
        ("f.jsonl.gz", gzip.compress(BOM + jsonl(["same", "same", "other"])), {}),
    ],
)
def test_bom_is_stripped_so_the_first_record_deduplicates(tmp_path, name, body, spec):
    f = tmp_path / name
    f.write_bytes(body if name.endswith(".gz") else BOM + body)
    metrics = run(tmp_path, text_sources=[{"path": str(f), **spec}])
    assert texts(tmp_path) == ["other", "same"]
    assert metrics["text"]["dropped"] == {"duplicate": 1}


# --- deep nesting ------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_jsonl_record_is_a_one_line_error_in_strict_mode(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text('{"text": "fine"}\n' + DEEP + "\n")
    with pytest.raises(
        IngestError, match=rf"deep\.jsonl:line 2: JSON nested deeper than {MAX_JSON_DEPTH}"
    ) as err:
        run(tmp_path, text_sources=[{"path": str(f)}])
    assert "\n" not in str(err.value) and "too_deep" in str(err.value)


def test_deep_jsonl_records_are_counted_in_lenient_mode(tmp_path):
    f = tmp_path / "deep.jsonl"
    deep_object = '{"a": ' * 5000 + "1" + "}" * 5000
    brackets_in_a_string = json.dumps({"text": "[" * 1000 + "{" * 1000})
    f.write_text("\n".join(['{"text": "fine"}', DEEP, deep_object, brackets_in_a_string]) + "\n")
    metrics = run(tmp_path, mode="lenient", text_sources=[{"path": str(f)}])
    assert metrics["skipped_bad_input"] == {"too_deep": 2}
    assert "deep.jsonl:line 2: JSON nested deeper" in metrics["skipped_examples"]["too_deep"]
    assert texts(tmp_path) == sorted(["fine", "[" * 1000 + "{" * 1000])
    assert metrics["text"]["records_in"] == 4 == metrics["text"]["kept"] + metrics["text"]["dropped_total"]


def test_recursion_error_from_the_parser_is_still_too_deep(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "too_deep_at", lambda text, limit=0: None)  # only json.loads guards
    f = tmp_path / "deep.jsonl"
    f.write_text('{"text": "fine"}\n' + DEEP + "\n")
    metrics = run(tmp_path, mode="lenient", text_sources=[{"path": str(f)}])
    assert metrics["skipped_bad_input"] == {"too_deep": 1}
    with pytest.raises(IngestError, match=r"deep\.jsonl:line 2: JSON nested deeper"):
        run(tmp_path, text_sources=[{"path": str(f)}])


@pytest.mark.parametrize("mode", ["strict", "lenient"])
def test_deep_json_file_is_a_file_level_error(tmp_path, mode):
    f = tmp_path / "deep.json"
    f.write_text('[\n{"text": "fine"},\n' + DEEP + "\n]")
    with pytest.raises(IngestError, match=r"deep\.json:line 3: JSON nested deeper than \d+ levels") as err:
        run(tmp_path, mode=mode, text_sources=[{"path": str(f)}])
    assert "\n" not in str(err.value)


def test_schema_step_does_not_recurse_into_deep_values():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    cases = [
        (lambda: to_text({"text": deep}, "text", "text"), "wrong_type"),
        (lambda: to_text(deep, "alpaca", "text"), "not_an_object"),
        (lambda: to_sft({"messages": deep}, "messages", "messages"), "bad_message"),
        (lambda: to_sft({"instruction": deep}, "alpaca", "messages"), "wrong_type"),
        (
            lambda: to_preference({"prompt": deep, "chosen": "a", "rejected": "b"}, "preference", "m"),
            "bad_message",
        ),
        (lambda: to_preference({"chosen": deep}, "hh", "m"), "wrong_type"),
    ]
    for call, reason in cases:
        with pytest.raises(RecordProblem) as err:
            call()
        assert err.value.reason == reason


# --- compressed sources ------------------------------------------------------------------------


@pytest.mark.parametrize("codec", sorted(COMPRESS))
def test_compressed_jsonl_is_read_streaming(tmp_path, codec):
    f = tmp_path / f"docs.jsonl.{codec}"
    f.write_bytes(COMPRESS[codec](jsonl(["one", "two"])) + COMPRESS[codec](jsonl(["three"])))  # 2 members
    metrics = run(tmp_path, text_sources=[{"path": str(f)}])
    assert texts(tmp_path) == ["one", "three", "two"]
    assert metrics["text"]["records_in"] == 3
    f.write_bytes(COMPRESS[codec](b'{"text": "ok"}\n{"text": broken\n'))
    with pytest.raises(IngestError, match=rf"docs\.jsonl\.{codec}:line 2: malformed JSON"):
        run(tmp_path, text_sources=[{"path": str(f)}])


def test_inner_format_comes_from_the_suffix_before_the_compression(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"para one\n\npara two\n"))
    (tmp_path / "b.json.zst").write_bytes(COMPRESS["zst"](json.dumps([{"text": "from json"}]).encode()))
    (tmp_path / "c.csv.gz").write_bytes(gzip.compress(b"text,n\nfrom csv,1\n"))
    (tmp_path / "d.data.gz").write_bytes(gzip.compress(jsonl(["forced jsonl"])))
    sources = [{"path": str(tmp_path / n)} for n in ("a.txt.gz", "b.json.zst", "c.csv.gz")]
    run(tmp_path, text_sources=[*sources, {"path": str(tmp_path / "d.data.gz"), "format": "jsonl"}])
    assert texts(tmp_path) == ["forced jsonl", "from csv", "from json", "para one", "para two"]
    assert wheres(tmp_path / "c.csv.gz") == [("c.csv.gz", 1)]
    with pytest.raises(IngestError, match=r"d\.data\.gz: cannot tell the format"):
        run(tmp_path, text_sources=[{"path": str(tmp_path / "d.data.gz")}])


def truncated(codec: str, body: bytes) -> bytes:
    data = COMPRESS[codec](body)
    return data[: len(data) * 2 // 3]


BIG = [f"document number {i} " + "filler " * (i % 7) + hex(i * 7919 % 65521) for i in range(12_000)]


@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_truncated_archive_strict_is_an_error_naming_the_file(tmp_path, codec):
    f = tmp_path / f"big.jsonl.{codec}"
    f.write_bytes(truncated(codec, jsonl(BIG)))
    with pytest.raises(IngestError, match=rf"big\.jsonl\.{codec}:line \d+: truncated \w+ archive") as err:
        run(tmp_path, text_sources=[{"path": str(f)}])
    assert "truncated_archive" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("codec", ["gz", "zst", "bz2", "xz"])
def test_truncated_archive_lenient_keeps_what_came_before_and_counts_the_damage(tmp_path, codec):
    f = tmp_path / f"big.jsonl.{codec}"
    f.write_bytes(truncated(codec, jsonl(BIG)))
    metrics = run(tmp_path, mode="lenient", text_sources=[{"path": str(f)}])
    kept = metrics["text"]["kept"]
    assert 0 < kept < len(BIG)
    assert texts(tmp_path) == sorted(d.strip() for d in BIG[:kept])  # exactly the lines before the cut
    assert metrics["skipped_bad_input"] == {"truncated_archive": 1}
    assert f"big.jsonl.{codec}:line {kept + 1}: truncated" in metrics["skipped_examples"]["truncated_archive"]
    assert metrics["text"]["records_in"] == kept + 1 == kept + metrics["text"]["dropped_total"]


def test_truncated_txt_json_and_csv_archives_in_lenient_mode(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(truncated("gz", "\n".join(BIG).encode()))
    items = ",\n".join(json.dumps({"text": d}) for d in BIG)
    (tmp_path / "b.json.gz").write_bytes(truncated("gz", f"[\n{items}\n]\n".encode()))
    (tmp_path / "c.csv.zst").write_bytes(truncated("zst", ("text\n" + "\n".join(BIG) + "\n").encode()))
    for name in ("a.txt.gz", "b.json.gz", "c.csv.zst"):
        spec = {"path": str(tmp_path / name), "split_on": "line"}
        metrics = run(tmp_path, mode="lenient", text_sources=[spec])
        kept = metrics["text"]["kept"]
        assert 0 < kept < len(BIG), name
        assert texts(tmp_path) == sorted(d.strip() for d in BIG[:kept]), name
        assert metrics["skipped_bad_input"] == {"truncated_archive": 1}, name
        assert f"{name}:line " in metrics["skipped_examples"]["truncated_archive"]
        with pytest.raises(IngestError, match=re.escape(name) + r":line \d+: truncated"):
            run(tmp_path, text_sources=[spec])


def test_corrupt_archive_is_counted_or_named(tmp_path):
    f = tmp_path / "fake.jsonl.gz"
    f.write_bytes(jsonl(["not compressed at all"]))
    with pytest.raises(IngestError, match=r"fake\.jsonl\.gz:line 1: damaged gzip archive"):
        run(tmp_path, text_sources=[{"path": str(f)}])
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl(["survivor"]))
    metrics = run(tmp_path, mode="lenient", text_sources=[{"path": str(f)}, {"path": str(good)}])
    assert metrics["skipped_bad_input"] == {"corrupt_archive": 1}
    assert texts(tmp_path) == ["survivor"]


# --- directories and glob patterns -------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "corpus"
    for rel, docs in {
        "b.jsonl": ["b"],
        "a/2.jsonl.gz": ["a2"],
        "a/10.jsonl": ["a10"],
        "a-z.txt": ["a-z"],
        ".hidden/x.jsonl": ["hidden"],
        "sub/.secret.jsonl": ["secret"],
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        body = jsonl(docs) if ".jsonl" in rel else "\n".join(docs).encode()
        path.write_bytes(gzip.compress(body) if rel.endswith(".gz") else body)
    (root / "README").write_text("not a source")
    (root / "notes.rst").write_text("not a source")
    return root


def test_directory_source_reads_recognizable_files_recursively_in_sorted_order(tmp_path, tree):
    assert wheres(tree) == [("10.jsonl", 1), ("2.jsonl.gz", 1), ("a-z.txt", 1), ("b.jsonl", 1)]
    assert wheres(tree, format="jsonl") == [("10.jsonl", 1), ("2.jsonl.gz", 1), ("b.jsonl", 1)]
    metrics = run(tmp_path, text_sources=[{"path": str(tree)}])
    assert texts(tmp_path) == ["a-z", "a10", "a2", "b"]
    assert metrics["text"]["sources"][str(tree)]["records_in"] == 4


def test_directory_problems_name_the_actual_file(tmp_path, tree):
    (tree / "a" / "10.jsonl").write_text('{"text": broken\n')
    (tree / "b.jsonl").write_text('{"text": "ok"}\n{"text": also broken\n')
    with pytest.raises(IngestError, match=r"corpus/a/10\.jsonl:line 1: malformed JSON"):
        run(tmp_path, text_sources=[{"path": str(tree)}])
    metrics = run(tmp_path, mode="lenient", text_sources=[{"path": str(tree)}])
    assert metrics["skipped_bad_input"] == {"malformed_json": 2}
    assert "corpus/a/10.jsonl:line 1" in metrics["skipped_examples"]["malformed_json"]  # first in order


def test_glob_source_in_sorted_order(tmp_path, tree):
    assert wheres(tree / "*.jsonl") == [("b.jsonl", 1)]
    assert wheres(tree / "**" / "*.jsonl*") == [("10.jsonl", 1), ("2.jsonl.gz", 1), ("b.jsonl", 1)]
    assert wheres(tree / "a") == [("10.jsonl", 1), ("2.jsonl.gz", 1)]
    assert wheres(tree / "a" / "**") == wheres(tree / "a")  # the folder and its files match: each once
    run(tmp_path, text_sources=[{"path": str(tree / "a" / "*")}])
    assert texts(tmp_path) == ["a10", "a2"]
    with pytest.raises(IngestError, match=r"README: cannot tell the format"):
        run(tmp_path, text_sources=[{"path": str(tree / "READ*")}])


def test_empty_directory_and_unmatched_glob_are_clear_errors(tmp_path, tree):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.rst").write_text("x")
    with pytest.raises(IngestError, match=r"empty: directory holds no file whose format"):
        run(tmp_path, text_sources=[{"path": str(empty)}])
    with pytest.raises(IngestError, match=r"corpus/\*\.parquet: no file matches the pattern"):
        run(tmp_path, text_sources=[{"path": str(tree / "*.parquet")}])
    with pytest.raises(IngestError, match=r"corpus: directory holds no csv file"):
        run(tmp_path, text_sources=[{"path": str(tree), "format": "csv"}])


# --- atomic writes -----------------------------------------------------------------------------


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def test_atomic_helpers_replace_whole_files_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")
    os.chmod(target, 0o640)
    assert atomic_write_text(target, "névé\n") == target
    assert target.read_bytes() == "névé\n".encode() and (target.stat().st_mode & 0o777) == 0o640
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("disk full")
    assert target.read_bytes() == "névé\n".encode()
    assert leftovers(tmp_path) == []


def test_remove_stale_temporaries_only_touches_atomic_temporaries(tmp_path):
    target = tmp_path / "last.ckpt"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        os.link(tmp, tmp_path / ".last.ckpt.0123abcd.tmp")  # what a killed process would leave
        raise KeyboardInterrupt
    (tmp_path / ".keep.tmp").write_text("not ours")
    (tmp_path / "data.tmp").write_text("not ours")
    assert remove_stale_temporaries(tmp_path) == [tmp_path / ".last.ckpt.0123abcd.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.tmp", "data.tmp"]
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_ingest_writes_parquet_atomically(tmp_path, monkeypatch):
    f = tmp_path / "a.jsonl"
    f.write_bytes(jsonl([f"doc {i}" for i in range(50)]))
    run(tmp_path, text_sources=[{"path": str(f)}])
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    assert len(before) == 6 and leftovers(out) == []

    import pyarrow.parquet as pq

    real_write_table = pq.ParquetWriter.write_table

    def failing_write_table(self, table, *args, **kwargs):
        real_write_table(self, table, *args, **kwargs)  # half a file is on disk, then the disk fills
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing_write_table)
    f.write_bytes(jsonl(["something else"]))
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, text_sources=[{"path": str(f)}])
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before
    assert leftovers(out) == []
