"""Ingested dialogues and pairs, loaded for the post-training stages (pipeline edge: `datasets`)."""

from __future__ import annotations

from pathlib import Path

from lmforge.ingest.build import load_split
from lmforge.params import Params


def conversations(root: Path, params: Params, split: str) -> list[list[dict]]:
    return list(load_split(root, params.ingest.out_dir, "sft", split)["messages"])


def pairs(root: Path, params: Params, split: str) -> list[dict]:
    ds = load_split(root, params.ingest.out_dir, "preference", split)
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in ds]


def prompts_of(convs: list[list[dict]], limit: int) -> list[list[dict]]:
    """The held-out prompts: each conversation up to (not including) its last assistant turn."""
    out = []
    for conv in convs:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        out.append(conv[:last])
    return out[:limit]
