"""JSON text read defensively: nesting measured without recursion, and the items of a top-level
list located by line (and salvaged from a list cut short)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

# Deepest JSON nesting accepted (a JSON Lines line, or a whole .json file with its list). Real
# records nest a few levels; far deeper input is hostile and would exhaust the recursion limit.
MAX_DEPTH = 256

# A JSON string (possibly unterminated) or a bracket: brackets inside strings do not nest.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


def too_deep_at(text: str, limit: int = MAX_DEPTH) -> int | None:
    """Offset of the first bracket nested deeper than `limit`, or None. Iterative: never recurses."""
    if text.count("[") + text.count("{") <= limit:
        return None
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        char = text[match.start()]
        if char in "[{":
            depth += 1
            if depth > limit:
                return match.start()
        elif char in "]}":
            depth = max(depth - 1, 0)
    return None


TOO_DEEP = f"JSON nested deeper than {MAX_DEPTH} levels"


def list_items(text: str) -> Iterator[tuple[int, Any]]:
    """(line, item) of each top-level item of the first JSON list in `text`, in order."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    length = len(text)
    while pos < length:
        while pos < length and text[pos] in " \t\r\n,":
            if text[pos] == "\n":
                line += 1
            pos += 1
        if pos >= length or text[pos] == "]":
            break
        item, end = decoder.raw_decode(text, pos)
        yield line, item
        line += text.count("\n", pos, end)
        pos = end


def item_lines(text: str) -> list[int]:
    try:
        return [line for line, _ in list_items(text)]
    except (json.JSONDecodeError, RecursionError, ValueError):
        return []  # items are then named by index


def salvage_list(text: str) -> Iterator[tuple[int, Any]]:
    """Whole items of a top-level JSON list cut short, up to the first one that is not whole."""
    if not text.lstrip().startswith("["):
        return
    items = list_items(text)
    while True:
        try:
            yield next(items)
        except (StopIteration, json.JSONDecodeError, RecursionError):
            return
