"""Parquet outputs written as records arrive, in row groups, each file published atomically.

`Outputs` holds every output file of one ingest run. A `SplitWriter` buffers rows (column lists)
and writes a row group each time the buffered content reaches `ROW_GROUP_BYTES`, through one
`pyarrow.parquet.ParquetWriter` on a temporary file beside the target (`lmforge.atomic.atomic_path`).
Nothing is renamed into place until `Outputs` closes without an error: a run that stops (strict
mode, a crash) removes every temporary file and leaves all previous outputs as they were.

The writer settings are those `datasets.Dataset.to_parquet` uses (the `datasets` Features schema
with its `huggingface` metadata, snappy, dictionary encoding, content-defined chunking and the page
index), and a file whose rows fit in one row group is byte-identical to what
`Dataset.from_dict(columns, features).to_parquet(path)` writes: the bundled data (well under
`ROW_GROUP_BYTES`) keeps the exact bytes it had before outputs were streamed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from lmforge.atomic import atomic_path

# Row-group size: rows are buffered until their content (UTF-8 bytes, about the Arrow size) reaches
# this, then written out. Bounds memory (the Python rows plus their Arrow copy while one is written);
# the `datasets` default aims at 100 MB row groups. Candidate param: ingest.row_group_mb (int, 32).
ROW_GROUP_BYTES = 32 * 1024 * 1024
# ... or this many rows, whichever comes first: many tiny rows cost far more Python memory than
# their bytes say (an object per string, a dict per message).
ROW_GROUP_ROWS = 1 << 17


def features(kind: str):
    """The `datasets.Features` of one output kind (the schema every output file carries)."""
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


class SplitWriter:
    """One output Parquet file: `add` rows, row groups go out as they fill, `close` writes the footer."""

    def __init__(
        self, target: Path, kind: str, stack: contextlib.ExitStack, row_group_bytes: int, row_group_rows: int
    ):
        self.target = target
        self.features = features(kind)
        self.schema = self.features.arrow_schema
        self.columns: dict[str, list] = {name: [] for name in self.features}
        self.rows = 0
        self._pending = 0  # rows buffered, not yet written
        self._buffered = 0
        self._row_group_bytes = row_group_bytes
        self._row_group_rows = row_group_rows
        self._stack = stack
        self._writer = None
        self._closed = False

    def add(self, row: dict, nbytes: int) -> None:
        """Buffer one row; `nbytes` is its content size, which decides when a row group is full."""
        for name, values in self.columns.items():
            values.append(row[name])
        self.rows += 1
        self._pending += 1
        self._buffered += nbytes
        if self._buffered >= self._row_group_bytes or self._pending >= self._row_group_rows:
            self._flush()

    def _open(self):
        import datasets
        import pyarrow.parquet as pq
        from datasets.arrow_writer import get_parquet_column_options

        temp = self._stack.enter_context(atomic_path(self.target))
        self._writer = pq.ParquetWriter(
            str(temp),
            schema=self.schema,
            use_content_defined_chunking=datasets.config.DEFAULT_CDC_OPTIONS,
            write_page_index=True,
            **get_parquet_column_options(self.features, self.schema),
        )
        # Runs before atomic_path's exit (LIFO): on an error the half file is closed, then removed.
        self._stack.callback(self._abandon)
        return self._writer

    def _flush(self) -> None:
        import pyarrow as pa

        writer = self._writer or self._open()
        if self._pending:
            writer.write_table(pa.Table.from_pydict(self.columns, schema=self.schema))
        self.columns = {name: [] for name in self.features}
        self._pending = self._buffered = 0

    def close(self) -> None:
        """Write what is buffered and the footer (an empty split is a file with the schema and no rows)."""
        if self._closed:
            return
        self._flush()
        import datasets

        self._writer.add_key_value_metadata(
            {"content_defined_chunking": json.dumps(datasets.config.DEFAULT_CDC_OPTIONS)}
        )
        self._writer.close()
        self._closed = True

    def _abandon(self) -> None:
        if not self._closed and self._writer is not None:
            self._closed = True
            with contextlib.suppress(Exception):
                self._writer.close()


class Outputs(contextlib.ExitStack):
    """Every output file of a run; renamed into place together when the `with` block succeeds.

    with Outputs() as outputs:
        w = outputs.split(out_dir / "text" / "train.parquet", "text")
        w.add(row, nbytes)
        ...
        w.close()
    # here every file is in place; after an exception, none was touched and no temporary is left
    # (nor a folder this run created)
    """

    def __init__(self, row_group_bytes: int | None = None, row_group_rows: int | None = None):
        super().__init__()
        self.row_group_bytes = row_group_bytes or ROW_GROUP_BYTES
        self.row_group_rows = row_group_rows or ROW_GROUP_ROWS
        self.writers: list[SplitWriter] = []
        self._new_folders: list[Path] = []  # missing when the run began, deepest first

    def split(self, target: Path, kind: str) -> SplitWriter:
        folder = Path(target).parent
        while not folder.exists() and folder not in self._new_folders:
            self._new_folders.append(folder)
            folder = folder.parent
        writer = SplitWriter(Path(target), kind, self, self.row_group_bytes, self.row_group_rows)
        self.writers.append(writer)
        return writer

    def _remove_new_folders(self) -> None:
        for folder in sorted(self._new_folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty (someone else's files) or already gone
                folder.rmdir()

    def __exit__(self, *exc_info):
        if exc_info[0] is None:
            try:
                for writer in self.writers:
                    writer.close()
            except BaseException as err:  # a failed close publishes nothing
                try:
                    if super().__exit__(type(err), err, err.__traceback__):
                        return True
                finally:
                    self._remove_new_folders()
                raise
            return super().__exit__(*exc_info)
        try:
            return super().__exit__(*exc_info)
        finally:
            self._remove_new_folders()
