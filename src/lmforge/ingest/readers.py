"""Read raw records from a source, lazily: local files or a Hugging Face dataset.

Every reader is a generator that holds one record (or one chunk / batch) at a time, so a source
of any size streams through in bounded memory:

- txt (`.txt`, `.text`, `.md`): one record per line, per blank-line paragraph (or run of paragraphs
  of at least `doc_chars` characters, blank lines kept) or per file (`split_on`);
  read in 1 MiB chunks (`split_on: file` holds its one record, the whole file)
- jsonl (`.jsonl`, `.ndjson`): one JSON value per line, read in 1 MiB chunks
- json (`.json`): a list of records, or an object holding exactly one list. A JSON document has
  no record boundaries a reader can trust before it is parsed, so a `.json` file is loaded
  whole (use JSON Lines for large corpora)
- parquet (`.parquet`): read with pyarrow in record batches (`PARQUET_BATCH_ROWS` rows), one row
  group at a time, never the whole table
- csv (`.csv`): read through `datasets` with `streaming=True` (pandas in chunks)
- a Hugging Face dataset name (`hf_dataset` instead of `path`): `datasets.load_dataset(...,
  streaming=True)`, rows as they arrive (a local folder or data file works as the name too)

Any of these files may be compressed; the format then comes from the suffix before the
compression suffix (`corpus.jsonl.gz`): `.gz` (gzip), `.zst`/`.zstd` (Zstandard, needs the
`zstandard` package), `.bz2`, `.xz`. Compressed files are read streaming (a compressed Parquet
or CSV file is first decompressed, streaming, into a scratch file on disk).

`path` may also name a directory (every file in it, recursively, whose format the extension
tells; hidden files and folders are skipped) or a glob pattern (`data/*.jsonl.gz`, `**` for
subfolders). Files are read in sorted path order and each record's `Where` names its own file.

Each record comes with where it came from (file and line or row) so that every problem
can be reported precisely. Problems go through a `Problems` ledger: in strict mode the
first one raises `IngestError`; in lenient mode it is counted per reason and the record
is skipped. Nothing is dropped without a count. Hostile input is handled the same way:
a UTF-8 byte-order mark at the start of a file is dropped; a JSON value nested deeper than
`MAX_JSON_DEPTH` levels is `too_deep` (a `.json` file is read whole, so for it that stops the
stage); a compressed file that ends early or is damaged is `truncated_archive` or
`corrupt_archive`, after the records before the damage were read.

`read_source` takes an optional progress object (`lmforge.progress.Progress`): it is told
the size of the source's files and the bytes read from them as reading goes.
"""

from __future__ import annotations

import glob
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmforge.ingest.json_text import MAX_DEPTH, TOO_DEEP, item_lines, salvage_list, too_deep_at
from lmforge.ingest.problems import IngestError, OnBytes, Problems, Where, ignore
from lmforge.ingest.streams import Damage, chunks, raw_lines
from lmforge.params import SourceSpec

__all__ = ["IngestError", "Problems", "Where", "read_source"]


# Problems found while reading, before a record exists (the record never reaches the schema step).
READER_REASONS = frozenset({"not_utf8", "malformed_json", "too_deep", "truncated_archive", "corrupt_archive"})

# Deepest JSON nesting accepted (a JSON Lines line, or a whole .json file with its list). Real
# records nest a few levels; far deeper input is hostile and would exhaust the recursion limit.
MAX_JSON_DEPTH = MAX_DEPTH

_FORMATS = {
    "txt": "txt",
    "text": "txt",
    "md": "txt",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "json": "json",
    "parquet": "parquet",
    "csv": "csv",
}
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
_BOM = b"\xef\xbb\xbf"
# Rows per record batch read from a Parquet file (a batch becomes Python dicts at once).
PARQUET_BATCH_ROWS = 1024


# --- which files, in which format -------------------------------------------------------------


def _suffixes(path: Path) -> tuple[str, str | None]:
    """(format suffix without the dot, compression or None): `a.jsonl.gz` -> ("jsonl", "gzip")."""
    name = path.name.lower()
    compression = COMPRESSIONS.get(Path(name).suffix)
    if compression is not None:
        name = Path(name).stem
    return Path(name).suffix.lstrip("."), compression


