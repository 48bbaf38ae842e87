"""Load test of the lmforge chat service after vLLM's ``benchmark_serving``, beside the in-process ideal.

For each concurrency level C (``--concurrency 1,4,16,64``) C closed-loop clients each send
``--requests-per-client`` requests one after another to ``POST /v1/chat/completions``, for two workloads:

* **a** - non-streaming, equal sampling parameters: ``temperature 0``, the same ``max_tokens``
  (requests the server may merge into one batch);
* **b** - streaming (``stream: true``, ``stream_options.include_usage``) with mixed sampling: request i
  gets temperature ``[0.6, 0.8, 1.0, 1.2][i % 4]``, top_p ``[0.8, 0.9, 0.95, 1.0][(i // 4) % 4]`` and
  ``seed = i``.

and, on its own (``--workloads p``), prefix caching:

* **p** - one client, streaming, ``max_tokens 1``: ``--prefix-reps`` repetitions, each with a new
  system prompt of about ``--system-words`` words (about 100 tokens with the bundled tokenizer): a
  **cold** request (system prompt + user message A: nothing of it cached) then a **warm** one (the
  same system prompt + user message B: its whole blocks come from the prefix cache). Figures: median
  TTFT of each with a bootstrap 95% interval, the speed-up (cold / warm, interval of the ratio of
  medians) and the server's hit rate (``lmforge_prefix_cache_*`` counters).
  ``--random-preset small`` serves a random-weight model of that params.yaml preset's shape (with
  ``--model-dir``'s tokenizer) instead: prefill cost depends on the shape, not the weights.

Prompts are a fixed list of short chat messages (request i gets message ``i % 8``). Figures per level:
generated tokens/s (from ``usage.completion_tokens``), requests/s, p50/p95 time to first token
(streaming: send -> first event with a token: content, or the finish of a reply without text;
non-streaming: the full latency), p50/p95 inter-token
latency (gaps between content events; streaming only), errors. The server is warmed up with a few
requests of the workload before every level.

Then the same generations (workload a's prompts, greedy, same max tokens) run in-process through
``ChatEngine.generate_ids`` in full batches of C - the ideal that each workload's throughput is
measured against - and a summary checks the targets at 16 clients: throughput(b) >= 0.7 x
throughput(a); throughput(b) >= 4 x 371 tokens/s (one request alone); p95 TTFT(b) <= 3 x the
TTFT of a request alone (p50 TTFT of b at C=1).

    # start `bentoml serve` on a temporary MLflow store holding --model-dir (the usual way)
    python benchmarks/serve_load.py --model-dir models/rlhf
    # an older version of the service, from a worktree of an earlier commit
    git worktree add --detach /tmp/lmforge-before 7d60906
    python benchmarks/serve_load.py --repo /tmp/lmforge-before --model-dir models/rlhf --json before.json
    # a server that is already running (--model-dir then only feeds the in-process ideal)
    python benchmarks/serve_load.py --url http://127.0.0.1:3000 --model-dir models/rlhf --workloads b
    # two HTTP worker processes sharing one engine process
    python benchmarks/serve_load.py --model-dir models/rlhf --workers 2 --workloads b --concurrency 1,16
    # prefix caching: a shared ~100-token system prompt, cold vs warm, on a small-preset-shaped model
    python benchmarks/serve_load.py --model-dir models/rlhf --workloads p --random-preset small

With ``--repo DIR`` the model is published, served and run in-process with DIR's code: the
registration and the in-process ideal run in child processes, and the server runs with working
directory DIR; all three put DIR/src (and DIR) on PYTHONPATH ahead of the installed package. Only this
client (asyncio + aiohttp, one connection per client) runs from this checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_NAME = "lmforge-chat"  # lmforge.registry.MODEL_NAME / CHAMPION (not imported: see --repo)
CHAMPION = "champion"
MESSAGES = [
    "Tell me a story.",
    "Hi! What is your name?",
    "Tell me about a little cat.",
    "Where does the fox live?",
    "Can you tell me a story about a dog?",
    "What did the girl find in the garden?",
    "Say something nice.",
    "Why is the sky blue?",
]
TEMPERATURES = [0.6, 0.8, 1.0, 1.2]
TOP_PS = [0.8, 0.9, 0.95, 1.0]
WORKLOADS = {
    "a": "non-streaming /v1/chat/completions, temperature 0, equal params",
    "b": "streaming /v1/chat/completions, mixed temperature/top_p/seed",
    "p": "a shared ~100-token system prompt, prefix cache cold vs warm (one client)",
}
WARMUP_INDEX = 1_000_000  # warm-up requests use their own indices (seeds)
# Workload p: system prompts drawn from these words, and the two user messages after one.
WORDS = [
    "the",
    "a",
    "little",
    "big",
    "red",
    "old",
    "small",
    "happy",
    "sad",
    "dog",
    "cat",
    "fox",
    "bird",
    "girl",
    "boy",
    "mom",
    "dad",
    "tree",
    "sun",
    "moon",
    "park",
    "house",
    "garden",
    "ball",
    "toy",
    "book",
    "cake",
    "friend",
    "day",
    "night",
    "rain",
    "snow",
    "water",
    "sky",
    "hill",
    "river",
    "flower",
    "box",
    "ran",
    "jumped",
    "played",
    "found",
    "saw",
    "liked",
    "wanted",
    "said",
    "looked",
    "went",
    "came",
    "made",
    "gave",
    "took",
    "smiled",
    "helped",
    "and",
    "but",
    "then",
    "so",
    "because",
    "when",
    "very",
    "too",
    "also",
    "again",
    "soon",
    "every",
]
USERS = ("Tell me a story.", "Where does the fox live?")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def message(i: int) -> list[dict]:
    return [{"role": "user", "content": MESSAGES[i % len(MESSAGES)]}]


def request_body(workload: str, i: int, args: argparse.Namespace) -> dict:
    body = {"model": args.model_name, "messages": message(i), "max_tokens": args.max_new_tokens}
    if workload == "a":
        return {**body, "temperature": 0.0, "stream": False}
    return {
        **body,
        "temperature": TEMPERATURES[i % len(TEMPERATURES)],
        "top_p": TOP_PS[(i // len(TEMPERATURES)) % len(TOP_PS)],
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def pythonpath(repo: Path) -> str:
    parts = [str(repo / "src"), str(repo), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": pythonpath(args.repo), "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["LMFORGE_TORCH_THREADS"] = str(args.threads)
    env["LMFORGE_HTTP_WORKERS"] = str(args.workers)
    return env


# --------------------------------------------------------------------------- the server

# Runs in a child process with --repo's src first on sys.path, so the model is published (its
# `code_paths` copy of lmforge included) by the same code the server runs.
REGISTER = """
import sys
from pathlib import Path
import mlflow
import lmforge
from lmforge.registry.publish import publish
model_dir, root, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
uri = f"sqlite:///{root / 'mlflow.db'}"
mlflow.set_tracking_uri(uri)
exp = mlflow.create_experiment("serve-load", artifact_location=(root / "artifacts").as_uri())
mlflow.set_experiment(experiment_id=exp)
with mlflow.start_run(run_name="serve-load"):
    publish(model_dir, model_name=name, dtype="fp32", failed_gates=[], tags={})
