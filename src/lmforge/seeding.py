"""One seed for a run, a derived seed per stage, and the switches that make CPU runs bitwise repeatable.

Derivation: ``stage_seed(seed, "pretrain")`` is the first 4 bytes of
``sha256(f"lmforge/{seed}/pretrain")`` as an unsigned int below 2**31. Every random draw of a
stage comes from generators seeded with that number (or with numbers derived from it the same
way: data order, rollout sampling), never from whatever state the global generators are in.

Determinism (see README "Reproducibility"):
- ``torch.use_deterministic_algorithms(True)``: no non-deterministic kernels (an error instead).
- ``MKL_CBWR=AUTO``: MKL's conditional numerical reproducibility, so results do not depend on the
  memory alignment of a buffer. Read when MKL starts: `lmforge/__init__.py` sets it before torch
  is imported. ``CUBLAS_WORKSPACE_CONFIG`` is the CUDA counterpart for cuBLAS.
Core only: torch, numpy, stdlib.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random

import numpy as np
import torch

from lmforge import DETERMINISM_ENV  # the variables determinism depends on, defaulted at import


def set_determinism_env() -> None:
    """Default the variables MKL/cuBLAS read at start-up (a user's own setting wins)."""
    for key, value in DETERMINISM_ENV.items():
        os.environ.setdefault(key, value)


def derive_seed(seed: int, *names: str | int) -> int:
    """A seed for a named part of a run: sha256 over the run seed and the names, below 2**31."""
    text = "/".join(["lmforge", str(int(seed)), *(str(n) for n in names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFF_FFFF


def seed_everything(seed: int) -> int:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    return seed


def use_deterministic(enabled: bool = True) -> None:
    """Deterministic kernels everywhere (errors on ops that have none) and no autotuning."""
    set_determinism_env()
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """What bitwise reproducibility depends on: record it with every run and registered model."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": name or platform.machine(),
        "cuda": str(torch.version.cuda),
        "threads": str(torch.get_num_threads()),
        "deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()),
        "mkl_cbwr": os.environ.get("MKL_CBWR", ""),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