def _known_format(path: Path, wanted: str) -> tuple[str, str | None] | None:
    """(format, compression) when the extension tells a format (and it is `wanted`, unless auto)."""
    suffix, compression = _suffixes(path)
    fmt = _FORMATS.get(suffix)
    if fmt is None or wanted not in ("auto", fmt):
        return None
    return fmt, compression


def _file_format(path: Path, wanted: str) -> tuple[str, str | None]:
    suffix, compression = _suffixes(path)
    if wanted != "auto":
        return wanted, compression
    if suffix not in _FORMATS:
        raise IngestError(f"{path}: cannot tell the format from the extension; set `format` on the source")
    return _FORMATS[suffix], compression


def _by_path(paths) -> list[Path]:
    return sorted(paths, key=lambda p: p.parts)


def _directory_files(folder: Path, wanted: str) -> list[tuple[Path, str, str | None]]:
    found = []
    for path in _by_path(folder.rglob("*")):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative) or not path.is_file():
            continue
        known = _known_format(path, wanted)
        if known is not None:
            found.append((path, *known))
    return found


def _source_files(spec: SourceSpec) -> list[tuple[Path, str, str | None]]:
    """Every (file, format, compression) of a `path` source: a file, a directory or a glob pattern."""
    path = Path(spec.path)
    if path.is_file():
        return [(path, *_file_format(path, spec.format))]
    what = "" if spec.format == "auto" else f" {spec.format}"
    if path.is_dir():
        files = _directory_files(path, spec.format)
        if not files:
            raise IngestError(
                f"{path}: directory holds no{what} file whose format the extension tells "
                f"({', '.join(sorted(_FORMATS))}, optionally {', '.join(COMPRESSIONS)}) (source {spec.label!r})"
            )
        return files
    if any(char in spec.path for char in "*?["):
        chosen: dict[Path, tuple[Path, str, str | None]] = {}  # `dir/**` matches a folder and its files
        for match in map(Path, glob.glob(spec.path, recursive=True)):
            if match.is_dir():
                chosen.update((file[0], file) for file in _directory_files(match, spec.format))
            elif match.is_file():
                chosen[match] = (match, *_file_format(match, spec.format))
        files = [chosen[p] for p in _by_path(chosen)]
        if not files:
            raise IngestError(f"{spec.path}: no{what} file matches the pattern (source {spec.label!r})")
        return files
    raise IngestError(f"{path}: file not found (source {spec.label!r})")


def _decoded_lines(
    path: Path, compression: str | None, problems: Problems, on_bytes: OnBytes = ignore
) -> Iterator[tuple[int, str]]:
    try:
        for number, raw in raw_lines(path, compression, on_bytes):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.report(
                    "not_utf8",
                    Where(str(path), number),
                    f"bytes are not valid UTF-8 ({err.reason} at byte {err.start})",
                )
    except Damage as damage:
        _report_damage(path, damage, problems)


def _report_damage(path: Path, damage: Damage, problems: Problems) -> None:
    problems.report(
        damage.reason, Where(str(path), damage.line), f"{damage}; nothing after this point is read"
    )


# --- formats -----------------------------------------------------------------------------------


def _read_txt(
    path: Path, compression: str | None, spec: SourceSpec, problems: Problems, on_bytes: OnBytes
) -> Iterator[tuple[Where, Any]]:
    lines = _decoded_lines(path, compression, problems, on_bytes)
    if spec.split_on == "line":
        for number, line in lines:
            yield Where(str(path), number), line.rstrip("\r\n")
        return
    if spec.split_on == "file":
        yield Where(str(path), 1), "".join(line for _, line in lines)
        return
    # blank_line: paragraphs (for tiny-shakespeare, one speech each), or runs of paragraphs of at
    # least `doc_chars` characters with the blank lines between them kept.
    buf: list[str] = []  # the document's lines so far
    blanks: list[str] = []  # blank lines after its last paragraph, kept if another paragraph joins
    start = size = 0
    for number, line in lines:
        if line.strip():
            if not buf:
                start, size = number, 0
            buf += blanks
            size += sum(map(len, blanks)) + len(line)
            blanks = []
            buf.append(line)
        elif buf:
            if size >= spec.doc_chars:
                yield Where(str(path), start), "".join(buf)
                buf, blanks = [], []
            else:
                blanks.append(line)
    if buf:
        yield Where(str(path), start), "".join(buf)