print("LMFORGE_FROM", Path(lmforge.__file__).parent)
print("TRACKING_URI", uri)
"""


def run_code(args: argparse.Namespace, code: str, *argv: object, doing: str) -> str:
    """Run ``code`` in a child process with --repo's lmforge; its standard output, or exit naming
    what failed (``doing``) with the child's error."""
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)],
        cwd=args.repo,
        env=child_env(args),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"{doing} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def register(args: argparse.Namespace, root: Path) -> str:
    """Register --model-dir as `<model_name>@champion` in a fresh sqlite store; returns the tracking URI."""
    stdout = run_code(
        args, REGISTER, args.model_dir.resolve(), root, args.model_name, doing=f"registering {args.model_dir}"
    )
    lines = dict(line.split(" ", 1) for line in stdout.splitlines() if line.startswith(("LMFORGE_", "TRACK")))
    print(f"published {args.model_dir} with lmforge from {lines['LMFORGE_FROM']}", flush=True)
    return lines["TRACKING_URI"]


def start_server(args: argparse.Namespace, root: Path) -> tuple[subprocess.Popen, str]:
    from lmforge.orchestration import bento_service

    tracking = register(args, root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **child_env(args),
        "MLFLOW_TRACKING_URI": tracking,
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "LMFORGE_MODEL_NAME": args.model_name,
        "LMFORGE_MODEL_ALIAS": CHAMPION,
    }
    env.pop("LMFORGE_API_KEY", None)
    if args.device:
        env["LMFORGE_DEVICE"] = args.device
    log = open(root / "serve.log", "w")  # noqa: SIM115 (lives as long as the server)
    proc = bento_service.start(
        port, env=env, cwd=args.repo, stdout=log, bentoml=BIN / "bentoml", working_dir=args.repo
    )
    url = f"http://127.0.0.1:{port}"
    try:
        bento_service.wait_ready(proc, url, timeout_s=240)
    except bento_service.ServiceStartError as err:
        bento_service.stop(proc)
        raise SystemExit(f"{err}:\n{(root / 'serve.log').read_text()[-3000:]}") from None
    return proc, url


