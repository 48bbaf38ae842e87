"""Write parameter overrides into params.yaml, the way `dvc exp run -S key=value` does.

A run that used `preset=small` and `pretrain.max_steps=50` records exactly that in params.yaml
(top-level sections, comments and layout kept: ruamel.yaml round-trip, the parser DVC itself uses),
so a later plain `dvc repro` reproduces it. Overrides are validated with
:func:`lmforge.params.load_params` first; an invalid one raises :class:`ParamsError` and leaves the
file untouched. Used by the Prefect flow and by `lmforge run --set/--preset`.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from lmforge.params import ParamsError, load_params, override_key, parse_override


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments, key order, flow/block style kept
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long flow mappings
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _plain(value: Any) -> Any:
    """ruamel's commented containers as plain dicts/lists, for comparisons and reports."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def normalize_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """`{"pretrain.max_steps": 50}` or `["pretrain.max_steps=50"]` -> `{"pretrain.max_steps": 50}`."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return {".".join(override_key(key)): value for key, value in overrides.items()}
    return {".".join(parts): value for parts, value in (parse_override(text) for text in overrides)}


def apply_overrides(
    path: str | Path, preset: str | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Validate, then write `preset` and `overrides` into the params file's top-level sections.

    Returns what changed: ``{"pretrain.max_steps": {"old": 450, "new": 50}, ...}`` (``old`` is
    None for a key the file did not set). Keys already holding the value are left out; an
    unchanged file is not rewritten.
    """
    path = Path(path)
    items = normalize_overrides(overrides)
    if preset is not None:
        items = {"preset": preset, **{k: v for k, v in items.items() if k != "preset"}}
    load_params(path, items)  # raises ParamsError naming the key; the file is not touched

    yaml = _yaml()
    text = path.read_text(encoding="utf-8")
    data = yaml.load(text)
    if data is None:
        data = yaml.load("{}\n")
    changed: dict[str, dict[str, Any]] = {}
    for key, value in items.items():
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                node[part] = child = yaml.load("{}\n")  # a mapping that keeps ruamel's styling hooks
            elif not isinstance(child, dict):
                raise ParamsError(f"cannot set {key}: {part} is not a section in {path}")
            node = child
        old = _plain(node.get(parts[-1])) if parts[-1] in node else None
        if parts[-1] in node and old == _plain(value):
            continue
        node[parts[-1]] = copy.deepcopy(value)
        changed[key] = {"old": old, "new": _plain(value)}
    if not changed:
        return changed

    buf = io.StringIO()
    yaml.dump(data, buf)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
        load_params(tmp)  # what we wrote resolves to valid params
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return changed
