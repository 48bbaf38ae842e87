"""Crash-safe training checkpoints: atomic saves, the previous good one kept, corrupt ones refused.

Layout of a run's checkpoint folder::

    last.ckpt        the newest checkpoint (written beside it, fsynced, then renamed over it)
    last.prev.ckpt   the one before it: what a resume falls back to when last.ckpt is unreadable
    run.json         {"key": ...}: the fingerprint of the run (config, initial weights, data) the
                     checkpoints belong to; a resume only continues a run with the same key

A process killed at any point (kill -9 included) leaves either a complete `last.ckpt`, or a
complete `last.prev.ckpt`, plus at most a temporary file that is never read and is deleted on
the next start. Core only: torch, lightning, stdlib.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_warn

from lmforge.atomic import atomic_path, atomic_write_text, remove_stale_temporaries

LAST_CKPT = "last.ckpt"
PREV_CKPT = "last.prev.ckpt"
RUN_FILE = "run.json"
# Fault injection for the crash tests: SIGKILL this process halfway through writing its N-th save.
FAULT_ENV = "LMFORGE_FAULT_KILL_IN_SAVE"


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected; the message names the files."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temporary file, fsync, keep the old file as `*.prev.ckpt`, rename."""

    def __init__(self) -> None:
        super().__init__()
        self.saves = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        self.saves += 1
        with atomic_path(path) as tmp:
            kill_at = os.environ.get(FAULT_ENV)
            if kill_at and int(kill_at) == self.saves:
                buf = io.BytesIO()
                torch.save(checkpoint, buf)
                with tmp.open("wb") as fh:
                    fh.write(buf.getvalue()[: buf.tell() // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save(checkpoint, tmp)
            if path.is_file():
                # Keep the current file as the previous good one (a hard link, then an atomic rename).
                prev = path.with_name(path.name.replace(".ckpt", ".prev.ckpt"))
                link = prev.with_name(prev.name + ".link")
                if link.exists():
                    link.unlink()
                os.link(path, link)
                os.replace(link, prev)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint (tensors and plain types only: no arbitrary unpickling)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a bad pickle stream, a wrong file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint (no state_dict / global_step)")
    return ckpt


def resume_path(ckpt_dir: Path, key: str | None, *, tidy: bool = True) -> Path | None:
    """The newest readable checkpoint of the run `key` in `ckpt_dir`, or None to start afresh.

    Stale temporaries are deleted; checkpoints of another run (a different key) are deleted with a
    warning; an unreadable checkpoint is renamed `*.corrupt` with a warning naming it, and the
    previous good one is used instead. With tidy=False (ranks other than 0) nothing is changed on
    disk: the same choice is made read-only.
    """
    for stale in remove_stale_temporaries(ckpt_dir) if tidy else ():
        rank_zero_warn(f"removed {stale}: a checkpoint save that did not finish (the process was killed)")
    if not ckpt_dir.is_dir():
        return None
    run_file = ckpt_dir / RUN_FILE
    recorded = json.loads(run_file.read_text()).get("key") if run_file.is_file() else None
    candidates = [p for p in (ckpt_dir / LAST_CKPT, ckpt_dir / PREV_CKPT) if p.is_file()]
    if candidates and key is not None and recorded != key:
        rank_zero_warn(
            f"{ckpt_dir}: checkpoints belong to another run (config, inputs or seed changed); starting afresh"
        )
        for p in candidates if tidy else ():
            p.unlink()
        return None
    for i, path in enumerate(candidates):
        try:
            read_checkpoint(path)
        except CheckpointError as err:
            fallback = candidates[i + 1] if i + 1 < len(candidates) else None
            bad = path.with_name(path.name + ".corrupt")
            if tidy:
                os.replace(path, bad)
            rank_zero_warn(
                f"{err}; moved it to {bad.name} and "
                + (f"resuming from the previous checkpoint {fallback}" if fallback else "starting afresh")
            )
            continue
        return path
    return None


def mark_run(ckpt_dir: Path, key: str | None) -> None:
    """Record which run the checkpoints in `ckpt_dir` belong to (before the first one is written)."""
    if key is not None:
        atomic_write_text(ckpt_dir / RUN_FILE, json.dumps({"key": key}) + "\n")


def run_key(module: torch.nn.Module, datamodule: Any, config: dict[str, Any]) -> str:
    """Fingerprint of a training run: its config, the module's hparams and initial weights, its data.

    Two runs with the same key make the same steps, so one may continue the other's checkpoints.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(json.dumps(dict(getattr(module, "hparams", {})), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        if tensor.device.type != "meta":
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    fingerprint = getattr(datamodule, "fingerprint", None)
    data = fingerprint() if callable(fingerprint) else getattr(datamodule, "state_dict", dict)()
    h.update(json.dumps(data, sort_keys=True, default=str).encode())
    return h.hexdigest()