def server_log_problems(path: Path) -> dict:
    text = path.read_text(errors="replace") if path.is_file() else ""
    lines = text.splitlines()
    return {
        "tracebacks": text.count("Traceback (most recent call last)"),
        "error_lines": sum(
            " ERROR " in line or "| ERROR" in line or line.startswith("ERROR") for line in lines
        ),
        "warning_lines": sum("WARNING" in line for line in lines),
    }


# --------------------------------------------------------------------------- one request


async def plain_request(client: aiohttp.ClientSession, body: dict) -> dict:
    t0 = time.perf_counter()
    try:
        async with client.post("/v1/chat/completions", json=body) as r:
            text = await r.text()
        latency = time.perf_counter() - t0
        if r.status != 200:
            return {"ok": False, "error": f"HTTP {r.status}: {text[:200]}", "latency": latency}
        tokens = json.loads(text)["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 (every failure is counted, the run goes on)
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:300],
            "latency": time.perf_counter() - t0,
        }
    return {"ok": True, "latency": latency, "ttft": latency, "tokens": tokens, "gaps": [], "events": 1}


async def stream_request(client: aiohttp.ClientSession, body: dict) -> dict:
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens, prompt_tokens, events, done = None, None, 0, False
    try:
        async with client.post("/v1/chat/completions", json=body) as r:
            if r.status != 200:
                text = await r.text()
                return {
                    "ok": False,
                    "error": f"HTTP {r.status}: {text[:200]}",
                    "latency": time.perf_counter() - t0,
                }
            async for raw in r.content:  # one server-sent-event line at a time
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return {
                        "ok": False,
                        "error": f"stream error event: {event['error']}"[:300],
                        "latency": time.perf_counter() - t0,
                    }
                choices = event.get("choices") or ()
                content = any((c.get("delta") or {}).get("content") for c in choices)
                if content or any(c.get("finish_reason") for c in choices):
                    now = time.perf_counter()
                    first = now if first is None else first  # the first token, even one without text
                    if content:
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                        events += 1
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]  # the usage-only chunk comes last
                    prompt_tokens = event["usage"]["prompt_tokens"]
    except Exception as exc:  # noqa: BLE001
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:300],
            "latency": time.perf_counter() - t0,
        }
    latency = time.perf_counter() - t0
    if not done or tokens is None:
        why = "no [DONE]" if not done else "no usage in the stream"
        return {"ok": False, "error": why, "latency": latency}
    ttft = None if first is None else first - t0
    return {
        "ok": True,
        "latency": latency,
        "ttft": ttft,
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "gaps": gaps,
        "events": events,
    }


# --------------------------------------------------------------------------- one level


async def info(client: aiohttp.ClientSession) -> dict:
    try:
        async with client.get("/info") as r:
            return await r.json() if r.status == 200 else {}
    except Exception:  # noqa: BLE001
        return {}


