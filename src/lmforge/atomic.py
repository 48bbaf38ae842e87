"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written file.

The new content goes to a temporary file in the target's own directory (so the final rename
stays on one filesystem), is flushed to disk, and is then moved over the target with
`os.replace`. If the write fails, the temporary file is removed and the old target is left
as it was. Temporary names are hidden (`.<name>.<random>.tmp`) so directory scans skip them;
`remove_stale_temporaries` deletes the ones a killed process left behind.

Standard library only: the training core uses this too.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

# `.<target name>.<8 hex>.tmp`: what `atomic_path` creates, and all that `remove_stale_temporaries` removes.
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def _reserve_temp(target: Path) -> Path:
    """Create an empty, uniquely named file next to `target` (mode from the umask, like `open`)."""
    for _ in range(100):
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return temp
    raise FileExistsError(f"{target}: cannot create a temporary file next to it")


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if directory:  # some platforms cannot open a directory; the rename itself is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on an exception it is removed.

    with atomic_path("out/train.parquet") as tmp:
        table.to_parquet(tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)  # a new output folder needs no separate mkdir
    temp = _reserve_temp(target)
    try:
        yield temp
        if target.exists():  # an overwrite keeps the old file's permissions, as writing in place did
            os.chmod(temp, stat.S_IMODE(target.stat().st_mode))
        _fsync(temp)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync(target.parent, directory=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in `directory` (not recursive).

    Only names `atomic_path` creates are touched. Call it where no write is in flight (at the start
    of a run). Returns the removed paths, sorted; a missing directory has none.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if _TEMP_NAME.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed
