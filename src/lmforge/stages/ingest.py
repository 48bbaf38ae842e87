"""Stage `ingest`: bundled or user sources -> data/processed/{text,sft,preference}/{train,val}.parquet."""

from __future__ import annotations

from pathlib import Path

from lmforge.ingest.build import ingest
from lmforge.params import Params


def run(params: Params, root: Path) -> dict:
    return ingest(params.ingest, root)
