"""The ingest recipe: sources -> normalized, cleaned, de-duplicated, split Parquet datasets.

Writes `<out_dir>/{text,sft,preference}/{train,val}.parquet` through `datasets` (each file
atomically: a temporary file beside it, then a rename, so a reader never sees half a file) and
returns the metrics (records and bytes in, kept, dropped per reason, per kind and per source).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmforge.atomic import atomic_path
from lmforge.ingest.clean import Deduper, Tally, clean_example, content_key, example_chars, is_val
from lmforge.ingest.readers import READER_REASONS, IngestError, Problems, read_source
from lmforge.ingest.schemas import Filtered, RecordProblem, to_preference, to_sft, to_text
from lmforge.params import IngestParams, SourceSpec

KINDS = ("text", "sft", "preference")


def _features(kind: str):
    import datasets

    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    columns = {
        "text": {"text": datasets.Value("string")},
        "sft": {"messages": datasets.List(message)},
        "preference": {
            "prompt": datasets.List(message),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
        },
    }[kind]
    return datasets.Features({**columns, "source": datasets.Value("string")})


def _converter(kind: str, spec: SourceSpec) -> Callable[[object], dict]:
    if kind == "text":
        return lambda r: to_text(r, spec.schema_, spec.text_field)
    if kind == "sft":
        return lambda r: to_sft(r, spec.schema_, spec.messages_field)
    return lambda r: to_preference(r, spec.schema_, spec.messages_field)


def _raw_bytes(record: object) -> int:
    if isinstance(record, str):
        return len(record.encode("utf-8"))
    return len(repr(record).encode("utf-8"))


def collect(
    kind: str, sources: list[SourceSpec], params: IngestParams, problems: Problems
) -> tuple[dict, Tally, dict]:
    """Read, normalize, clean, filter, de-duplicate and split every source of one kind."""
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    tally, per_source = Tally(), {}
    dedup = Deduper()
    for spec in sources:
        src = Tally()
        convert = _converter(kind, spec)
        before = problems.counts.copy()
        for where, record in read_source(spec, problems):
            src.records_in += 1
            src.bytes_in += _raw_bytes(record)
            try:
                example = clean_example(convert(record), params.unicode_form)
            except Filtered as drop:
                src.dropped[drop.reason] += 1
                continue
            except RecordProblem as bad:
                problems.report(bad.reason, where, str(bad))  # raises in strict mode
                continue
            chars = example_chars(example)
            if chars < params.min_chars:
                src.dropped["too_short"] += 1
            elif chars > params.max_chars:
                src.dropped["too_long"] += 1
            elif not dedup.is_new(example):
                src.dropped["duplicate"] += 1
            else:
                split = "val" if is_val(example, params.val_fraction, params.split_salt) else "train"
                rows[split].append({**example, "source": spec.label})
                src.kept += 1
                src.bytes_kept += len((example["text"] if kind == "text" else content_key(example)).encode())
                src.splits[split] += 1
        skipped = problems.counts - before
        src.dropped.update(skipped)
        # Lines the reader could not even parse never reached the loop: count them as input too.
        src.records_in += sum(n for reason, n in skipped.items() if reason in READER_REASONS)
        per_source[spec.label] = src.as_dict()
        for name in ("records_in", "bytes_in", "kept", "bytes_kept"):
            setattr(tally, name, getattr(tally, name) + getattr(src, name))
        tally.dropped.update(src.dropped)
        tally.splits.update(src.splits)
    return rows, tally, per_source


def ingest(params: IngestParams, root: Path = Path(".")) -> dict:
    """Run the whole ingest; returns the metrics dict (also what the stage writes as JSON)."""
    import datasets

    problems = Problems(strict=params.mode == "strict")
    out_dir = root / params.out_dir
    metrics: dict = {"mode": params.mode}
    for kind in KINDS:
        sources = getattr(params, f"{kind}_sources")
        rows, tally, per_source = collect(kind, sources, params, problems)
        if sources and tally.kept == 0:
            raise IngestError(
                f"ingest.{kind}_sources: no {kind} example survived cleaning (see dropped counts: {dict(tally.dropped)})"
            )
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
        for split, split_rows in rows.items():
            features = _features(kind)
            columns = {name: [row[name] for row in split_rows] for name in features}
            ds = datasets.Dataset.from_dict(columns, features=features)
            with atomic_path(out_dir / kind / f"{split}.parquet") as tmp:
                ds.to_parquet(str(tmp))
        metrics[kind] = {**tally.as_dict(), "sources": per_source}
    metrics["skipped_bad_input"] = dict(sorted(problems.counts.items()))
    metrics["skipped_examples"] = problems.examples
    return metrics


def load_split(root: Path, out_dir: str, kind: str, split: str):
    """Read one ingested split back as a `datasets.Dataset`."""
    import datasets
    import pyarrow.parquet as pq

    path = root / out_dir / kind / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run the ingest stage first (dvc repro ingest)")
    # Read in memory: the `datasets` file cache keys on path and could serve a stale copy.
    return datasets.Dataset(datasets.table.InMemoryTable(pq.read_table(path)))
