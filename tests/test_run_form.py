"""The typed run form (what the Prefect UI renders) and the run summary (champion comparison)."""

import base64
import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from lmforge import tracking
from lmforge.orchestration import run_form
from lmforge.orchestration.overrides import apply_overrides
from lmforge.orchestration.run_form import form_overrides, preset_names
from lmforge.orchestration.run_summary import KEY_METRICS, champion_snapshot, summary_markdown
from lmforge.params import Gates, ParamsError, RLHFParams, TrainParams

REPO = Path(__file__).resolve().parents[1]
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def test_presets_come_from_params_yaml(tmp_path):
    assert preset_names(REPO / "params.yaml")[:2] == ["tiny", "small"]
    (tmp_path / "p.yaml").write_text("preset: a\npresets: {a: {}, big: {}}\n")
    assert preset_names(tmp_path / "p.yaml") == ["a", "big"]
    assert preset_names(tmp_path / "missing.yaml") == []


def test_form_schema_is_plain_typed_fields_with_the_params_bounds():
    steps = run_form.Steps.model_json_schema()["properties"]
    assert steps["pretrain"] == {
        "title": "pretrain steps",
        "description": "pretraining steps (`pretrain.max_steps`)",
        "type": "integer",
        "minimum": TrainParams.model_fields["max_steps"].metadata[0].ge,
    }
    lrs = run_form.LearningRates.model_json_schema()["properties"]
    assert all(p["type"] == "number" and p["exclusiveMinimum"] == 0 for p in lrs.values())
    rlhf = run_form.RLHFKnobs.model_json_schema()["properties"]
    # A choice left empty is submitted as null, so null is one of the choices (Prefect's form
    # validates before it submits: "None is not one of [...]" otherwise).
    choices = list(RLHFParams.model_fields["algorithm"].annotation.__args__)
    assert rlhf["algorithm"]["enum"] == [*choices, None]
    registry = run_form.RegistryKnobs.model_json_schema()["properties"]
    assert registry["dtype"]["enum"] == ["fp32", "bf16", None]
    assert set(registry) - {"dtype"} == set(Gates.model_fields)
    assert registry["min_reward_accuracy"]["minimum"] == 0 and registry["min_reward_accuracy"]["maximum"] == 1
    for model in (run_form.Steps, run_form.LearningRates, run_form.RLHFKnobs, run_form.RegistryKnobs):
        for name, prop in model.model_json_schema()["properties"].items():
            assert "anyOf" not in prop and "default" not in prop, (model, name)  # an empty box, no switch
            assert prop["description"], (model, name)


def test_form_fields_become_params_keys():
    out = form_overrides(
        steps={"pretrain": 50, "rlhf": 4},
        learning_rates=run_form.LearningRates(sft=1e-4),
        rlhf={"algorithm": "dpo"},
        registry={"dtype": "bf16", "min_reward_accuracy": 0.5},
        overrides={"model.n_layer": 2, "seed": 7},
    )
    assert out == {
        "pretrain.max_steps": 50,
        "rlhf.max_steps": 4,
        "sft.lr": 1e-4,
        "rlhf.algorithm": "dpo",
        "registry.dtype": "bf16",
        "registry.gates.min_reward_accuracy": 0.5,
        "model.n_layer": 2,
        "seed": 7,
    }
    assert form_overrides() == {}
    # the same value twice is fine; two different values name the key
    assert form_overrides(steps={"sft": 3}, overrides={"sft.max_steps": 3}) == {"sft.max_steps": 3}
    with pytest.raises(ParamsError, match=r"sft.max_steps \(3 vs 4\)"):
        form_overrides(steps={"sft": 3}, overrides={"sft.max_steps": 4})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": {"pretrain": 0}}, "greater than or equal to 1"),
        ({"learning_rates": {"sft": -1.0}}, "greater than 0"),
        ({"rlhf": {"algorithm": "reinforce"}}, "'ppo', 'grpo' or 'dpo'"),
        ({"registry": {"min_reward_accuracy": 1.5}}, "less than or equal to 1"),
        ({"steps": {"pretrian": 5}}, "Extra inputs are not permitted"),
    ],
)
def test_form_rejects_out_of_bounds_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        form_overrides(**kwargs)


