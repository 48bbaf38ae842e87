"""Registration: gates decide the alias, lineage tags are complete, the alias loads and generates."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from conftest import tiny_gpt
from lmforge import tracking
from lmforge.model_folder import save_model_dir
from lmforge.params import Gates, load_params
from lmforge.registry.publish import check_gates, publish
from lmforge.stages.register import lineage_tags
from lmforge.tokenizer import ChatTokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
PASSING = {
    "reward_gain": 0.5,
    "tuned": {"val_bits_per_byte": 2.5, "end_of_turn_rate": 0.9},
    "reward_model": {"accuracy": 0.9},
}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A project folder with its own MLflow store, a tiny model folder and upstream metrics files."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment(
        experiment_id=mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    )
    tok = ChatTokenizer(train_bpe(["hello there, how are you today?"] * 30, vocab_size=300))
    tok.save(tmp_path / "tokenizer")
    model = tiny_gpt(tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_kv_head=2)
    model_dir = save_model_dir(model, model.config, tmp_path / "tokenizer", tmp_path / "models" / "rlhf")
    (tmp_path / "metrics").mkdir()
    for i, stage in enumerate(("ingest", "tokenizer", "pretrain", "sft", "reward", "rlhf")):
        (tmp_path / "metrics" / f"{stage}.json").write_text(json.dumps({"mlflow_run_id": f"run{i}"}))
    (tmp_path / "dvc.lock").write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "ingest": {"outs": [{"path": "data/processed", "md5": "aaa.dir"}]},
                    "rlhf": {"outs": [{"path": "models/rlhf", "md5": "bbb.dir"}]},
                },
            }
        )
    )
    (tmp_path / "params.yaml").write_text("preset: tiny\npretrain: {max_steps: 7}\n")
    yield tmp_path, model_dir
    mlflow.set_tracking_uri(tracking.tracking_uri())


def test_gates_pass_and_fail_with_reasons():
    assert check_gates(PASSING, Gates()) == []
    bad = {**PASSING, "reward_gain": -1.5, "reward_model": {"accuracy": 0.4}}
    failed = check_gates(bad, Gates(min_reward_accuracy=0.6))
    assert any(f.startswith("reward_gain=-1.5") for f in failed)
    assert any(f.startswith("reward_model.accuracy=0.4") for f in failed)
    assert check_gates({}, Gates())[0].endswith("missing from the evaluation")


def test_champion_moves_only_when_gates_pass_and_alias_loads_and_generates(store):
    root, model_dir = store
    with mlflow.start_run():
        first = publish(model_dir, model_name="lmforge-chat", dtype="fp32", failed_gates=[], tags={})
    with mlflow.start_run():
        second = publish(
            model_dir,
            model_name="lmforge-chat",
            dtype="bf16",
            failed_gates=["reward_gain=-1 fails >= 0"],
            tags={},
        )
    assert (first["alias"], second["alias"]) == ("champion", "candidate")
    client = MlflowClient()
    champion = client.get_model_version_by_alias("lmforge-chat", "champion")
    assert str(champion.version) == "1"  # the failed version did not move it
    failed = client.get_model_version("lmforge-chat", "2")
    assert json.loads(failed.tags["lmforge.gate_failures"]) == ["reward_gain=-1 fails >= 0"]
    assert failed.tags["lmforge.weights_dtype"] == "bf16"

    model = mlflow.pyfunc.load_model("models:/lmforge-chat@champion")
    chat = json.dumps([{"role": "user", "content": "hello there"}])
    out = model.predict(
        pd.DataFrame({"prompt": ["hello", ""], "messages": ["", chat]}),
        params={"max_new_tokens": 5, "temperature": 0.0},
    )
    assert list(out["finish_reason"]) and all(n <= 5 for n in out["completion_tokens"])
    again = model.predict(
        pd.DataFrame({"prompt": ["hello", ""], "messages": ["", chat]}),
        params={"max_new_tokens": 5, "temperature": 0.0},
    )
    assert list(out["text"]) == list(again["text"])  # greedy is deterministic
    # Either column alone, as the model's docstring says (the signature marks both optional).
    greedy = {"max_new_tokens": 5, "temperature": 0.0}
    only_messages = model.predict(pd.DataFrame({"messages": [chat]}), params=greedy)
    only_prompt = model.predict(pd.DataFrame({"prompt": ["hello"]}), params=greedy)
    assert list(only_messages["text"]) == [out["text"][1]] and list(only_prompt["text"]) == [out["text"][0]]
    # Only safetensors weights, no pickled model object, in the logged artifacts.
    local = mlflow.artifacts.download_artifacts("models:/lmforge-chat@champion")
    files = {p.name for p in Path(local).rglob("*") if p.is_file()}
    assert "model.safetensors" in files and not any(f.endswith((".pkl", ".pt", ".ckpt")) for f in files)


def test_lineage_tags_name_commit_data_hashes_params_and_runs(store):
    root, _ = store
    params = load_params(REPO / "params.yaml", ["pretrain.max_steps=7"])
    tags = lineage_tags(params, root)
    assert tags["lmforge.preset"] == "tiny" and tags["lmforge.git_commit"]
    assert json.loads(tags["lmforge.params_overrides"]) == {"pretrain": {"max_steps": 7}}
    assert tags["lmforge.dvc.data/processed"] == "aaa.dir" and tags["lmforge.dvc.models/rlhf"] == "bbb.dir"
    assert {
        tags[f"lmforge.run.{s}"] for s in ("ingest", "tokenizer", "pretrain", "sft", "reward", "rlhf")
    } == {f"run{i}" for i in range(6)}
    # What bitwise reproducibility depends on travels with the version.
    import torch

    assert tags["lmforge.seed"] == "1337" and tags["lmforge.deterministic"] == "True"
    assert tags["lmforge.env.torch"] == torch.__version__ and tags["lmforge.env.mkl_cbwr"] == "AUTO"
    assert {"lmforge.env.threads", "lmforge.env.device", "lmforge.env.deterministic_algorithms"} <= set(tags)


def test_register_stage_writes_the_model_card_and_the_figures_with_their_intervals(store):
    """The registered version's description is its model card (decision, figures with 95%
    intervals, lineage), and the evaluation's figures, intervals included, are on its run."""
    from lmforge.stages import register

    root, _ = store
    figure = {"value": 0.875, "low": 0.77, "high": 0.94}
    evaluation = {
        **PASSING,
        "tuned": {
            **PASSING["tuned"],
            "end_of_turn_rate": figure["value"],
            "end_of_turn_rate_ci_low": figure["low"],
            "end_of_turn_rate_ci_high": figure["high"],
        },
        "reward_gain_ci_low": 0.2,
        "reward_gain_ci_high": 0.8,
        "reward_gain_p": 0.001,
        "items": {"prompts": 64, "pairs": 124},
    }
    (root / "metrics" / "evaluate.json").write_text(json.dumps(evaluation))
    params = load_params(REPO / "params.yaml")
    with mlflow.start_run() as run:
        result = register.run(params, root)
    assert result["alias"] == "champion"
    version = MlflowClient().get_model_version("lmforge-chat", str(result["version"]))
    card = version.description
    assert card.startswith("# lmforge-chat: the `tiny` preset") and "every gate passed" in card
    assert "| end_of_turn_rate | - | - | 0.875 [0.77, 0.94] |" in card
    assert "0.5 [0.2, 0.8], p = 0.001" in card and "124 held-out pairs" in card
    assert "`data/processed`: DVC md5 `aaa.dir`" in card and "MLflow run `run5`" in card
    logged = MlflowClient().get_run(run.info.run_id).data.metrics
    assert logged["eval.tuned.end_of_turn_rate_ci_low"] == 0.77 and logged["eval.reward_gain_p"] == 0.001
