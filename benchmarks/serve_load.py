"""Load test of the lmforge BentoML service beside the same generations run in-process.

Sends N requests, C at a time, to ``POST /generate`` of a running server and prints requests/s,
p50/p95 latency and generated tokens/s; then runs the same N generations in-process through
``ChatEngine`` (one call per request, and in batches of C) and prints the serving overhead as a ratio.

    # a server that is already running (the model folder or registry gives the in-process baseline)
    python benchmarks/serve_load.py --url http://127.0.0.1:3000 --model-dir models/chat
    python benchmarks/serve_load.py --url http://127.0.0.1:3000 --registry          # MLflow champion
    # no --url: register --model-dir in a temporary MLflow store and start `bentoml serve` on it
    python benchmarks/serve_load.py --model-dir models/chat -n 64 -c 16 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from lmforge import service_process
from lmforge.registry import CHAMPION, MODEL_NAME

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = [
    "Once upon a time",
    "The little fox ran into the forest and",
    "Every morning the sun",
    "A cat and a dog were friends. One day they",
    "What is your name?",
    "The old tree by the river",
    "She opened the door and saw",
    "In the garden there was",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --------------------------------------------------------------------------- the model and the server


def load_engine(args: argparse.Namespace):
    if args.model_dir:
        from lmforge.engine import ChatEngine

        return ChatEngine.from_dir(args.model_dir, device=args.device)
    import mlflow

    from lmforge.tracking import tracking_uri

    mlflow.set_tracking_uri(args.tracking_uri or tracking_uri())
    engine = mlflow.pyfunc.load_model(f"models:/{args.model_name}@{args.alias}").unwrap_python_model().engine
    if args.device:
        import torch

        engine.device = torch.device(args.device)
        engine.model.to(engine.device)
    return engine


def register(model_dir: Path, root: Path, model_name: str) -> str:
    """Register the folder as `<model_name>@champion` in a fresh sqlite store; returns the tracking URI."""
    import mlflow

    from lmforge.registry.publish import publish

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("serve-load", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    with mlflow.start_run(run_name="serve-load"):
        publish(model_dir, model_name=model_name, dtype="fp32", failed_gates=[], tags={})
    return uri


def start_server(tracking: str, root: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "LMFORGE_MODEL_NAME": args.model_name,
        "LMFORGE_MODEL_ALIAS": CHAMPION,
    }
    env.pop("LMFORGE_API_KEY", None)
    if args.device:
        env["LMFORGE_DEVICE"] = args.device
    if args.threads:
        env["LMFORGE_TORCH_THREADS"] = str(args.threads)
    log = open(root / "serve.log", "w")  # noqa: SIM115 (lives as long as the server)
    proc = service_process.start(port, env=env, cwd=REPO, stdout=log, bentoml=BIN / "bentoml")
    url = f"http://127.0.0.1:{port}"
    try:
        service_process.wait_ready(proc, url, timeout_s=180)
    except service_process.ServiceStartError as err:
        service_process.stop(proc)
        raise SystemExit(f"{err}:\n{(root / 'serve.log').read_text()[-3000:]}") from None
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    service_process.stop(proc)


# --------------------------------------------------------------------------- measurements


def bodies(args: argparse.Namespace) -> list[dict]:
    return [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            **({"seed": i} if args.seeded else {}),
        }
        for i in range(args.requests)
    ]


def run_http(url: str, reqs: list[dict], concurrency: int, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=url, timeout=600, headers=headers, limits=limits) as client:
        for body in reqs[:2]:  # warm-up
            client.post("/generate", json=body).raise_for_status()
        before = client.get("/info").json().get("batching", {})

        def one(body: dict) -> tuple[float, int]:
            t = time.perf_counter()
            r = client.post("/generate", json=body)
            r.raise_for_status()
            return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, reqs))
        wall = time.perf_counter() - start
        after = client.get("/info").json()
    lat = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    stats = after.get("batching", {})
    calls = stats.get("calls", 0) - before.get("calls", 0)
    return {
        "wall_s": wall,
        "requests_per_s": len(reqs) / wall,
        "p50_ms": 1000 * percentile(lat, 0.5),
        "p95_ms": 1000 * percentile(lat, 0.95),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "decode_calls": calls,
        "rows_per_call": len(reqs) / calls if calls else None,
        "model_version": after.get("version"),
        "server_torch_threads": after.get("torch_threads"),
        "device": after.get("device"),
    }


def run_inprocess(engine, reqs: list[dict], batch: int) -> dict:
    from lmforge.sampling import SamplingParams

    def params(body: dict) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=body["max_new_tokens"], temperature=body["temperature"], seed=body.get("seed")
        )

    engine.generate_ids([engine.prompt_ids(reqs[0]["prompt"])], params(reqs[0]), chat=False)  # warm-up
    lat, tokens = [], 0
    start = time.perf_counter()
    for body in reqs:  # one call per request, as a server without batching would do
        t = time.perf_counter()
        gen = engine.generate_ids([engine.prompt_ids(body["prompt"])], params(body), chat=False)[0]
        lat.append(time.perf_counter() - t)
        tokens += len(gen.token_ids)
    seq_wall = time.perf_counter() - start

    start, btokens = time.perf_counter(), 0
    for i in range(0, len(reqs), batch):  # the ideal batcher: C requests per decode loop, no HTTP
        group = reqs[i : i + batch]
        gens = engine.generate_ids(
            [engine.prompt_ids(b["prompt"]) for b in group], params(group[0]), chat=False
        )
        btokens += sum(len(g.token_ids) for g in gens)
    batch_wall = time.perf_counter() - start
    return {
        "sequential": {
            "wall_s": seq_wall,
            "requests_per_s": len(reqs) / seq_wall,
            "p50_ms": 1000 * percentile(lat, 0.5),
            "p95_ms": 1000 * percentile(lat, 0.95),
            "tokens": tokens,
            "tokens_per_s": tokens / seq_wall,
        },
        "batched": {
            "wall_s": batch_wall,
            "requests_per_s": len(reqs) / batch_wall,
            "tokens": btokens,
            "tokens_per_s": btokens / batch_wall,
        },
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service; without it one is started on --model-dir")
    p.add_argument("--model-dir", type=Path, help="model folder (in-process baseline; served when no --url)")
    p.add_argument("--registry", action="store_true", help="baseline from the MLflow registry instead")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or the project's store")
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--alias", default=CHAMPION)
    p.add_argument("-n", "--requests", type=int, default=32)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seeded", action="store_true", help="give each request its own seed (never merged)")
    p.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    p.add_argument(
        "--threads", type=int, help="torch intra-op threads, here and in a server this script starts"
    )
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"))
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if not args.model_dir and not args.registry:
        p.error("give --model-dir or --registry (the in-process baseline needs the model)")
    if not args.url and not args.model_dir:
        p.error("without --url, --model-dir is needed to start a server")

    reqs = bodies(args)
    proc, tmp = None, None
    try:
        url = args.url
        if not url:
            tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
            root = Path(tmp.name)
            print(f"registering {args.model_dir} and starting bentoml serve ...", flush=True)
            t = time.perf_counter()
            proc, url = start_server(register(args.model_dir, root, args.model_name), root, args)
            print(
                f"server ready at {url} in {time.perf_counter() - t:.1f}s (registration included)", flush=True
            )
        served = run_http(url, reqs, args.concurrency, args.api_key)
    finally:
        if proc is not None:
            stop_server(proc)
        if tmp is not None:
            tmp.cleanup()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    local = run_inprocess(load_engine(args), reqs, args.concurrency)
    seq, bat = local["sequential"], local["batched"]
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "json")} | {"url": url},
        "served": served,
        "in_process": local,
        "overhead_vs_sequential": served["wall_s"] / seq["wall_s"],
        "overhead_vs_batched": served["wall_s"] / bat["wall_s"],
    }
    print(
        f"\n{args.requests} requests, concurrency {args.concurrency}, max_new_tokens {args.max_new_tokens}, "
        f"temperature {args.temperature}; model version {served['model_version']} on {served['device']}; "
        f"torch threads: server {served['server_torch_threads']}, in-process {torch.get_num_threads()}"
    )
    print(f"{'':28s}{'req/s':>9s}{'p50 ms':>9s}{'p95 ms':>9s}{'tokens/s':>10s}{'wall s':>9s}")
    print(
        f"{'served (HTTP, batched)':28s}{served['requests_per_s']:9.1f}{served['p50_ms']:9.1f}"
        f"{served['p95_ms']:9.1f}{served['tokens_per_s']:10.1f}{served['wall_s']:9.2f}"
    )
    print(
        f"{'in-process, 1 per call':28s}{seq['requests_per_s']:9.1f}{seq['p50_ms']:9.1f}"
        f"{seq['p95_ms']:9.1f}{seq['tokens_per_s']:10.1f}{seq['wall_s']:9.2f}"
    )
    print(
        f"{f'in-process, {args.concurrency} per call':28s}{bat['requests_per_s']:9.1f}{'':9s}{'':9s}"
        f"{bat['tokens_per_s']:10.1f}{bat['wall_s']:9.2f}"
    )
    rows = served["rows_per_call"]
    print(f"server decode calls: {served['decode_calls']} ({rows:.1f} requests per call)" if rows else "")
    print(
        f"serving time / in-process time: {report['overhead_vs_sequential']:.2f}x vs one call per request, "
        f"{report['overhead_vs_batched']:.2f}x vs ideal batches of {args.concurrency}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
