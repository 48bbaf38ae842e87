"""Held-out items of the lmforge tasks for lm-evaluation-harness, read from the ingested splits.

Each loader is the task's ``custom_dataset``; the harness calls it with the task metadata, where
``root`` (the repository, default: the working directory) and ``data`` (``ingest.out_dir``, default
``data/processed``) say where the splits are: ``--metadata '{"root": "/path/to/lmforge"}'``.
GSM8K reads its bundled test split (``gsm8k``: the file, relative to ``root``).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import datasets

from lmforge.ingest.build import load_split
from lmforge.training.verifiable import answer, is_correct, is_task, question_of, question_turn

DATA = "data/processed"


def _split(kind: str, root: str = ".", data: str = DATA, **_: Any) -> datasets.Dataset:
    return load_split(Path(root), data, kind, "val")


def reverse(**metadata: Any) -> dict[str, datasets.Dataset]:
    rows = []
    for dialogue in _split("sft", **metadata)["messages"]:
        if is_task(dialogue):
            question = str(question_turn(dialogue)[-1]["content"])
            letters = question_of(question)
            rows.append({"question": question, "letters": letters, "answer": answer(letters)})
    return {"test": datasets.Dataset.from_list(rows)}


def reverse_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(is_correct(doc["letters"], results[0]))}


def preference(**metadata: Any) -> dict[str, datasets.Dataset]:
    rows = []
    for pair in _split("preference", **metadata):
        turns = pair["prompt"]
        if len(turns) != 1 or turns[0]["role"] != "user":
            raise ValueError(f"lmforge_preference: a prompt must be one user turn, got {len(turns)} turns")
        rows.append({"prompt": turns[0]["content"], "chosen": pair["chosen"], "rejected": pair["rejected"]})
    return {"test": datasets.Dataset.from_list(rows)}


def val_text(**metadata: Any) -> dict[str, datasets.Dataset]:
    return {"test": datasets.Dataset.from_list([{"text": t} for t in _split("text", **metadata)["text"]])}


GSM8K = "data/raw/gsm8k/test.jsonl.gz"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k(root: str = ".", gsm8k: str = GSM8K, **_: Any) -> dict[str, datasets.Dataset]:
    path = Path(root) / gsm8k
    rows = []
    with (
        gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f
    ):
        for n, line in enumerate(f, 1):
            record = json.loads(line)
            answer = final_number(record["answer"])
            if answer is None:
                raise ValueError(f"{path}:{n}: answer has no '#### <number>'")
            rows.append({"question": record["question"], "answer": answer})
    return {"test": datasets.Dataset.from_list(rows)}


def final_number(text: str) -> str | None:
    """The number after ``####`` (GSM8K's answer line), else the text's last number; commas and a
    trailing ``.0`` dropped (``1,000.0`` -> ``1000``). None when the text has no number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    number = numbers[0] if "####" in text else numbers[-1]
    number = number.replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def gsm8k_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(final_number(results[0]) == doc["answer"])}
