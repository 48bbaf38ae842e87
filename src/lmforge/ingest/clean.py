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
    lines = [_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def content_key(example: dict) -> str:
    """Canonical JSON of an example: the identity used for de-duplication."""
    return json.dumps(example, sort_keys=True, ensure_ascii=False)


def split_key(example: dict) -> str:
    """What decides the split: the prompt for dialogues (so a prompt never straddles train/val)."""
    if "prompt" in example:
        return content_key({"prompt": example["prompt"]})
    if "messages" in example:
        return content_key({"prompt": [m for m in example["messages"] if m["role"] != "assistant"][:2]})
    return content_key(example)


def is_val(example: dict, val_fraction: float, salt: str) -> bool:
    digest = hashlib.sha256(f"{salt}\0{split_key(example)}".encode()).digest()
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
    """Exact de-duplication on cleaned content (first occurrence wins)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_new(self, example: dict) -> bool:
        digest = hashlib.blake2b(content_key(example).encode(), digest_size=16).digest()
        if digest in self._seen:
            return False
        self._seen.add(digest)
        return True
