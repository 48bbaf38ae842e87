"""Where the project and its local state live (MLflow store, Prefect home, caches).

State stays inside the project folder (gitignored) so runs never leak across checkouts.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """`LMFORGE_ROOT`, else the nearest folder upward from the cwd holding params.yaml, else the cwd."""
    if env := os.environ.get("LMFORGE_ROOT"):
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    return here


def state_dir(name: str) -> Path:
    """A folder under `<root>/.lmforge/` for local state of one tool, created on demand."""
    path = project_root() / ".lmforge" / name
    path.mkdir(parents=True, exist_ok=True)
    return path
