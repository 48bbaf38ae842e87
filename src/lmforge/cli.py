"""`lmforge` command line: one subcommand per pipeline stage, plus `run` for the whole chain.

lmforge ingest|tokenizer|shards|pretrain [--params params.yaml] [--set section.key=value ...]
lmforge run [--preset P] [--set section.key=value ...]
                   # the whole pipeline through `dvc repro`, grouped under one MLflow parent run
                   # (--preset/--set are first written into params.yaml, like `dvc exp run -S`)
lmforge ui         # local Prefect server + the lmforge deployments: run the pipeline from the UI
lmforge promote --version N | lmforge rollback [--to N]   # move the `champion` alias
lmforge params     # print the resolved parameters
lmforge team-server [--dir .lmforge/team] [--host H] [--port P]   # PostgreSQL + MLflow server for a team
lmforge verify STAGE [--rtol R]   # re-run a stage from its recorded inputs; compare with dvc.lock
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from lmforge.registry import CHAMPION, MODEL_NAME
from lmforge.stages import STAGES

STAGE_HELP = {
    "ingest": "clean, de-duplicate and split the text, SFT and preference sources",
    "tokenizer": "train the byte-level BPE tokenizer and chat template",
    "shards": "encode the text splits into memmap token shards",
    "pretrain": "pretrain the GPT on the token shards (Lightning)",
    "sft": "supervised fine-tuning on dialogues, loss on assistant tokens only",
    "reward": "train the reward model on preference pairs (Bradley-Terry)",
    "rlhf": "tune the policy against the reward model (PPO or GRPO) or on the pairs (DPO)",
    "evaluate": "one report over base, SFT and tuned models",
    "register": "register the tuned model in MLflow behind a gated alias, with lineage tags",
}


def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set pretrain.max_steps=50 or --set preset=small (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        _add_params_args(sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage]))
    p = sub.add_parser("params", help="print the resolved parameters as JSON")
    _add_params_args(p)
    p = sub.add_parser(
        "run", help="run the whole pipeline with `dvc repro`, tracked under one MLflow parent run"
    )
    p.add_argument("targets", nargs="*", help="dvc stages to reproduce (default: all)")
    p.add_argument("--force", action="store_true", help="re-run stages even if DVC says they are up to date")
    _add_params_args(p)
    p.add_argument("--preset", default=None, help="write `preset: P` into the params file first")
    p = sub.add_parser(
        "ui", help="start a local Prefect server and serve the lmforge flows (open the UI, press Run)"
    )
    p.add_argument("--port", type=int, default=4200, help="Prefect server port on 127.0.0.1 (default: 4200)")
    p.add_argument(
        "--no-server",
        action="store_true",
        help="do not start a server: serve the flows to the one at PREFECT_API_URL",
    )
    p.add_argument("--cron", help='also run the pipeline on this cron schedule, e.g. "0 3 * * *"')
    p.add_argument("--interval", type=float, help="or every INTERVAL seconds")
    for name, text in (
        ("promote", "point the `champion` alias at a model version"),
        ("rollback", "move `champion` back to the version that held it before (or --to N)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        if name == "promote":
            p.add_argument("--version", required=True, type=int, help="model version to promote")
        else:
            p.add_argument("--to", dest="version", type=int, default=None, help="version to roll back to")
        p.add_argument("--model-name", default=None, help="registered model (default: registry.model_name)")
        p.add_argument("--alias", default=CHAMPION, help=f"alias to move (default: {CHAMPION})")
        p.add_argument("--reason", default="", help="recorded as a model-version tag")
        p.add_argument("--params", default="params.yaml", help=argparse.SUPPRESS)
    p = sub.add_parser(
        "verify",
        help="re-run a stage from its recorded inputs in a scratch copy; compare with dvc.lock and its metrics",
        description="Exit 0: bitwise, or bytes differ but every metric within --rtol; 1: drift; 2: cannot verify.",
    )
    p.add_argument("stage", choices=STAGES, help="the stage to re-run")
    p.add_argument("--rtol", type=float, default=0.02, help="relative tolerance for metrics (default 0.02)")
    p.add_argument(
        "--keep", default=None, help="re-run in this folder and keep it (default: a temporary one)"
    )
    p = sub.add_parser(
        "team-server",
        help="start a shared MLflow tracking server on PostgreSQL for a team (runs until Ctrl-C)",
        description="PostgreSQL (its own cluster in DIR/postgres) + `mlflow server` with a proxied "
        "artifact store in DIR/artifacts; point checkouts at it with MLFLOW_TRACKING_URI. The database "
        "password: $LMFORGE_PG_PASSWORD, or the file $LMFORGE_PG_PASSWORD_FILE, or generated into "
        "DIR/pg-password.",
    )
    p.add_argument("--dir", default=".lmforge/team", help="where its data lives (default: .lmforge/team)")
    p.add_argument("--host", default="127.0.0.1", help="mlflow server's address (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=5000, help="mlflow server's port (default: 5000)")
    p.add_argument("--pg-port", type=int, default=5432, help="PostgreSQL's port on 127.0.0.1 (default: 5432)")
    p = sub.add_parser(
        "export", help="write a causal LM model folder in Hugging Face transformers (Llama) format"
    )
    p.add_argument("--model-dir", required=True, help="lmforge causal LM model folder, e.g. models/rlhf")
    p.add_argument("--out", required=True, help="output folder, e.g. exports/hf")
    return parser


def _run_pipeline(
    targets: list[str],
    force: bool,
    params_path: str = "params.yaml",
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> int:
    from lmforge.orchestration.pipeline_run import pipeline_run

    if preset is not None or overrides:
        from lmforge.orchestration.overrides import apply_overrides

        changed = apply_overrides(params_path, preset, overrides)
        for key, change in changed.items():
            print(f"lmforge: {params_path}: {key}: {change['old']!r} -> {change['new']!r}", flush=True)
    from lmforge.orchestration import dvc_lock, process_groups
    from lmforge.paths import project_root

    root = project_root()
    if (root / ".dvc").is_dir():
        for entry in dvc_lock.clear_stale_rwlock(root):
            print(
                f"lmforge: removed a stale DVC lock entry of dead process {entry['pid']} "
                f"({entry['mode']} {entry['path']})",
                flush=True,
            )
    with pipeline_run() as run:
        cmd = ["dvc", "repro", *(["--force"] if force else []), *targets]
        print(f"lmforge: pipeline {run.pipeline_id} (MLflow run {run.run_id}): {' '.join(cmd)}", flush=True)
        # Its own process group: on Ctrl-C / SIGTERM here, DVC and the stage get SIGINT from us, so
        # DVC releases its locks and the stage ends its MLflow run KILLED; so does the parent run.
        code = process_groups.run(cmd, env=run.env())
        run.finish(code)
    return code


def _ui(port: int, no_server: bool, schedule: list[str] | None = None) -> int:
    """Local Prefect server (state in <project>/.lmforge/prefect) + `flows/deployments.py` serving to it."""
    import time
    import urllib.request

    from lmforge.paths import project_root, state_dir

    root = project_root()
    flows = next(
        (
            d / "flows" / "deployments.py"
            for d in (root, Path(__file__).resolve().parents[2])
            if (d / "flows" / "deployments.py").is_file()
        ),
        None,
    )
    if flows is None:
        raise FileNotFoundError("flows/deployments.py not found in the project")
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "LMFORGE_ROOT": str(root),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    procs = []

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    # Children in their own sessions: Ctrl-C reaches only us, and we stop them in order (flows, then server).
    try:
        if not no_server:
            env["PREFECT_HOME"] = str(state_dir("prefect"))
            env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
            procs.append(
                subprocess.Popen(
                    ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env=env,
                    cwd=root,
                    start_new_session=True,
                )
            )
            deadline = time.monotonic() + 300  # the first database migration can take minutes
            while True:
                try:
                    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    print("lmforge ui: error: the Prefect server did not start", file=sys.stderr)
                    return 1
                time.sleep(1)
        else:
            from prefect.settings import PREFECT_API_URL

            env["PREFECT_API_URL"] = env.get("PREFECT_API_URL") or PREFECT_API_URL.value() or ""
            if not env["PREFECT_API_URL"]:
                print(
                    "lmforge ui: error: --no-server needs PREFECT_API_URL (env or prefect profile)",
                    file=sys.stderr,
                )
                return 2
        ui = env["PREFECT_API_URL"].removesuffix("/api")
        print(
            f"lmforge ui: open {ui} -> Deployments -> lmforge-pipeline/local -> Run (Ctrl-C stops)",
            flush=True,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(flows), *(schedule or [])], env=env, cwd=root, start_new_session=True
            )
        )
        return procs[-1].wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _move_alias(args: argparse.Namespace) -> int:
    from lmforge.registry import aliases

    name = args.model_name
    if name is None:
        from lmforge.params import ParamsError, load_params

        try:
            name = load_params(args.params).registry.model_name
        except ParamsError:
            name = MODEL_NAME
    if args.command == "promote":
        moved = aliases.promote(name, args.version, alias=args.alias, reason=args.reason)
    else:
        moved = aliases.rollback(name, to_version=args.version, alias=args.alias, reason=args.reason)
    print(f"lmforge {args.command}: {name}@{args.alias}: version {moved['previous']} -> {moved['version']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in STAGES or args.command == "run":
        from lmforge import cancellation

        # SIGINT / SIGTERM -> KeyboardInterrupt, remembered: the MLflow runs end KILLED, not FAILED.
        with cancellation.cancel_handlers(deaf_after_cancel=True):
            try:
                return _main(args)
            except BaseException:
                if (signum := cancellation.cancel_signal()) is None:
                    raise
                print(f"lmforge {args.command}: cancelled ({signal.Signals(signum).name})", file=sys.stderr)
                return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    return _main(args)


def _verify(args: argparse.Namespace) -> int:
    from lmforge.atomic import atomic_write_text
    from lmforge.orchestration.verify import VerifyError, render, verify
    from lmforge.paths import project_root, state_dir

    try:
        report = verify(
            project_root(), args.stage, rtol=args.rtol, keep=Path(args.keep) if args.keep else None
        )
    except VerifyError as err:
        print(f"lmforge verify: error: {err}", file=sys.stderr)
        return 2
    out = state_dir("verify") / f"{args.stage}.json"
    atomic_write_text(out, json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    print(render(report))
    print(f"lmforge verify: report in {out}")
    return 0 if report.verdict in ("bitwise", "within tolerance") else 1


def _team_server(args: argparse.Namespace) -> int:
    from lmforge.orchestration.team import TeamConfig, TeamServerError, team_server

    cfg = TeamConfig(Path(args.dir).resolve(), host=args.host, port=args.port, pg_port=args.pg_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with team_server(cfg):
            print(f"lmforge team-server: up; in each checkout: export MLFLOW_TRACKING_URI={cfg.tracking_uri}")
            print(f"lmforge team-server: data in {cfg.folder} (Ctrl-C stops)", flush=True)
            stop.wait()
    except TeamServerError as err:
        print(f"lmforge team-server: error: {err}", file=sys.stderr)
        return 2
    print("lmforge team-server: stopped")
    return 0


def _main(args: argparse.Namespace) -> int:
    from lmforge.ingest.readers import IngestError
    from lmforge.params import ParamsError, load_params
    from lmforge.stages import StageError

    try:
        if args.command == "run":
            return _run_pipeline(args.targets, args.force, args.params, args.preset, args.overrides)
        if args.command == "ui":
            schedule = [
                *(["--cron", args.cron] if args.cron else []),
                *(["--interval", str(args.interval)] if args.interval else []),
            ]
            return _ui(args.port, args.no_server, schedule)
        if args.command in ("promote", "rollback"):
            return _move_alias(args)
        if args.command == "team-server":
            return _team_server(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "export":
            from lmforge.export import export_hf

            print(f"lmforge export: wrote {export_hf(args.model_dir, args.out)}")
            return 0
        params = load_params(args.params, args.overrides)
        if args.command == "params":
            print(json.dumps(params.model_dump(mode="json", by_alias=True), indent=2))
            return 0
        from lmforge.stages import execute

        metrics = execute(args.command, params, Path(args.params).resolve().parent)
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
        return 0
    except (ParamsError, IngestError, StageError, FileNotFoundError, ValueError) as err:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