def session(url: str, args: argparse.Namespace, **kw) -> aiohttp.ClientSession:
    """A client session on ``url`` with the API key and the request timeout of ``args``."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout, connect=30)
    return aiohttp.ClientSession(url, timeout=timeout, headers=headers, **kw)


async def scrape(client: aiohttp.ClientSession) -> list[str]:
    """The lines of the server's ``/metrics`` (none if it has none or cannot be reached)."""
    try:
        async with client.get("/metrics") as r:
            return (await r.text()).splitlines() if r.status == 200 else []
    except Exception:  # noqa: BLE001
        return []


async def ttft_histogram(client: aiohttp.ClientSession) -> dict[float, float]:
    """The server's own time-to-first-token histogram (cumulative bucket counts), if it has one."""
    buckets: dict[float, float] = {}
    for line in await scrape(client):
        if line.startswith("lmforge_time_to_first_token_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = buckets.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """Prometheus-style quantile of the observations between two scrapes (linear within a bucket)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return None


def counter_delta(before: dict, after: dict) -> dict:
    key = (
        "engine" if "engine" in after else "batching"
    )  # the continuous engine's counters, or the old batcher's
    b, a = before.get(key) or {}, after.get(key) or {}
    return {
        k: round(v - b.get(k, 0), 4)
        for k, v in a.items()
        if isinstance(v, int | float)
        and not isinstance(v, bool)
        and k
        not in (
            "largest_batch",
            "max_rows",
            "max_batch",
            "max_queue",
            "prefill_chunk",
            "timeout_s",
            "waiting",
            "in_flight",
            "running",
            "pid",
            "restarts",
        )
    } | ({"largest_batch_so_far": a["largest_batch"]} if "largest_batch" in a else {})


async def run_level(url: str, workload: str, c: int, args: argparse.Namespace) -> dict:
    per_client = args.requests_per_client
    if args.max_requests and c * per_client > args.max_requests:
        per_client = max(1, args.max_requests // c)
    one = plain_request if workload == "a" else stream_request
    # aiohttp, as vLLM's benchmark_serving: a cheaper client leaves more of the shared cores to the server.
    async with session(url, args, connector=aiohttp.TCPConnector(limit=c)) as client:
        warm = await asyncio.gather(
            *(one(client, request_body(workload, WARMUP_INDEX + j, args)) for j in range(min(c, args.warmup)))
        )
        before, hist_before = await info(client), await ttft_histogram(client)
        results: list[dict] = []

        async def client_loop(cid: int) -> None:
            for k in range(per_client):
                results.append(await one(client, request_body(workload, cid * per_client + k, args)))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(cid) for cid in range(c)))
        wall = time.perf_counter() - start
        after, hist_after = await info(client), await ttft_histogram(client)
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    lat = [r["latency"] for r in ok]
    errors = [r["error"] for r in results if not r["ok"]]
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    return {
        "workload": workload,
        "concurrency": c,
        "requests_per_client": per_client,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "warmup_errors": sum(not r["ok"] for r in warm),
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(ok) / wall,
        "ttft_p50_ms": ms(percentile(ttft, 0.5)),
        "ttft_p95_ms": ms(percentile(ttft, 0.95)),
        # the engine's own view: from the request reaching the engine to its first token
        "server_ttft_p50_ms": ms(histogram_quantile(hist_before, hist_after, 0.5)),
        "server_ttft_p95_ms": ms(histogram_quantile(hist_before, hist_after, 0.95)),
        "itl_p50_ms": ms(percentile(gaps, 0.5)) if workload == "b" else None,
        "itl_p95_ms": ms(percentile(gaps, 0.95)) if workload == "b" else None,
        "latency_p50_ms": ms(percentile(lat, 0.5)),
        "latency_max_ms": ms(max(lat, default=None)),
        "tokens_per_request": tokens / len(ok) if ok else None,
        "no_content": sum(r["ttft"] is None for r in ok),
        "server_counters": counter_delta(before, after),
        "server": {k: after.get(k) for k in ("version", "device", "torch_threads")},
    }


# --------------------------------------------------------------------------- the in-process ideal


def system_prompt(rep: int, words: int) -> str:
    """A system prompt of its own per repetition (its first words already differ, so nothing of it is
    cached before its cold request)."""
    import random

    rng = random.Random(rep)
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