def _read_jsonl(
    path: Path, compression: str | None, problems: Problems, on_bytes: OnBytes
) -> Iterator[tuple[Where, Any]]:
    for number, line in _decoded_lines(path, compression, problems, on_bytes):
        if not line.strip():
            continue
        where = Where(str(path), number)
        deep_at = too_deep_at(line)
        if deep_at is not None:
            problems.report("too_deep", where, f"{TOO_DEEP} (column {deep_at + 1})")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.report("malformed_json", where, f"malformed JSON: {err.msg} (column {err.colno})")
            continue
        except RecursionError:
            problems.report("too_deep", where, f"{TOO_DEEP} (too deep to parse)")
            continue
        yield where, record


def _read_all(path: Path, compression: str | None, on_bytes: OnBytes) -> tuple[bytes, Damage | None]:
    if compression is None:
        raw = path.read_bytes()
        on_bytes(len(raw))
        return raw, None
    parts: list[bytes] = []
    try:
        for chunk in chunks(path, compression, on_bytes):
            parts.append(chunk)
    except Damage as damage:
        raw = b"".join(parts)
        damage.line = raw.count(b"\n") + 1
        return raw, damage
    return b"".join(parts), None


def _read_json(
    path: Path, compression: str | None, problems: Problems, on_bytes: OnBytes
) -> Iterator[tuple[Where, Any]]:
    """A `.json` file is loaded whole (its items are only known once it is parsed)."""
    raw, damage = _read_all(path, compression, on_bytes)
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    if damage is not None:
        _report_damage(path, damage, problems)  # raises in strict mode
        # Lenient: keep the list items that are whole before the damage (complete lines only).
        raw = raw[: raw.rfind(b"\n") + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise IngestError(
            f"{path}:line {line}: bytes are not valid UTF-8 ({err.reason}); a JSON file is read whole"
        ) from None
    deep_at = too_deep_at(text)
    if deep_at is not None:
        line = text.count("\n", 0, deep_at) + 1
        raise IngestError(f"{path}:line {line}: {TOO_DEEP} (reason: too_deep); a JSON file is read whole")
    if damage is not None:
        for line, item in salvage_list(text):
            yield Where(str(path), line), item
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise IngestError(
            f"{path}:line {err.lineno}: malformed JSON: {err.msg} (column {err.colno})"
        ) from None
    except RecursionError:
        raise IngestError(f"{path}: {TOO_DEEP} (reason: too_deep); a JSON file is read whole") from None
    if isinstance(data, dict):  # {"data": [...]} style wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise IngestError(f"{path}: expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise IngestError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    # Line numbers of list items: find where each top-level item starts.
    starts = item_lines(text) if len(data) < 2_000_000 else [None] * len(data)
    for index, item in enumerate(data):
        line = starts[index] if index < len(starts) else None
        yield (Where(str(path), line) if line else Where(str(path), index + 1, "item")), item


def _hf_cache_dir() -> str:
    from lmforge.paths import state_dir

    return str(state_dir("hf-datasets"))


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def _table_error(label: Path | str, fmt: str, err: Exception) -> IngestError:
    if isinstance(err, UnicodeDecodeError):
        return IngestError(f"{label}: bytes are not valid UTF-8 ({err.reason} at byte {err.start})")
    return IngestError(f"{label}: cannot read as {fmt}: {_one_line(err)}")


def _rows(rows: Iterator[Any], label: str, on_error: Callable[[Exception], IngestError]):
    """(where, row) per row of `rows`; an error while reading (not while the caller works) is named."""
    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as err:  # `datasets` and pyarrow wrap parser errors in several types
            raise on_error(err) from None
        index += 1
        yield Where(label, index, "row"), row


def _parquet_rows(path: Path, on_bytes: OnBytes) -> Iterator[Any]:
    """Rows of a Parquet file, record batch by record batch (pyarrow reads one row group at a time)."""
    import pyarrow.parquet as pq

    size = path.stat().st_size
    with pq.ParquetFile(path, pre_buffer=False) as parquet:  # pre-buffering holds the whole file
        total, done, told = parquet.metadata.num_rows, 0, 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            done += batch.num_rows
            share = size * done // total if total else size
            on_bytes(share - told)
            told = share
            yield from batch.to_pylist()
        on_bytes(size - told)


def _csv_rows(path: Path, cache_dir: str, on_bytes: OnBytes) -> Iterator[Any]:
    """Rows of a CSV file through `datasets` (pandas, in chunks), streaming: no Arrow cache is written."""
    import datasets

    rows = iter(
        datasets.load_dataset("csv", data_files=str(path), split="train", streaming=True, cache_dir=cache_dir)
    )
    yield from rows
    on_bytes(path.stat().st_size)


def _table_rows(
    path: Path, fmt: str, label: Path, cache_dir: str, on_bytes: OnBytes
) -> Iterator[tuple[Where, Any]]:
    rows = _parquet_rows(path, on_bytes) if fmt == "parquet" else _csv_rows(path, cache_dir, on_bytes)
    yield from _rows(rows, str(label), lambda err: _table_error(label, fmt, err))


def _read_table_file(
    path: Path, fmt: str, compression: str | None, problems: Problems, on_bytes: OnBytes
) -> Iterator[tuple[Where, Any]]:
    if compression is None:
        yield from _table_rows(path, fmt, path, _hf_cache_dir(), on_bytes)
        return
    # Parquet needs random access (its footer) and `datasets` reads plain CSV files: decompress
    # (streaming) into a scratch folder that also holds any cache, so one-off copies never pile up.
    with tempfile.TemporaryDirectory(prefix="lmforge-ingest-") as scratch:
        plain = Path(scratch) / f"data.{fmt}"
        written, lines, last_newline = 0, 0, -1
        damage = None
        with plain.open("wb") as out:
            try:
                for chunk in chunks(path, compression, on_bytes):
                    cut = chunk.rfind(b"\n")
                    if cut >= 0:
                        last_newline = written + cut
                    lines += chunk.count(b"\n")
                    out.write(chunk)
                    written += len(chunk)
            except Damage as err:
                damage = err
                if fmt == "csv":  # keep the complete rows before the damage
                    damage.line = lines + 1
                    out.truncate(last_newline + 1)
                    written = last_newline + 1
        if damage is not None:
            _report_damage(path, damage, problems)  # raises in strict mode
            if fmt != "csv" or written == 0:  # a cut Parquet file has no footer: nothing to salvage
                return
        yield from _table_rows(plain, fmt, path, str(Path(scratch) / "cache"), ignore)


def _read_hf(spec: SourceSpec) -> Iterator[tuple[Where, Any]]:
    """A Hugging Face dataset, streaming: rows as the hub (or a local folder) serves them."""
    import datasets

    def error(err: BaseException) -> IngestError:
        return IngestError(
            f"{spec.hf_dataset}: cannot load Hugging Face dataset (split {spec.hf_split!r}): {_one_line(err)}"
        )

    try:
        ds = datasets.load_dataset(
            spec.hf_dataset, spec.hf_config, split=spec.hf_split, streaming=True, cache_dir=_hf_cache_dir()
        )
    except Exception as err:
        raise error(err) from None
    yield from _rows(iter(ds), f"hf:{spec.hf_dataset}[{spec.hf_split}]", error)


def read_source(spec: SourceSpec, problems: Problems, progress=None) -> Iterator[tuple[Where, Any]]:
    """Yield (where, record) for every record of one source, lazily, in file and line order.

    `progress`, when given, is told the total size of the source's files (`set_total`) and the
    bytes read from them as reading goes (`add_bytes`).
    """
    if spec.hf_dataset is not None:
        yield from _read_hf(spec)
        return
    files = _source_files(spec)
    on_bytes = ignore
    if progress is not None:
        progress.set_total(sum(path.stat().st_size for path, _, _ in files))
        on_bytes = progress.add_bytes
    for path, fmt, compression in files:
        if fmt == "txt":
            yield from _read_txt(path, compression, spec, problems, on_bytes)
        elif fmt == "jsonl":
            yield from _read_jsonl(path, compression, problems, on_bytes)
        elif fmt == "json":
            yield from _read_json(path, compression, problems, on_bytes)
        else:
            yield from _read_table_file(path, fmt, compression, problems, on_bytes)
