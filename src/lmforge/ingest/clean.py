"""Text cleanup, length filters, exact de-duplication and the content-hash split.

The split is a pure function of an example's content (and a salt), so it never changes
when sources are reordered or grow: an example is in val today iff it is in val tomorrow.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# Control characters except tab and newline carry no text and break tokenizers' byte counts.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str, unicode_form: str = "NFC") -> str:
    """Unicode normalization and whitespace cleanup that keeps line structure (verse, code)."""
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [
        (_SPACES.sub(" ", line) if _has_spaces_to_fold(line) else line).rstrip() for line in text.split("\n")
    ]
    text = "\n".join(lines)
    return (_MANY_NEWLINES.sub("\n\n", text) if "\n\n\n" in text else text).strip()


def _has_spaces_to_fold(line: str) -> bool:
    # Without two spaces in a row, a tab or a no-break space, `_SPACES.sub(" ", line)` is `line`:
    # the substring tests are far faster than the regular expression that would change nothing.
    return "  " in line or "\t" in line or "\u00a0" in line


def content_key(example: dict) -> str:
    """Canonical JSON of an example: the identity used for de-duplication."""
    return json.dumps(example, sort_keys=True, ensure_ascii=False)


def split_key(example: dict, content: str | None = None) -> str:
    """What decides the split: the prompt for dialogues (so a prompt never straddles train/val).

    `content`, when given, is `content_key(example)` already computed (it is the key for text).
    """
    if "prompt" in example:
        return content_key({"prompt": example["prompt"]})
    if "messages" in example:
        return content_key({"prompt": [m for m in example["messages"] if m["role"] != "assistant"][:2]})
    return content if content is not None else content_key(example)


def is_val(example: dict, val_fraction: float, salt: str, content: str | None = None) -> bool:
    digest = hashlib.sha256(f"{salt}\0{split_key(example, content)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def example_chars(example: dict) -> int:
    if "text" in example:
        return len(example["text"])
    if "messages" in example:
        return sum(len(m["content"]) for m in example["messages"])
    return sum(len(m["content"]) for m in example["prompt"]) + max(
        len(example["chosen"]), len(example["rejected"])
    )


def clean_example(example: dict, unicode_form: str) -> dict:
    def msgs(messages: list[dict]) -> list[dict]:
        return [{"role": m["role"], "content": clean_text(m["content"], unicode_form)} for m in messages]

    if "text" in example:
        return {"text": clean_text(example["text"], unicode_form)}
    if "messages" in example:
        return {"messages": msgs(example["messages"])}
    return {
        "prompt": msgs(example["prompt"]),
        "chosen": clean_text(example["chosen"], unicode_form),
        "rejected": clean_text(example["rejected"], unicode_form),
    }


@dataclass
class Tally:
    """Counts for the metrics file: records and bytes in, kept, and dropped per reason."""

    records_in: int = 0
    bytes_in: int = 0
    kept: int = 0
    bytes_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "records_in": self.records_in,
            "bytes_in": self.bytes_in,
            "kept": self.kept,
            "bytes_kept": self.bytes_kept,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": sum(self.dropped.values()),
            "train": self.splits["train"],
            "val": self.splits["val"],
        }


class Deduper:
    """Exact de-duplication on cleaned content (first occurrence wins).

    Keeps a 64-bit BLAKE2b digest of each distinct example's `content_key`, never the example:
    the newest digests in a small Python set, the rest in one sorted NumPy array (8 bytes each),
    merged in whenever the set reaches `PENDING_MAX`. About 8 bytes per distinct example (10
    million distinct documents: 80 MB); two different examples share a digest with probability
    about n**2 / 2**65 over the whole run (n = 10 million: 3e-6).
    """

    PENDING_MAX = 1 << 18

    def __init__(self) -> None:
        import numpy as np

        self._np = np
        self._pending: set[int] = set()
        self._sorted = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._pending) + len(self._sorted)

    def is_new(self, example: dict, content: bytes | None = None) -> bool:
        """`content`, when given, is `content_key(example)` already encoded as UTF-8."""
        if content is None:
            content = content_key(example).encode()
        digest = int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "little", signed=True)
        if digest in self._pending:
            return False
        seen = self._sorted
        if len(seen):
            at = seen.searchsorted(digest)
            if at < len(seen) and seen[at] == digest:
                return False
        self._pending.add(digest)
        if len(self._pending) >= self.PENDING_MAX:
            self._merge()
        return True

    def _merge(self) -> None:
        np = self._np
        new = np.fromiter(self._pending, dtype=np.int64, count=len(self._pending))
        new.sort()
        # Two sorted runs: the stable sort (timsort) merges them in linear time.
        self._sorted = np.sort(np.concatenate([self._sorted, new]), kind="stable")
        self._pending = set()
