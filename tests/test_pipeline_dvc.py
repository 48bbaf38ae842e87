"""The real pipeline through DVC and the lmforge CLI: stages run, cache, and track to MLflow."""

import json

import mlflow
import numpy as np
import yaml

from conftest import BIN, run_cmd

FIRST = ["ingest", "tokenizer", "shards"]


def ran(stdout: str) -> list[str]:
    return [s for s in FIRST if f"Running stage '{s}'" in stdout]


def test_repro_runs_caches_and_reruns_only_what_a_param_touches(project):
    out = run_cmd([BIN / "lmforge", "run", "shards"], project)
    assert ran(out.stdout) == FIRST
    shards = json.loads((project / "data/tokens/shards.json").read_text())
    train = np.fromfile(project / "data/tokens/train.bin", dtype=shards["dtype"])
    assert len(train) == shards["tokens"]["train"] > 100_000
    assert train[0] == shards["bos_id"]
    tok_metrics = json.loads((project / "metrics/tokenizer.json").read_text())
    assert tok_metrics["vocab_size"] == 2048 and tok_metrics["val_bytes_per_token"] > 2.0
    ingest_metrics = json.loads((project / "metrics/ingest.json").read_text())
    assert (
        ingest_metrics["text"]["kept"] + ingest_metrics["text"]["dropped_total"]
        == ingest_metrics["text"]["records_in"]
    )

    again = run_cmd([BIN / "dvc", "repro", "shards"], project)
    assert ran(again.stdout) == [] and "up to date" in again.stdout

    # Same inputs, same bytes: forcing every stage to run again leaves dvc.lock as it was.
    lock = (project / "dvc.lock").read_bytes()
    forced = run_cmd([BIN / "dvc", "repro", "--force", "shards"], project)
    assert ran(forced.stdout) == FIRST
    assert (project / "dvc.lock").read_bytes() == lock

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tokenizer"] = {"vocab_size": 1024}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run_cmd([BIN / "dvc", "repro", "shards"], project)
    assert ran(third.stdout) == ["tokenizer", "shards"]
    assert json.loads((project / "metrics/tokenizer.json").read_text())["vocab_size"] == 1024

    # Every stage logged params and metrics to the project's own MLflow store, under one parent run.
    mlflow.set_tracking_uri(f"sqlite:///{project}/.lmforge/mlflow/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["lmforge"], output_format="list")
    children = [
        r for r in runs if r.data.tags.get("lmforge.stage") in FIRST and r.data.tags.get("mlflow.parentRunId")
    ]
    assert sorted(r.data.tags["lmforge.stage"] for r in children) == sorted(FIRST)
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    tok_run = next(r for r in children if r.data.tags["lmforge.stage"] == "tokenizer")
    assert tok_run.data.params["tokenizer.vocab_size"] == "2048"
    assert tok_run.data.metrics["val_bytes_per_token"] > 2.0
    # Each stage run records the environment its bytes depend on.
    assert tok_run.data.tags["lmforge.env.threads"] and tok_run.data.tags["lmforge.env.mkl_cbwr"] == "AUTO"
    assert tok_run.data.params["run.seed"] == "1337"


def test_bad_source_fails_the_stage_with_a_clear_message(project):
    out = run_cmd(
        [BIN / "lmforge", "ingest", "--set", "ingest.text_sources=[{path: data/raw/missing.txt}]"],
        project,
        check=False,
    )
    assert out.returncode == 2
    assert "data/raw/missing.txt: file not found" in out.stderr
    assert "Traceback" not in out.stderr
