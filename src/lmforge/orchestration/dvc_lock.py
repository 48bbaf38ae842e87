"""DVC's lock file: remove the `.dvc/tmp/rwlock` entries of DVC processes that are dead.

A `dvc repro` killed with SIGTERM/SIGKILL leaves its entries behind; :func:`clear_stale_rwlock`
removes them (call it before a run starts). Standard library only (and `lmforge.atomic`). POSIX only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_text
from lmforge.orchestration.process_groups import POLL_S, is_zombie

# `core.hardlink_lock = true` guards the rwlock with flufl.lock instead of an flock: not ours to take.
_HARDLINK_LOCK = re.compile(r"^\s*hardlink_lock\s*=\s*(true|1|yes)\s*$", re.IGNORECASE | re.MULTILINE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not is_zombie(pid)


def clear_stale_rwlock(repo_root: str | os.PathLike[str], timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Remove the entries of dead processes from DVC's `<repo>/.dvc/tmp/rwlock`; returns what was removed.

    `dvc repro` records in that file, per path, which process reads or writes it, and removes its
    entries when it ends, also on Ctrl-C. A `dvc repro` killed with SIGTERM or SIGKILL leaves its
    entries behind. DVC itself drops an entry whose pid is dead, but only for the paths a later run
    locks, and an entry whose pid was reused by an unrelated live process blocks every later run
    ("'<path>' is busy, it is being blocked by: (PID n)") until someone deletes the file by hand.
    Call this before a run starts: only entries whose process no longer exists (or is a zombie)
    are removed; live DVC processes keep theirs.

    The file is edited under DVC's own guard (an flock on `rwlock.lock`, as DVC's default zc.lockfile
    takes it), waiting up to `timeout_s` for it; with `core.hardlink_lock` set, or if the guard stays
    taken, nothing is touched. A file that is not valid JSON (a writer killed mid-write: DVC would
    refuse to run) is moved aside to `rwlock.corrupt` and reported as one entry of mode "corrupt".
    Each removed entry: {"mode": "read"|"write"|"corrupt", "path", "pid", "cmd"}.
    """
    root = Path(repo_root)
    tmp = root / ".dvc" / "tmp"
    path = tmp / "rwlock"
    if not path.is_file():
        return []
    for config in (root / ".dvc" / "config", root / ".dvc" / "config.local"):
        with contextlib.suppress(OSError):
            if _HARDLINK_LOCK.search(config.read_text(errors="replace")):
                return []
    with open(tmp / "rwlock.lock", "a+") as guard:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(guard.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return []
                time.sleep(POLL_S)
        try:
            return _clear_stale_entries(path)
        finally:
            fcntl.flock(guard.fileno(), fcntl.LOCK_UN)


def _clear_stale_entries(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        lock = json.loads(text)
        if not isinstance(lock, dict):
            raise ValueError("not an object")
    except ValueError:
        os.replace(path, path.with_name("rwlock.corrupt"))
        return [{"mode": "corrupt", "path": str(path), "pid": None, "cmd": text[:200]}]
    removed: list[dict[str, Any]] = []

    def keep(mode: str, target: str, info: Any) -> bool:
        try:
            pid = int(info["pid"])
        except (TypeError, KeyError, ValueError):
            return True  # not an entry we understand: DVC's business
        if pid <= 0 or _pid_alive(pid):
            return True
        removed.append({"mode": mode, "path": target, "pid": pid, "cmd": info.get("cmd", "")})
        return False

    writes = lock.get("write")
    if isinstance(writes, dict):
        lock["write"] = {p: info for p, info in writes.items() if keep("write", p, info)}
        if not lock["write"]:
            del lock["write"]
    reads = lock.get("read")
    if isinstance(reads, dict):
        kept: dict[str, Any] = {}
        for target, infos in reads.items():
            if not isinstance(infos, list):
                kept[target] = infos
                continue
            alive = [info for info in infos if keep("read", target, info)]
            if alive:
                kept[target] = alive
        lock["read"] = kept
        if not kept:
            del lock["read"]
    if removed:
        atomic_write_text(path, json.dumps(lock))
    return removed
