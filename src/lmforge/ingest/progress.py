"""Progress of reading one source: a tqdm bar on stderr with MB/s and records/s.

Bytes are the source's bytes on disk as the readers consume them (compressed bytes for a
compressed file, so the bar reaches 100% of the files' size); for a Hugging Face dataset, whose
size is unknown, they are the records' own sizes. The bar is shown when stderr is a terminal
(`SHOW` forces it on or off); updates are batched so the bar costs nothing per record.
"""

from __future__ import annotations

import sys
import time

# None: show the bars when stderr is a terminal; True/False: always/never.
SHOW: bool | None = None
_REFRESH_EVERY = 256  # records between clock checks
_REFRESH_SECONDS = 0.25


class Progress:
    def __init__(self, desc: str, total_bytes: int | None = None, count_record_bytes: bool = False):
        from tqdm import tqdm

        self.records = 0
        self.bytes = 0
        self._shown_bytes = 0
        self._count_record_bytes = count_record_bytes
        self._start = self._last = time.perf_counter()
        self._since = 0
        disable = (not sys.stderr.isatty()) if SHOW is None else not SHOW
        self.bar = tqdm(
            total=total_bytes or None,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            file=sys.stderr,
            disable=disable,
            leave=True,
            mininterval=_REFRESH_SECONDS,
        )

    def set_total(self, total_bytes: int | None) -> None:
        """Size of the source's files, once the readers know them (makes the bar a percentage)."""
        self.bar.total = total_bytes or None
        self.bar.refresh()

    def add_bytes(self, n: int) -> None:
        """Source bytes consumed (called by the readers)."""
        self.bytes += n

    def record(self, nbytes: int) -> None:
        """One record read; `nbytes` counts only where the readers cannot tell source bytes."""
        self.records += 1
        if self._count_record_bytes:
            self.bytes += nbytes
        self._since += 1
        if self._since >= _REFRESH_EVERY:
            self._since = 0
            now = time.perf_counter()
            if now - self._last >= _REFRESH_SECONDS:
                self._last = now
                self._refresh(now)

    def _refresh(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        self.bar.set_postfix_str(f"{self.records:,} records, {self.records / elapsed:,.0f} records/s", False)
        self.bar.update(self.bytes - self._shown_bytes)
        self._shown_bytes = self.bytes

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start

    def close(self) -> None:
        self._refresh(time.perf_counter())
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
