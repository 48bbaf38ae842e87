"""Progress of a long data stage: a tqdm bar on stderr counting records and bytes, with rates.

One of the two counts is the bar (`unit`: "records", with ETA when the total is known, or "bytes",
e.g. a source's bytes on disk so the bar reaches 100% of its files); the other is shown beside it
with its rate (MB/s or records/s). Shown when stderr is a terminal (`SHOW` forces it on or off).
Updates are cheap: the clock is read once every `check_every` updates and the bar redrawn at most
every 0.25 s, so per-record callers pass a check_every of a few hundred or thousand.
"""

from __future__ import annotations

import sys
import time
from typing import Literal

# None: show the bars when stderr is a terminal; True/False: always/never.
SHOW: bool | None = None
REFRESH_SECONDS = 0.25


class Progress:
    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        unit: Literal["records", "bytes"] = "records",
        check_every: int = 1,
    ) -> None:
        from tqdm import tqdm

        self.unit, self.check_every = unit, check_every
        self.records = self.bytes = 0
        self._calls = self._shown = 0
        self.start = self._last = time.perf_counter()
        by_bytes = unit == "bytes"
        self.bar = tqdm(
            desc=desc,
            total=total or None,
            unit="B" if by_bytes else "rec",
            unit_scale=True,
            unit_divisor=1000,
            file=sys.stderr,
            disable=(not sys.stderr.isatty()) if SHOW is None else not SHOW,
            dynamic_ncols=True,
            mininterval=REFRESH_SECONDS,
        )

    def set_total(self, total: int | None) -> None:
        """The total, once known (makes the bar a percentage)."""
        self.bar.total = total or None
        self.bar.refresh()

    def update(self, records: int = 0, n_bytes: int = 0) -> None:
        self.records += records
        self.bytes += n_bytes
        self._calls += 1
        if self._calls >= self.check_every:
            self._calls = 0
            now = time.perf_counter()
            if now - self._last >= REFRESH_SECONDS:
                self._last = now
                self._refresh()

    def add_bytes(self, n_bytes: int) -> None:
        """Bytes consumed (the ingest readers' callback)."""
        self.update(n_bytes=n_bytes)

    def _refresh(self) -> None:
        if self.unit == "bytes":
            rate = self.records / max(self.seconds, 1e-9)
            self.bar.set_postfix_str(f"{self.records:,} records, {rate:,.0f} records/s", refresh=False)
            shown = self.bytes
        else:
            self.bar.set_postfix_str(
                f"{self.bytes / 1e6:,.1f}MB, {self.mb_per_second:,.2f}MB/s", refresh=False
            )
            shown = self.records
        self.bar.update(shown - self._shown)
        self._shown = shown

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def close(self) -> None:
        self._refresh()
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
