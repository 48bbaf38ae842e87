"""What goes wrong while reading a source: where a record came from, and the ledger of problems.

In strict mode the first problem raises :class:`IngestError` naming file and line; in lenient mode
each is counted per reason (with one example) and the record is skipped: nothing is dropped
without a count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


class IngestError(ValueError):
    """Bad input that stops the stage; the message names file, line and field."""


def ignore(_n: int) -> None:
    pass


OnBytes = Callable[[int], None]  # told how many bytes of the source file were just read


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
