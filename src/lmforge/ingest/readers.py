"""Read raw records from a source (txt, jsonl, json, parquet, csv or a Hugging Face dataset).

Each record comes with where it came from (file and line or row) so that every problem
can be reported precisely. Problems go through a `Problems` ledger: in strict mode the
first one raises `IngestError`; in lenient mode it is counted per reason and the record
is skipped. Nothing is dropped without a count.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.params import SourceSpec


class IngestError(ValueError):
    """Bad input that stops the stage; the message names file, line and field."""


# Problems found while reading, before a record exists (the record never reaches the schema step).
READER_REASONS = frozenset({"not_utf8", "malformed_json"})


@dataclass(frozen=True)
class Where:
    source: str
    line: int | None = None  # 1-based line (text formats) or row (tabular formats)
    kind: str = "line"

    def __str__(self) -> str:
        return self.source if self.line is None else f"{self.source}:{self.kind} {self.line}"


@dataclass
class Problems:
    """Counts skipped records per reason; raises on the first one in strict mode."""

    strict: bool
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def report(self, reason: str, where: Where, message: str) -> None:
        text = f"{where}: {message}"
        if self.strict:
            raise IngestError(
                f"{text} (reason: {reason}; set ingest.mode=lenient to skip and count such records)"
            )
        self.counts[reason] += 1
        self.examples.setdefault(reason, text)


def _detect_format(spec: SourceSpec) -> str:
    if spec.format != "auto":
        return spec.format
    suffix = Path(spec.path or "").suffix.lower().lstrip(".")
    known = {
        "txt": "txt",
        "text": "txt",
        "md": "txt",
        "jsonl": "jsonl",
        "json": "json",
        "parquet": "parquet",
        "csv": "csv",
    }
    if suffix not in known:
        raise IngestError(
            f"{spec.path}: cannot tell the format from the extension; set `format` on the source"
        )
    return known[suffix]


def _decoded_lines(path: Path, problems: Problems) -> Iterator[tuple[int, str]]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.report(
                    "not_utf8",
                    Where(str(path), number),
                    f"bytes are not valid UTF-8 ({err.reason} at byte {err.start})",
                )


def _read_txt(path: Path, spec: SourceSpec, problems: Problems) -> Iterator[tuple[Where, Any]]:
    if spec.split_on == "line":
        for number, line in _decoded_lines(path, problems):
            yield Where(str(path), number), line.rstrip("\r\n")
        return
    if spec.split_on == "file":
        lines = [line for _, line in _decoded_lines(path, problems)]
        yield Where(str(path), 1), "".join(lines)
        return
    # blank_line: paragraphs (for tiny-shakespeare, one speech each).
    buf: list[str] = []
    start = 1
    for number, line in _decoded_lines(path, problems):
        if line.strip():
            if not buf:
                start = number
            buf.append(line)
        elif buf:
            yield Where(str(path), start), "".join(buf)
            buf = []
    if buf:
        yield Where(str(path), start), "".join(buf)


def _read_jsonl(path: Path, problems: Problems) -> Iterator[tuple[Where, Any]]:
    for number, line in _decoded_lines(path, problems):
        if not line.strip():
            continue
        try:
            yield Where(str(path), number), json.loads(line)
        except json.JSONDecodeError as err:
            problems.report(
                "malformed_json", Where(str(path), number), f"malformed JSON: {err.msg} (column {err.colno})"
            )


def _read_json(path: Path, problems: Problems) -> Iterator[tuple[Where, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise IngestError(
            f"{path}:line {line}: bytes are not valid UTF-8 ({err.reason}); a JSON file is read whole"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise IngestError(
            f"{path}:line {err.lineno}: malformed JSON: {err.msg} (column {err.colno})"
        ) from None
    if isinstance(data, dict):  # {"data": [...]} style wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise IngestError(f"{path}: expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise IngestError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    # Line numbers of list items: find where each top-level item starts.
    decoder = json.JSONDecoder()
    starts = _item_lines(text, decoder) if len(data) < 2_000_000 else [None] * len(data)
    for index, item in enumerate(data):
        line = starts[index] if index < len(starts) else None
        yield (Where(str(path), line) if line else Where(str(path), index + 1, "item")), item


def _item_lines(text: str, decoder: json.JSONDecoder) -> list[int]:
    pos = text.index("[") + 1
    lines: list[int] = []
    line = text.count("\n", 0, pos) + 1
    length = len(text)
    while pos < length:
        while pos < length and text[pos] in " \t\r\n,":
            if text[pos] == "\n":
                line += 1
            pos += 1
        if pos >= length or text[pos] == "]":
            break
        lines.append(line)
        _, end = decoder.raw_decode(text, pos)
        line += text.count("\n", pos, end)
        pos = end
    return lines


def _read_tabular(records: Iterator[dict], label: str) -> Iterator[tuple[Where, Any]]:
    for index, row in enumerate(records, start=1):
        yield Where(label, index, "row"), row


def _hf_cache_dir() -> str:
    from lmforge.paths import state_dir

    return str(state_dir("hf-datasets"))


def _load_local_table(path: Path, fmt: str):
    import datasets

    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=_hf_cache_dir())
    except UnicodeDecodeError as err:
        raise IngestError(f"{path}: bytes are not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except Exception as err:  # datasets wraps parser errors in several types
        raise IngestError(
            f"{path}: cannot read as {fmt}: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
        ) from None


def read_source(spec: SourceSpec, problems: Problems) -> Iterator[tuple[Where, Any]]:
    """Yield (where, record) for every record of one source."""
    if spec.hf_dataset is not None:
        import datasets

        try:
            ds = datasets.load_dataset(
                spec.hf_dataset, spec.hf_config, split=spec.hf_split, cache_dir=_hf_cache_dir()
            )
        except Exception as err:
            raise IngestError(
                f"{spec.hf_dataset}: cannot load Hugging Face dataset (split {spec.hf_split!r}): "
                f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            ) from None
        yield from _read_tabular(iter(ds), f"hf:{spec.hf_dataset}[{spec.hf_split}]")
        return
    path = Path(spec.path)
    if not path.is_file():
        raise IngestError(f"{path}: file not found (source {spec.label!r})")
    fmt = _detect_format(spec)
    if fmt == "txt":
        yield from _read_txt(path, spec, problems)
    elif fmt == "jsonl":
        yield from _read_jsonl(path, problems)
    elif fmt == "json":
        yield from _read_json(path, problems)
    else:
        yield from _read_tabular(iter(_load_local_table(path, fmt)), str(path))
