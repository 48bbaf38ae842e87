"""Serve the lmforge deployments to a Prefect server (`lmforge ui` starts a local one and runs this).

    PREFECT_API_URL=http://127.0.0.1:4200/api python flows/deployments.py

Deployments: `lmforge-pipeline/local` (one run at a time: DVC holds a workspace lock),
`lmforge-promote/local`, `lmforge-serve/local`. Flow runs execute in this process's machine and
project (cwd or LMFORGE_ROOT).

To a work pool instead, for workers on other hosts (a GPU machine):

    PREFECT_API_URL=... python flows/deployments.py --pool lmforge --checkout /srv/lmforge --name team
    prefect worker start --pool lmforge          # on each worker host, with its checkout at /srv/lmforge

creates the process work pool if it is missing, registers the same three deployments on it and
exits. A worker runs each flow run in its own checkout (`--checkout`: the path of the project on the
worker hosts; default this project's), with the worker's environment (its MLFLOW_TRACKING_URI: the
team's tracking server, its DVC remote credentials). See flows/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling flow modules

from prefect import serve  # noqa: E402

from pipeline import lmforge_pipeline  # noqa: E402
from promote import lmforge_promote  # noqa: E402
from serving import lmforge_serve  # noqa: E402

DEPLOYMENT = "local"


def specs(cron: str | None = None, interval_s: float | None = None) -> list[tuple[Any, str, dict]]:
    """Each deployment: its flow, the flow's entrypoint in the project and its settings; `cron` /
    `interval_s` attach a schedule to the pipeline's (its runs use the flow's defaults: whatever
    params.yaml holds, so DVC re-runs only what changed)."""
    return [
        (
            lmforge_pipeline,
            "flows/pipeline.py:lmforge_pipeline",
            {
                "concurrency_limit": 1,  # DVC allows one `repro` per workspace: a second run waits its turn
                "tags": ["lmforge"],
                "description": "ingest -> register through `dvc repro`, one task per stage",
                "cron": cron,
                "interval": interval_s,
            },
        ),
        (
            lmforge_promote,
            "flows/promote.py:lmforge_promote",
            {"tags": ["lmforge"], "description": "promote a model version to champion, or roll back"},
        ),
        (
            lmforge_serve,
            "flows/serving.py:lmforge_serve",
            {"tags": ["lmforge"], "description": "serve the champion with BentoML (long-running)"},
        ),
    ]


def deployments(name: str = DEPLOYMENT, cron: str | None = None, interval_s: float | None = None) -> list:
    """The three deployments, served from this process."""
    return [f.to_deployment(name=name, **settings) for f, _, settings in specs(cron, interval_s)]


def deploy_to_pool(pool: str, checkout: Path, name: str, cron: str | None, interval_s: float | None) -> list:
    """Create the process work pool `pool` unless it exists and deploy the three flows to it, their
    code read from `checkout` where the worker runs them. Returns the deployment ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    job = {"env": {"LMFORGE_ROOT": str(checkout)}, "working_dir": str(checkout)}
    return [
        f.from_source(source=str(checkout), entrypoint=entry).deploy(
            name=name, work_pool_name=pool, job_variables=job, print_next_steps=False, **settings
        )
        for f, entry, settings in specs(cron, interval_s)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default=DEPLOYMENT, help="deployment name (default: local)")
    parser.add_argument("--limit", type=int, default=None, help="max concurrent flow runs of this process")
    parser.add_argument(
        "--cron", default=None, help='run the pipeline on this cron schedule, e.g. "0 3 * * *"'
    )
    parser.add_argument("--interval", type=float, default=None, help="or every INTERVAL seconds")
    parser.add_argument(
        "--pool", default=None, help="deploy to this process work pool (created if missing) and exit"
    )
    parser.add_argument(
        "--checkout", type=Path, default=None, help="with --pool: the project's path on the worker hosts"
    )
    args = parser.parse_args(argv)
    if args.pool:
        from lmforge.paths import project_root

        checkout = (args.checkout or project_root()).resolve()
        for dep_id in deploy_to_pool(args.pool, checkout, args.name, args.cron, args.interval):
            print(f"deployed {dep_id} to work pool {args.pool} (code from {checkout})", flush=True)
        return
    serve(
        *deployments(args.name, cron=args.cron, interval_s=args.interval),
        limit=args.limit,
        pause_on_shutdown=False,
    )


if __name__ == "__main__":
    main()