def test_overrides_are_validated_before_anything_is_written(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    before = path.read_bytes()
    for bad, message in (
        ({"pretrain.max_stepz": 5}, "pretrain.max_stepz: unknown key"),
        ({"rlhf.kl_coef": "high"}, "rlhf.kl_coef"),
    ):
        with pytest.raises(ParamsError, match=message):
            apply_overrides(path, "tiny", form_overrides(steps={"sft": 3}, overrides=bad))
        assert path.read_bytes() == before
    changed = apply_overrides(path, "tiny", form_overrides(steps={"sft": 3}, rlhf={"algorithm": "dpo"}))
    assert changed == {
        "sft.max_steps": {"old": None, "new": 3},
        "rlhf.algorithm": {"old": None, "new": "dpo"},
    }


# --------------------------------------------------------------------------- summary vs champion

EVALUATE = {
    "base": {"val_bits_per_byte": 2.0},
    "sft": {"assistant_loss": 3.9},
    "tuned": {"assistant_loss": 4.4, "val_bits_per_byte": 2.7, "mean_reward": 4.0, "end_of_turn_rate": 0.9},
    "reward_model": {"accuracy": 0.8},
    "reward_gain": 4.2,
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (params, metrics) and its MLflow store holding champion v1 of `lmforge-chat`."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "metrics" / "runs").mkdir(parents=True)
    tracking.setup()
    client = MlflowClient()
    champion_runs = {}
    for stage, metrics in (
        ("pretrain", {"val_bits_per_byte": 2.1}),
        ("evaluate", tracking.numeric({**EVALUATE, "tuned": {**EVALUATE["tuned"], "mean_reward": 3.0}})),
        ("rlhf", {"held_out_kl": 0.3}),
    ):
        with mlflow.start_run(run_name=stage) as run:
            mlflow.log_metrics(metrics)
        champion_runs[stage] = run.info.run_id
    client.create_registered_model("lmforge-chat")
    (tmp_path / "m").mkdir()
    version = client.create_model_version("lmforge-chat", source=(tmp_path / "m").as_uri())
    for stage, run_id in champion_runs.items():
        client.set_model_version_tag("lmforge-chat", version.version, f"lmforge.run.{stage}", run_id)
    client.set_registered_model_alias("lmforge-chat", "champion", version.version)
    yield tmp_path
    mlflow.set_tracking_uri(tracking.tracking_uri())


def write_run(root: Path, version: int, alias: str, failed: list[str], kl: float = 0.5) -> None:
    metrics = root / "metrics"
    (metrics / "evaluate.json").write_text(json.dumps(EVALUATE))
    (metrics / "pretrain.json").write_text(json.dumps({"val_bits_per_byte": 2.0}))
    (metrics / "rlhf.json").write_text(json.dumps({"held_out_kl": kl}))
    (metrics / "register.json").write_text(
        json.dumps({"alias": alias, "failed_gates": failed, "model_name": "lmforge-chat"})
    )
    (metrics / "runs" / "register.json").write_text(json.dumps({"version": version}))


def test_summary_compares_with_the_champion_before_the_run(project):
    champion = champion_snapshot("lmforge-chat")
    assert champion.version == 1 and set(champion.run_ids) == {"pretrain", "evaluate", "rlhf"}
    write_run(project, 2, "champion", [])
    (project / "plots" / "pretrain").mkdir(parents=True)
    (project / "plots" / "pretrain" / "loss.png").write_bytes(PNG)
    text = summary_markdown(
        project,
        champion,
        parent_run_id="p123",
        experiment_id="1",
        stage_links={"pretrain": "http://mlflow/#/experiments/1/runs/r1"},
        stage_status={"pretrain": "ran"},
    )
    assert "**Promoted:** `lmforge-chat` v2 is now `champion` (replaces v1): every gate passed." in text
    # pretrain bpb 2.0 < 2.1: better; KL 0.5 > 0.3: worse; the rest the same. The reward (4.0 against
    # 3.0) is each version's own reward model's: shown, not counted.
    assert "better on 1, worse on 1 of the 7 key metrics a fixed judge scores" in text
    assert "| held-out reward, tuned policy * | higher | 4 | 3 | +1 | own reward model |" in text
    assert "| base model val bits/byte | lower | 2 | 2.1 | -0.1 | better |" in text
    assert "| KL to the SFT policy (held out) | lower | 0.5 | 0.3 | +0.2 | **worse** |" in text
    assert "| `reward_model.accuracy` | >= 0.7 | 0.8 | pass |" in text
    assert "[lmforge-chat v2](http://127.0.0.1:5000/#/models/lmforge-chat/versions/2)" in text
    assert "MLflow parent run: [p123](http://127.0.0.1:5000/#/experiments/1/runs/p123)" in text
    assert "- `pretrain`: [MLflow run](http://mlflow/#/experiments/1/runs/r1) (ran)" in text
    assert "![pretrain loss curve](data:image/png;base64," + base64.b64encode(PNG).decode() + ")" in text
    assert text.count("| ") > len(KEY_METRICS)


def test_summary_says_why_a_version_was_not_promoted(project):
    champion = champion_snapshot("lmforge-chat")
    write_run(project, 2, "candidate", ["reward_model.accuracy=0.8 fails >= 0.9"])
    text = summary_markdown(project, champion)
    assert (
        "**Not promoted:** `lmforge-chat` v2 is `candidate`, v1 stays `champion`. "
        "Failed gates: reward_model.accuracy=0.8 fails >= 0.9." in text
    )


def test_summary_without_a_champion(project):
    champion = champion_snapshot("another-model")
    assert champion.version is None
    write_run(project, 1, "champion", [])
    text = summary_markdown(project, champion)
    assert "(first champion)" in text and "| champion (none yet) |" in text
    assert "| tuned model val bits/byte | lower | 2.7 | - |  |  |" in text


def test_summary_shows_the_paired_comparison_and_the_intervals(project):
    """The register stage's comparison with the champion (its run record) is a table of paired tests,
    a refusal is a reason of the decision, and a figure with an interval shows it; figures whose
    intervals overlap are "within noise", not better or worse."""
    champion = champion_snapshot("lmforge-chat")
    write_run(project, 2, "candidate", [])
    evaluate = json.loads((project / "metrics" / "evaluate.json").read_text())
    evaluate["tuned"].update(val_bits_per_byte_ci_low=2.6, val_bits_per_byte_ci_high=2.8)
    (project / "metrics" / "evaluate.json").write_text(json.dumps(evaluate))
    row = {
        "comparable": 1,
        "candidate": 3.1,
        "champion": 3.0,
        "difference": 0.1,
        "difference_ci_low": 0.05,
        "difference_ci_high": 0.15,
        "difference_p": 0.002,
    }
    refused = ["worse than the champion: assistant_loss: ... p = 0.002 < 0.05"]
    record = {
        "version": 2,
        "champion": {"version": 1, "eval_set": "abc", "figures": {"assistant_loss": row}},
        "promotion_refused": refused,
    }
    (project / "metrics" / "runs" / "register.json").write_text(json.dumps(record))
    text = summary_markdown(project, champion)
    assert "## Against champion v1: paired tests on the same held-out items" in text
    assert "| `assistant_loss` | 3.1 | 3 | +0.1 [+0.05, +0.15] | 0.002 |" in text
    assert "Failed gates: " + refused[0] in text
    assert "| tuned model val bits/byte | lower | 2.7 [2.6, 2.8] |" in text
