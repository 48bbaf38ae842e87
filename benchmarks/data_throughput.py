"""Data path at scale: ingest, tokenizer and shards on a synthetic corpus of a given size.

    python benchmarks/data_throughput.py --size-mb 400
    python benchmarks/data_throughput.py --size-mb 2000 --vocab-size 32768 --max-train-mb 200

Synthesizes a deterministic corpus of `--size-mb` MB of JSON Lines (uncompressed size), gzipped, in
`--files` files: varied text (Zipf-distributed words from the bundled tiny-shakespeare), about 2% exact
duplicates and a few bad records (malformed JSON, a missing text field, a record nested too deep).
Then runs `lmforge ingest` (lenient), `lmforge tokenizer` and `lmforge shards` on it in a throwaway
project, and prints for each stage its wall time, MB/s of corpus text and the peak resident memory
of the stage's whole process tree (proportional set size summed over the stage and its workers,
sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "tokenizer", "shards")


def vocabulary() -> list[str]:
    text = (ROOT / "data/raw/tinyshakespeare/input.txt").read_text(encoding="utf-8")
    counts: dict[str, int] = {}
    for w in re.findall(r"[A-Za-z']+|[.,;:!?]", text):
        counts[w] = counts.get(w, 0) + 1
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def synthesize(out_dir: Path, size_mb: int, files: int, seed: int = 0) -> dict:
    """Deterministic gzipped JSON Lines; returns counts of what was written."""
    words = np.array(vocabulary())
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, len(words) + 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    target = size_mb * 1_000_000
    per_file = target // files
    stats = {"records": 0, "duplicates": 0, "bad": 0, "bytes": 0}
    recent: list[str] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        written = 0
        with gzip.open(out_dir / f"part-{f:04d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as fh:
            while written < per_file:
                block = rng.choice(len(words), size=(256, int(rng.integers(80, 700))), p=p)
                lengths = rng.integers(40, block.shape[1] + 1, size=256)
                for row, n in zip(block, lengths):
                    r = rng.random()
                    if r < 0.02 and recent:
                        line = recent[int(rng.integers(len(recent)))]
                        stats["duplicates"] += 1
                    elif r < 0.0202:
                        line = '{"text": "broken record'  # malformed JSON
                        stats["bad"] += 1
                    elif r < 0.0204:
                        line = json.dumps({"title": "no text field"})
                        stats["bad"] += 1
                    else:
                        text = " ".join(words[row[:n]]).replace(" .", ".").replace(" ,", ",")
                        line = json.dumps({"text": text[0].upper() + text[1:], "id": stats["records"]})
                        if len(recent) < 1000:
                            recent.append(line)
                        elif rng.random() < 0.01:
                            recent[int(rng.integers(1000))] = line
                    fh.write(line + "\n")
                    written += len(line) + 1
                    stats["records"] += 1
        stats["bytes"] += written
    return stats


def memory(p: psutil.Process) -> int:
    """Proportional set size: forked workers share pages with their parent, and RSS would count
    those pages once per process (falls back to RSS where PSS cannot be read)."""
    try:
        return p.memory_full_info().pss
    except (psutil.AccessDenied, AttributeError):
        return p.memory_info().rss


def peak_rss_of(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for `proc`; the peak summed PSS of it and its children, and the wall seconds."""
    peak, start = 0, time.perf_counter()
    root = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(memory(p) for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    proc.wait()
    done.set()
    t.join()
    return peak, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=100, help="corpus size in MB of uncompressed JSON Lines")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--max-train-mb", type=int, default=100, help="tokenizer.max_train_bytes, in MB")
    ap.add_argument("--num-proc", type=int, default=None, help="tokenizer.num_proc (default: all cores)")
    ap.add_argument("--workdir", default=None, help="keep the corpus and project here (default: a temp dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra lmforge --set")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lmforge-data-"))
    corpus = work / "corpus"
    t0 = time.perf_counter()
    if not corpus.is_dir():
        stats = synthesize(corpus, args.size_mb, args.files)
        print(f"corpus: {json.dumps(stats)} in {time.perf_counter() - t0:.0f} s -> {corpus}")
    project = work / "project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "data/raw", project / "data/raw")
    overrides = [
        "ingest.mode=lenient",
        f"ingest.text_sources=[{{name: synthetic, path: '{corpus}/*.jsonl.gz', format: jsonl}}]",
        f"tokenizer.vocab_size={args.vocab_size}",
        f"tokenizer.max_train_bytes={args.max_train_mb * 1_000_000}",
        *([f"tokenizer.num_proc={args.num_proc}"] if args.num_proc else []),
        *args.overrides,
    ]
    env = {**os.environ, "LMFORGE_ROOT": str(project), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    lmforge = Path(sys.executable).with_name("lmforge")
    size = args.size_mb * 1_000_000
    print(f"{'stage':10s} {'seconds':>8s} {'MB/s':>7s} {'peak mem':>10s}")
    total = 0.0
    for stage in STAGES:
        cmd = [str(lmforge), stage, *(a for o in overrides for a in ("--set", o))]
        log = (work / f"{stage}.log").open("w")
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak, seconds = peak_rss_of(proc)
        total += seconds
        if proc.returncode != 0:
            sys.exit(f"lmforge {stage} failed ({proc.returncode}); see {work / f'{stage}.log'}")
        print(f"{stage:10s} {seconds:8.1f} {size / 1e6 / seconds:7.1f} {peak / 2**20:8.0f} MB")
    print(f"{'total':10s} {total:8.1f} {size / 1e6 / total:7.1f}")
    metrics = json.loads((project / "metrics/ingest.json").read_text())["text"]
    print(
        "ingest:", json.dumps({k: metrics.get(k) for k in ("records_in", "kept", "dropped", "train", "val")})
    )
    print("tokenizer:", (project / "metrics/tokenizer.json").read_text().strip().replace("\n", " "))


if __name__ == "__main__":
    main()
