"""`lmforge` command line: one subcommand per pipeline stage, plus `run` for the whole chain.

    lmforge ingest|tokenizer|shards|pretrain [--params params.yaml] [--set section.key=value ...]
    lmforge run        # the whole pipeline through `dvc repro`, grouped under one MLflow parent run
    lmforge params     # print the resolved parameters
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

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
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set pretrain.max_steps=50 or --set preset=small (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        _add_params_args(sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage]))
    p = sub.add_parser("params", help="print the resolved parameters as JSON")
    _add_params_args(p)
    p = sub.add_parser("run", help="run the whole pipeline with `dvc repro`, tracked under one MLflow parent run")
    p.add_argument("targets", nargs="*", help="dvc stages to reproduce (default: all)")
    p.add_argument("--force", action="store_true", help="re-run stages even if DVC says they are up to date")
    p = sub.add_parser("export", help="write a causal LM model folder in Hugging Face transformers (Llama) format")
    p.add_argument("--model-dir", required=True, help="lmforge causal LM model folder, e.g. models/rlhf")
    p.add_argument("--out", required=True, help="output folder, e.g. exports/hf")
    return parser


def _run_pipeline(targets: list[str], force: bool) -> int:
    import mlflow

    from lmforge import tracking

    tracking.setup()
    pipeline_id = uuid.uuid4().hex[:12]
    with mlflow.start_run(run_name=f"pipeline-{pipeline_id}", tags={"lmforge.pipeline_id": pipeline_id,
                                                                    "lmforge.git_commit": tracking.git_commit()}) as run:
        env = {**os.environ, tracking.PARENT_ENV: run.info.run_id, tracking.PIPELINE_ENV: pipeline_id}
        cmd = ["dvc", "repro", *(["--force"] if force else []), *targets]
        print(f"lmforge: pipeline {pipeline_id} (MLflow run {run.info.run_id}): {' '.join(cmd)}", flush=True)
        code = subprocess.call(cmd, env=env)
        mlflow.set_tag("lmforge.exit_code", str(code))
        if code != 0:
            mlflow.end_run(status="FAILED")
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lmforge.ingest.readers import IngestError
    from lmforge.params import ParamsError, load_params
    from lmforge.stages import StageError

    try:
        if args.command == "run":
            return _run_pipeline(args.targets, args.force)
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
