"""Serve the lmforge deployments to a Prefect server (`lmforge ui` starts a local one and runs this).

    PREFECT_API_URL=http://127.0.0.1:4200/api python flows/deployments.py

Deployments: `lmforge-pipeline/local` (one run at a time: DVC holds a workspace lock),
`lmforge-promote/local`, `lmforge-serve/local`. Flow runs execute in this process's machine and
project (cwd or LMFORGE_ROOT). For a remote server and a work pool instead, see flows/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling flow modules

from prefect import serve  # noqa: E402

from pipeline import lmforge_pipeline  # noqa: E402
from promote import lmforge_promote  # noqa: E402
from serving import lmforge_serve  # noqa: E402

DEPLOYMENT = "local"


def deployments(name: str = DEPLOYMENT, cron: str | None = None, interval_s: float | None = None) -> list:
    """The three deployments; `cron` / `interval_s` attach a schedule to the pipeline's (its runs use
    the flow's defaults: whatever params.yaml holds, so DVC re-runs only what changed)."""
    return [
        lmforge_pipeline.to_deployment(
            name=name,
            concurrency_limit=1,  # DVC allows one `repro` per workspace: a second run waits its turn
            tags=["lmforge"],
            description="ingest -> register through `dvc repro`, one task per stage",
            cron=cron,
            interval=interval_s,
        ),
        lmforge_promote.to_deployment(
            name=name, tags=["lmforge"], description="promote a model version to champion, or roll back"
        ),
        lmforge_serve.to_deployment(
            name=name, tags=["lmforge"], description="serve the champion with BentoML (long-running)"
        ),
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
    args = parser.parse_args(argv)
    serve(
        *deployments(args.name, cron=args.cron, interval_s=args.interval),
        limit=args.limit,
        pause_on_shutdown=False,
    )


if __name__ == "__main__":
    main()
