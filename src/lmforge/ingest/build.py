"""The ingest recipe: sources -> normalized, cleaned, de-duplicated, split Parquet datasets.

Streams: each source is read lazily (`read_source`), each record is cleaned, checked against the
de-duplicator (a set of content digests) and appended to its split's output, which writes a Parquet
row group whenever `writer.ROW_GROUP_BYTES` of rows are buffered. Memory is bounded by one row
group per split plus ~100 bytes per distinct example, whatever the corpus size.

Writes `<out_dir>/{text,sft,preference}/{train,val}.parquet` (rows in source order, then file and
line order, as they are read) to temporary files beside the targets and renames them into place
only when the whole run succeeded: a run that stops (strict mode) leaves the previous outputs
untouched and no temporary file. Returns the metrics (records and bytes in, kept, dropped per
reason, per kind and per source).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmforge.ingest.clean import Deduper, Tally, clean_example, content_key, example_chars, is_val
from lmforge.ingest.readers import READER_REASONS, IngestError, Problems, read_source
from lmforge.ingest.schemas import Filtered, RecordProblem, to_preference, to_sft, to_text
from lmforge.ingest.writer import Outputs, SplitWriter
from lmforge.params import IngestParams, SourceSpec
from lmforge.progress import Progress

KINDS = ("text", "sft", "preference")
SPLITS = ("train", "val")


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
    kind: str,
    sources: list[SourceSpec],
    params: IngestParams,
    problems: Problems,
    outputs: dict[str, SplitWriter],
) -> tuple[Tally, dict]:
    """Read, normalize, clean, filter, de-duplicate and split every source of one kind.

    Kept rows go to `outputs[split]` as they are found; returns the tally and per-source counts.
    """
    tally, per_source = Tally(), {}
    dedup = Deduper()
    for spec in sources:
        src = Tally()
        convert = _converter(kind, spec)
        before = problems.counts.copy()
        label = spec.label
        label_bytes = len(label.encode())
        # The readers report a file's bytes on disk; a Hugging Face dataset's size is its records'.
        record_bytes = spec.hf_dataset is not None
        with Progress(f"ingest {kind} {label}", unit="bytes", check_every=256) as progress:
            for where, record in read_source(spec, problems, progress):
                raw_bytes = _raw_bytes(record)
                progress.update(1, raw_bytes if record_bytes else 0)
                src.records_in += 1
                src.bytes_in += raw_bytes
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
                    continue
                if chars > params.max_chars:
                    src.dropped["too_long"] += 1
                    continue
                key = content_key(example)
                encoded = key.encode()
                if not dedup.is_new(example, encoded):
                    src.dropped["duplicate"] += 1
                    continue
                split = "val" if is_val(example, params.val_fraction, params.split_salt, key) else "train"
                kept_bytes = len(example["text"].encode()) if kind == "text" else len(encoded)
                example["source"] = label
                outputs[split].add(example, kept_bytes + label_bytes)
                src.kept += 1
                src.bytes_kept += kept_bytes
                src.splits[split] += 1
        skipped = problems.counts - before
        src.dropped.update(skipped)
        # Lines the reader could not even parse never reached the loop: count them as input too.
        src.records_in += sum(n for reason, n in skipped.items() if reason in READER_REASONS)
        per_source[label] = src.as_dict()
        for name in ("records_in", "bytes_in", "kept", "bytes_kept"):
            setattr(tally, name, getattr(tally, name) + getattr(src, name))
        tally.dropped.update(src.dropped)
        tally.splits.update(src.splits)
    return tally, per_source


def ingest(params: IngestParams, root: Path = Path(".")) -> dict:
    """Run the whole ingest; returns the metrics dict (also what the stage writes as JSON)."""
    problems = Problems(strict=params.mode == "strict")
    out_dir = root / params.out_dir
    metrics: dict = {"mode": params.mode}
    with Outputs() as outputs:  # every output is renamed into place at the end, or none
        for kind in KINDS:
            sources = getattr(params, f"{kind}_sources")
            writers = {split: outputs.split(out_dir / kind / f"{split}.parquet", kind) for split in SPLITS}
            tally, per_source = collect(kind, sources, params, problems, writers)
            if sources and tally.kept == 0:
                raise IngestError(
                    f"ingest.{kind}_sources: no {kind} example survived cleaning (see dropped counts: {dict(tally.dropped)})"
                )
            for writer in writers.values():
                writer.close()  # the footer; the file stays a hidden temporary until the run succeeds
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