async def prefix_metrics(client: aiohttp.ClientSession) -> dict[str, float]:
    """The server's prefix-cache counters (summed over workers)."""
    out = {"queried": 0.0, "hit": 0.0}
    for line in await scrape(client):
        for key in out:
            if line.startswith(f"lmforge_prefix_cache_{key}_tokens_total"):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


async def run_prefix(url: str, args: argparse.Namespace) -> dict:
    """Workload p: cold then warm request per repetition, one at a time."""
    from intervals import bootstrap, bootstrap_ratio

    def body(system: str, user: str) -> dict:
        return {
            "model": args.model_name,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 1,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async with session(url, args) as client:
        for w in range(args.warmup):  # warm the server's code paths, not the cache (own prompts)
            await stream_request(client, body(system_prompt(WARMUP_INDEX + w, args.system_words), USERS[0]))
        before = await prefix_metrics(client)
        cold, warm, prompt_tokens, errors = [], [], [], []
        for rep in range(args.prefix_reps):
            system = system_prompt(rep, args.system_words)
            c = await stream_request(client, body(system, USERS[0]))
            w = await stream_request(client, body(system, USERS[1]))
            if not (c["ok"] and w["ok"]) or c["ttft"] is None or w["ttft"] is None:
                errors.append(c.get("error") or w.get("error") or "no first token")
                continue
            cold.append(c["ttft"])
            warm.append(w["ttft"])
            prompt_tokens.append(c["prompt_tokens"])
        after = await prefix_metrics(client)
    if not cold:
        raise SystemExit(f"workload p: every repetition failed: {errors[:3]}")
    queried, hit = after["queried"] - before["queried"], after["hit"] - before["hit"]
    speedup = statistics.median(cold) / statistics.median(warm)
    return {
        "repetitions": len(cold),
        "errors": len(errors),
        "prompt_tokens_median": statistics.median(prompt_tokens),
        "cold_ms": 1e3 * statistics.median(cold),
        "cold_ci95_ms": [1e3 * v for v in bootstrap(cold)],
        "warm_ms": 1e3 * statistics.median(warm),
        "warm_ci95_ms": [1e3 * v for v in bootstrap(warm)],
        "speedup": speedup,
        "speedup_ci95": list(bootstrap_ratio(cold, warm)),
        "hit_rate": hit / queried if queried else None,
        "hit_tokens_per_warm_request": hit / len(warm),
    }


def random_model(args: argparse.Namespace, root: Path) -> Path:
    """A random-weight model folder of --random-preset's shape, with --model-dir's tokenizer (and its
    vocabulary size), built by --repo's code."""
    code = (
        "import sys, json, torch\n"
        "from pathlib import Path\n"
        "from lmforge.model import GPT\n"
        "from lmforge.model_folder import read_config, save_model_dir\n"
        "from lmforge.params import load_params\n"
        "from lmforge.stages.fitting import gpt_config\n"
        "src, out, preset = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]\n"
        "params = load_params(Path('params.yaml'), {'preset': preset})\n"
        "config = gpt_config(params.model, read_config(src)['model']['vocab_size'])\n"
        "torch.manual_seed(0)\n"
        "save_model_dir(GPT(config).eval(), config, src, out)\n"
        "print(json.dumps(config.to_dict()))\n"
    )
    out = root / f"random-{args.random_preset}"
    doing = f"building the {args.random_preset} model"
    stdout = run_code(args, code, args.model_dir.resolve(), out, args.random_preset, doing=doing)
    print(f"random-weight {args.random_preset} model: {stdout.strip()}", flush=True)
    return out


def ideal_worker(spec: dict) -> dict:
    """Runs in a child process (--repo's lmforge): workload a's generations in full batches of C."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import lmforge
    from lmforge.generation.chat import ChatEngine
    from lmforge.generation.sampling_params import SamplingParams

    engine = ChatEngine.from_dir(spec["model_dir"], device=spec["device"])
    params = SamplingParams(max_new_tokens=spec["max_new_tokens"], temperature=0.0)
    out = {
        "lmforge": str(Path(lmforge.__file__).parent),
        "torch_threads": torch.get_num_threads(),
        "device": str(engine.device),
        "levels": [],
    }
    for c, n in spec["levels"]:
        prompts = [engine.chat_ids(message(i)) for i in range(n)]
        engine.generate_ids(prompts[:c], params, chat=True)  # warm-up
        start, tokens = time.perf_counter(), 0
        for at in range(0, n, c):
            tokens += sum(
                len(g.token_ids) for g in engine.generate_ids(prompts[at : at + c], params, chat=True)
            )
        wall = time.perf_counter() - start
        out["levels"].append(
            {
                "concurrency": c,
                "requests": n,
                "batches": -(-n // c),
                "wall_s": wall,
                "completion_tokens": tokens,
                "tokens_per_s": tokens / wall,
            }
        )
    return out


def run_ideal(args: argparse.Namespace, levels: list[tuple[int, int]]) -> dict:
    spec = {
        "model_dir": str(args.model_dir.resolve()),
        "device": args.device,
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "levels": levels,
    }
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--ideal-worker", json.dumps(spec)],
        cwd=args.repo,
        env=child_env(args),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        print(f"in-process ideal failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return {"error": done.stderr[-3000:], "levels": []}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def fmt(v: float | None, spec: str = ".1f", width: int = 9) -> str:
    return f"{'n/a' if v is None else format(v, spec):>{width}s}"


def print_tables(report: dict, args: argparse.Namespace) -> None:
    ideal = {lv["concurrency"]: lv for lv in report["ideal"].get("levels", [])}
    for w, rows in report["levels"].items():
        print(f"\nworkload {w}: {WORKLOADS[w]}, max_tokens {args.max_new_tokens}")
        print(
            f"{'C':>4s}{'reqs':>6s}{'err':>5s}{'wall s':>8s}{'req/s':>8s}{'tok/s':>9s}{'x ideal':>8s}"
            f"{'TTFT p50':>9s}{'TTFT p95':>9s}{'ITL p50':>8s}{'ITL p95':>8s}{'max lat':>9s}{'tok/req':>8s}"
            f"{'rows/step':>10s}"
        )
        for r in rows:
            ref = ideal.get(r["concurrency"])
            ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
            sc = r["server_counters"]
            if sc.get("steps"):  # the continuous engine: tokens per decode step = rows decoded together
                rows_per_call = sc["tokens"] / sc["steps"]
            else:  # the old batcher: rows per decode call
                rows_per_call = sc["rows"] / sc["calls"] if sc.get("calls") else None
            print(
                f"{r['concurrency']:4d}{r['requests']:6d}{r['errors']:5d}{r['wall_s']:8.2f}"
                f"{r['requests_per_s']:8.1f}{r['tokens_per_s']:9.0f}{fmt(ratio, '.2f', 8)}"
                f"{fmt(r['ttft_p50_ms'])}{fmt(r['ttft_p95_ms'])}{fmt(r['itl_p50_ms'], '.2f', 8)}"
                f"{fmt(r['itl_p95_ms'], '.2f', 8)}{fmt(r['latency_max_ms'], '.0f')}"
                f"{fmt(r['tokens_per_request'], '.1f', 8)}{fmt(rows_per_call, '.1f', 10)}"
            )
        for r in rows:
            if r["errors"] or r["warmup_errors"]:
                print(
                    f"  C={r['concurrency']}: {r['errors']} errors, {r['warmup_errors']} in warm-up: {r['error_samples']}"
                )
        served = [r for r in rows if r.get("server_ttft_p50_ms") is not None]
        if served:
            print(
                "  engine's own TTFT p50/p95 ms (request in the engine -> first token): "
                + "; ".join(
                    f"C={r['concurrency']}: {r['server_ttft_p50_ms']:.1f}/{r['server_ttft_p95_ms']:.1f}"
                    for r in served
                )
            )
        counters = {r["concurrency"]: r["server_counters"] for r in rows if r["server_counters"]}
        if counters:
            print(
                "  server counters (/info, delta over the level): "
                + "; ".join(f"C={c}: {json.dumps(v)}" for c, v in counters.items())
            )
    if ideal:
        src = report["ideal"]
        print(
            f"\nin-process ideal: ChatEngine.generate_ids, full batches of C, greedy, workload a's prompts "
            f"(lmforge from {src['lmforge']}, {src['device']}, torch threads {src['torch_threads']})"
        )
        print(f"{'C':>4s}{'reqs':>6s}{'batches':>8s}{'wall s':>8s}{'tok/s':>9s}{'tok/req':>8s}")
        for lv in ideal.values():
            print(
                f"{lv['concurrency']:4d}{lv['requests']:6d}{lv['batches']:8d}{lv['wall_s']:8.2f}"
                f"{lv['tokens_per_s']:9.0f}{lv['completion_tokens'] / lv['requests']:8.1f}"
            )
    if report["targets"]:
        print(f"\ntargets at C={args.target_concurrency}:")
        for t in report["targets"]:
            verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
            print(f"  {t['name']:56s}{t['value']:>14s}  vs {t['bound']:<17s} {verdict}")


def print_prefix(r: dict, args: argparse.Namespace) -> None:
    print(
        f"\nworkload p: {r['repetitions']} cold/warm pairs ({r['errors']} failed), system prompt of "
        f"{args.system_words} words, prompts {r['prompt_tokens_median']:.0f} tokens (median), max_tokens 1"
    )
    for key in ("cold", "warm"):
        lo, hi = r[f"{key}_ci95_ms"]
        print(f"  TTFT {key:4s} median {r[f'{key}_ms']:8.1f} ms  [{lo:.1f}, {hi:.1f}]")
    lo, hi = r["speedup_ci95"]
    rate = "n/a" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
    print(
        f"  speed-up cold / warm {r['speedup']:.2f}x [{lo:.2f}, {hi:.2f}]  (target >= 2x: "
        f"{'PASS' if r['speedup'] >= 2 else 'FAIL'})"
    )
    print(
        f"  hit rate {rate} of prompt tokens; {r['hit_tokens_per_warm_request']:.0f} cached tokens per warm request"
    )


def check_targets(levels: dict, args: argparse.Namespace) -> list[dict]:
    at = lambda w, c: next((r for r in levels.get(w, []) if r["concurrency"] == c), None)  # noqa: E731
    c = args.target_concurrency
    a, b, b1 = at("a", c), at("b", c), at("b", 1)
    out = []

    def target(
        name: str, value: float | None, bound: float | None, unit: str, ok_if_le: bool = False
    ) -> None:
        ok = None if value is None or bound is None else (value <= bound if ok_if_le else value >= bound)
        out.append(
            {
                "name": name,
                "value": "n/a" if value is None else f"{value:.1f} {unit}",
                "bound": "n/a" if bound is None else f"{'<=' if ok_if_le else '>='} {bound:.1f} {unit}",
                "pass": ok,
                "value_raw": value,
                "bound_raw": bound,
            }
        )

    ta, tb = (a or {}).get("tokens_per_s"), (b or {}).get("tokens_per_s")
    target("throughput(b) >= 0.7 x throughput(a)", tb, None if ta is None else 0.7 * ta, "tok/s")
    target(
        f"throughput(b) >= 4 x {args.single_stream:g} tok/s (one stream)", tb, 4 * args.single_stream, "tok/s"
    )
    alone = (b1 or {}).get("ttft_p50_ms")
    target(
        "p95 TTFT(b) <= 3 x TTFT alone (p50 TTFT of b at C=1)",
        (b or {}).get("ttft_p95_ms"),
        None if alone is None else 3 * alone,
        "ms",
        ok_if_le=True,
    )
    if any(r and r["errors"] for r in (a, b)):
        out.append({"name": f"no errors at C={c}", "value": "errors", "bound": "0", "pass": False})
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service; without it one is started on --model-dir")
    p.add_argument(
        "--model-dir", type=Path, help="model folder: served (without --url) and the in-process ideal"
    )
    p.add_argument(
        "--repo", type=Path, default=REPO, help="checkout whose service and lmforge run (default: this one)"
    )
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument(
        "--max-requests", type=int, default=0, help="cap requests per level (fewer per client at high C)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--workloads", default="a,b", help="a (non-streaming, equal params), b (streaming, mixed)")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests before each level (at most C)")
    p.add_argument(
        "--timeout", type=float, default=300, help="seconds per request before it counts as an error"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads: server (LMFORGE_TORCH_THREADS) and ideal; 0 = torch's default",
    )
    p.add_argument("--device", help="cpu / cuda (default: the server's and engine's default)")
    p.add_argument(
        "--workers", type=int, default=1, help="HTTP worker processes of the started server (one engine)"
    )
    p.add_argument("--prefix-reps", type=int, default=20, help="workload p: cold/warm pairs")
    p.add_argument("--system-words", type=int, default=60, help="workload p: words per system prompt")
    p.add_argument(
        "--random-preset", help="serve a random-weight model of this params.yaml preset's shape instead"
    )
    p.add_argument("--target-concurrency", type=int, default=16)
    p.add_argument(
        "--single-stream", type=float, default=371.0, help="tokens/s of one request alone (target base)"
    )
    p.add_argument("--no-ideal", action="store_true", help="skip the in-process ideal")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"))
    p.add_argument("--server-log", type=Path, help="keep the started server's log here")
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--ideal-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ideal_worker:
        print(json.dumps(ideal_worker(json.loads(args.ideal_worker))))
        return {}
    args.repo = args.repo.resolve()
    levels_c = [int(x) for x in args.concurrency.split(",") if x.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if bad := [w for w in workloads if w not in WORKLOADS]:
        p.error(f"unknown workloads {bad}: use a, b, p")
    if not args.url and not args.model_dir:
        p.error("without --url, --model-dir is needed to start a server")

    load = os.getloadavg()
    print(
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores; repo {args.repo}",
        flush=True,
    )
    proc, tmp, problems = None, None, None
    levels: dict[str, list[dict]] = {w: [] for w in workloads if w != "p"}
    prefix: dict | None = None
    started = time.perf_counter()
    try:
        url = args.url
        if not url:
            tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
            root = Path(tmp.name)
            t = time.perf_counter()
            if args.random_preset:
                args.model_dir, args.no_ideal = random_model(args, root), True
            proc, url = start_server(args, root)
            print(
                f"server ready at {url} in {time.perf_counter() - t:.1f}s (registration included)", flush=True
            )
        if "p" in workloads:
            prefix = asyncio.run(run_prefix(url, args))
        for c in levels_c if levels else ():
            for w in levels:
                r = asyncio.run(run_level(url, w, c, args))
                levels[w].append(r)
                print(
                    f"  {w} C={c}: {r['requests']} requests in {r['wall_s']:.2f}s, {r['tokens_per_s']:.0f} tok/s, "
                    f"{r['errors']} errors",
                    flush=True,
                )
    finally:
        if proc is not None:
            from lmforge.orchestration import bento_service

            bento_service.stop(proc)
            log = Path(tmp.name) / "serve.log"
            problems = server_log_problems(log)
            if args.server_log:
                shutil.copy(log, args.server_log)
        if tmp is not None:
            tmp.cleanup()
    served_s = time.perf_counter() - started

    ideal: dict = {"levels": []}
    if args.model_dir and not args.no_ideal and levels:
        first = next(iter(levels.values()))
        ideal = run_ideal(args, [(r["concurrency"], r["requests"]) for r in first])
    any_row = next((r for rows in levels.values() for r in rows), {})
    report = {
        "config": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("api_key", "ideal_worker")
        }
        | {"url": url},
        "load_average": load,
        "server": any_row.get("server", {}),
        "server_log": problems,
        "served_s": served_s,
        "levels": levels,
        "ideal": ideal,
        "prefix": prefix,
    }
    report["targets"] = check_targets(levels, args) if levels else []
    if levels:
        srv = report["server"]
        print(
            f"\nmodel version {srv.get('version')} on {srv.get('device')}, server torch threads "
            f"{srv.get('torch_threads')}; {args.requests_per_client} requests per client; times in ms"
        )
        print_tables(report, args)
    if problems:
        print(f"server log: {problems['tracebacks']} tracebacks, {problems['error_lines']} ERROR lines")
    if prefix:
        print_prefix(prefix, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
