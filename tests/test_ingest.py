"""Ingest: every source type, strict/lenient bad input, cleanup, dedup and the split."""

import json

import datasets
import pytest

from lmforge.ingest.build import ingest, load_split
from lmforge.ingest.clean import clean_text, is_val
from lmforge.ingest.readers import IngestError
from lmforge.params import IngestParams


def run(tmp_path, mode="strict", **sources):
    params = IngestParams(mode=mode, out_dir=str(tmp_path / "out"), min_chars=1, **sources)
    return ingest(params, tmp_path)


def texts(tmp_path, split=None):
    splits = [split] if split else ["train", "val"]
    return sorted(t for s in splits for t in load_split(tmp_path, str(tmp_path / "out"), "text", s)["text"])


def test_txt_paragraphs_lines_and_whole_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("First para\nline two\n\n\nSecond para\n")
    run(tmp_path, text_sources=[{"path": str(f)}])
    assert texts(tmp_path) == ["First para\nline two", "Second para"]
    run(tmp_path, text_sources=[{"path": str(f), "split_on": "line"}])
    assert texts(tmp_path) == ["First para", "Second para", "line two"]
    run(tmp_path, text_sources=[{"path": str(f), "split_on": "file"}])
    assert texts(tmp_path) == ["First para\nline two\n\nSecond para"]


def test_blank_line_documents_of_doc_chars_keep_their_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("A:\nHi.\n\nB:\nHello there.\n\n\nC:\nBye.\n\nD:\nx\n")
    run(tmp_path, text_sources=[{"path": str(f), "doc_chars": 10}])
    # Paragraphs join until a document reaches 10 characters; the blank lines inside are the file's.
    assert texts(tmp_path) == ["A:\nHi.\n\nB:\nHello there.", "C:\nBye.\n\nD:\nx"]
    run(tmp_path, text_sources=[{"path": str(f), "doc_chars": 10_000}])
    assert texts(tmp_path) == ["A:\nHi.\n\nB:\nHello there.\n\nC:\nBye.\n\nD:\nx"]  # 3 newlines fold to 2
    run(tmp_path, text_sources=[{"path": str(f), "doc_chars": 0}])
    assert len(texts(tmp_path)) == 4  # one paragraph per document, as without doc_chars
    with pytest.raises(ValueError, match="doc_chars.*needs split_on: blank_line, not line"):
        run(tmp_path, text_sources=[{"path": str(f), "split_on": "line", "doc_chars": 10}])


def test_jsonl_json_parquet_csv_sources_with_text_field(tmp_path):
    rows = [{"body": f"document {i}"} for i in range(4)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "b.json").write_text(json.dumps(rows[2:3]))
    datasets.Dataset.from_list(rows[3:]).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "d.csv").write_text("body,other\ndocument csv,1\n")
    sources = [
        {"path": str(tmp_path / n), "text_field": "body"} for n in ("a.jsonl", "b.json", "c.parquet", "d.csv")
    ]
    metrics = run(tmp_path, text_sources=sources)
    assert texts(tmp_path) == ["document 0", "document 1", "document 2", "document 3", "document csv"]
    assert metrics["text"]["kept"] == 5 and metrics["text"]["records_in"] == 5


def test_hf_dataset_name_loads_through_datasets(tmp_path):
    # A local folder is a valid `datasets.load_dataset` name; online, a hub name takes the same path.
    folder = tmp_path / "hub_like"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "from the hub"}\n{"text": "another"}\n')
    run(tmp_path, text_sources=[{"hf_dataset": str(folder), "hf_split": "train"}])
    assert texts(tmp_path) == ["another", "from the hub"]
    with pytest.raises(IngestError, match="cannot load Hugging Face dataset"):
        run(tmp_path, text_sources=[{"hf_dataset": str(tmp_path / "missing_ds")}])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(IngestError, match=r"nope\.txt: file not found"):
        run(tmp_path, text_sources=[{"path": str(tmp_path / "nope.txt")}])


@pytest.fixture
def bad_jsonl(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(
        b'{"text": "good one"}\n{"text": broken\n{"other": 1}\n{"text": "caf\xe9 latin1"}\n{"text": "good two"}\n'
    )
    return f


def test_strict_mode_names_file_line_and_field(tmp_path, bad_jsonl):
    with pytest.raises(IngestError, match=r"bad\.jsonl:line 2: malformed JSON"):
        run(tmp_path, text_sources=[{"path": str(bad_jsonl)}])
    bad_jsonl.write_bytes(b'{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(IngestError, match=r"bad\.jsonl:line 2: missing field 'text'"):
        run(tmp_path, text_sources=[{"path": str(bad_jsonl)}])
    bad_jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(IngestError, match=r"bad\.jsonl:line 2: bytes are not valid UTF-8"):
        run(tmp_path, text_sources=[{"path": str(bad_jsonl)}])


def test_lenient_mode_skips_counts_and_reports(tmp_path, bad_jsonl):
    metrics = run(tmp_path, mode="lenient", text_sources=[{"path": str(bad_jsonl)}])
    assert texts(tmp_path) == ["good one", "good two"]
    assert metrics["skipped_bad_input"] == {"malformed_json": 1, "missing_field": 1, "not_utf8": 1}
    assert metrics["text"]["records_in"] == 5
    assert metrics["text"]["kept"] + metrics["text"]["dropped_total"] == 5
    assert "bad.jsonl:line 3" in metrics["skipped_examples"]["missing_field"]


def test_malformed_json_file_names_the_line(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(IngestError, match=r"x\.json:line 3: malformed JSON"):
        run(tmp_path, text_sources=[{"path": str(f)}])


def test_cleanup_dedup_and_length_filters(tmp_path):
    f = tmp_path / "a.jsonl"
    docs = ["Cafe\u0301  au\tlait  ", "Café au lait", "x", "y" * 50, "kept text"]
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    params = IngestParams(
        text_sources=[{"path": str(f)}], out_dir=str(tmp_path / "out"), min_chars=2, max_chars=20
    )
    metrics = ingest(params, tmp_path)
    assert texts(tmp_path) == ["Café au lait", "kept text"]  # NFC + whitespace cleanup made 1 and 2 equal
    assert metrics["text"]["dropped"] == {"duplicate": 1, "too_long": 1, "too_short": 1}
    assert clean_text("a\r\nb\x00\n\n\n\nc ") == "a\nb\n\nc"


def test_split_is_deterministic_by_content_and_independent_of_order(tmp_path):
    docs = [f"doc number {i}" for i in range(300)]
    f = tmp_path / "a.txt"
    f.write_text("\n".join(docs))
    run(tmp_path, text_sources=[{"path": str(f), "split_on": "line"}])
    val_a = texts(tmp_path, "val")
    f.write_text("\n".join(reversed(docs)))
    run(tmp_path, text_sources=[{"path": str(f), "split_on": "line"}])
    assert texts(tmp_path, "val") == val_a
    assert 10 < len(val_a) < 60  # about val_fraction=0.1 of 300
    assert is_val({"text": "x"}, 0.5, "s") == is_val({"text": "x"}, 0.5, "s")


def test_dialogue_schemas_normalize_to_messages_and_pairs(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [
                {
                    "instruction": "Fix it.",
                    "input": "teh cat",
                    "output": "the cat",
                    "chosen": "The cat.",
                    "rejected": "ugh, the cat",
                },
                {"instruction": "Same?", "input": "", "output": "yes", "chosen": "same", "rejected": "same"},
            ]
        )
    )
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                ]
            }
        )
        + "\n"
    )
    hh = tmp_path / "hh.jsonl"
    hh.write_text(
        json.dumps(
            {
                "chosen": "\n\nHuman: Help?\n\nAssistant: Sure.",
                "rejected": "\n\nHuman: Help?\n\nAssistant: No.",
            }
        )
        + "\n"
    )
    metrics = run(
        tmp_path,
        sft_sources=[{"path": str(alpaca), "schema": "alpaca"}, {"path": str(chats), "schema": "messages"}],
        preference_sources=[
            {"path": str(alpaca), "schema": "alpaca_preference"},
            {"path": str(hh), "schema": "hh"},
        ],
    )
    out = str(tmp_path / "out")
    sft = [r for s in ("train", "val") for r in load_split(tmp_path, out, "sft", s)]
    first = next(
        r for r in sft if r["source"].endswith("alpaca.json") and r["messages"][1]["content"] == "the cat"
    )
    assert first["messages"][0] == {"role": "user", "content": "Fix it.\n\nteh cat"}
    assert any(r["messages"][0]["role"] == "system" for r in sft)
    prefs = [r for s in ("train", "val") for r in load_split(tmp_path, out, "preference", s)]
    assert {(r["chosen"], r["rejected"]) for r in prefs} == {("The cat.", "ugh, the cat"), ("Sure.", "No.")}
    hh_row = next(r for r in prefs if r["chosen"] == "Sure.")
    assert hh_row["prompt"] == [{"role": "user", "content": "Help?"}]
    assert metrics["preference"]["dropped"] == {"identical_pair": 1}


def test_bad_dialogue_field_is_named(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(IngestError, match=r"chats\.jsonl:line 1: messages\[0\]\.role must be one of"):
        run(tmp_path, sft_sources=[{"path": str(chats), "schema": "messages"}])


def test_question_answer_records_become_one_turn_dialogues(tmp_path):
    """The `qa` schema on the bundled GSM8K train split (gzipped JSONL): every problem a user turn,
    its worked answer the reply; a record without its answer is named by file, line and field."""
    from pathlib import Path

    gsm8k = Path(__file__).resolve().parents[1] / "data" / "raw" / "gsm8k" / "train.jsonl.gz"
    metrics = run(tmp_path, sft_sources=[{"path": str(gsm8k), "schema": "qa"}])
    out = str(tmp_path / "out")
    rows = [r for s in ("train", "val") for r in load_split(tmp_path, out, "sft", s)]
    assert len(rows) == metrics["sft"]["kept"] > 7000
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    assert all("####" in r["messages"][1]["content"] for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"question": "2 + 2?", "answer": "#### 4"}) + "\n" + json.dumps({"question": "x"}) + "\n"
    )
    with pytest.raises(IngestError, match=r"bad\.jsonl:line 2: .*answer"):
        run(tmp_path, sft_sources=[{"path": str(bad), "schema": "qa"}])
