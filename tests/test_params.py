"""params.yaml: presets, precedence, and errors that name the key."""

import pytest

from lmforge.params import ParamsError, load_params, resolve

RAW = {
    "preset": "tiny",
    "ingest": {"text_sources": [{"path": "a.txt"}]},
    "tokenizer": {},
    "model": {"n_layer": 3},
    "pretrain": {},
    "presets": {
        "tiny": {"model": {"n_layer": 2, "n_embd": 64}, "tokenizer": {"vocab_size": 512}},
        "small": {"model": {"n_layer": 12, "n_embd": 768}},
    },
}


def test_section_overrides_preset_and_preset_overrides_defaults():
    p = resolve(RAW)
    assert p.model.n_layer == 3  # top-level section wins over the preset
    assert p.model.n_embd == 64  # preset wins over the default
    assert p.model.n_head == 4  # default
    assert p.tokenizer.vocab_size == 512


def test_cli_override_wins_and_preset_is_one_key():
    p = resolve(RAW, ["model.n_layer=5", "pretrain.lr=0.01"])
    assert (p.model.n_layer, p.pretrain.lr) == (5, 0.01)
    assert resolve(RAW, ["preset=small"]).model.n_embd == 768


def test_repo_params_yaml_loads_both_presets():
    assert load_params("params.yaml").preset == "tiny"
    small = load_params("params.yaml", ["preset=small"])
    assert small.model.n_layer == 12 and small.tokenizer.vocab_size == 32768


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.n_layers=2"], "model.n_layers: unknown key"),
        (["pretrain.lr=fast"], "pretrain.lr: Input should be a valid number"),
        (["model.n_layer=0"], "model.n_layer: Input should be greater than or equal to 1"),
        (["preset=huge"], "preset 'huge' is not defined"),
        (["optimizer.lr=1"], "unknown section 'optimizer'"),
        (["pretrain.lr"], "must look like section.key=value"),
        (["ingest.text_sources=[{path: a, hf_dataset: b}]"], "exactly one of `path` or `hf_dataset`"),
    ],
)
def test_bad_params_name_the_key(overrides, message):
    with pytest.raises(
        ParamsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        resolve(RAW, overrides)


def test_unknown_top_level_key_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="unknown top-level key"):
        resolve({**RAW, "modle": {}})
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("preset: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_core_and_params_defaults_agree():
    """A field the params layer and a core config share has one default (params reuse the core's)."""
    import dataclasses

    from lmforge.model import GPTConfig
    from lmforge.params import ModelParams, RLHFParams, TrainParams
    from lmforge.training.config import OptimConfig, RLConfig, TrainerConfig

    pairs = [
        (ModelParams, GPTConfig),
        (TrainParams, OptimConfig),
        (TrainParams, TrainerConfig),
        (RLHFParams, RLConfig),
    ]
    compared = 0
    for section, core in pairs:
        for field in dataclasses.fields(core):
            if field.name in section.model_fields and field.default is not dataclasses.MISSING:
                assert section.model_fields[field.name].default == field.default, (
                    section.__name__,
                    field.name,
                )
                compared += 1
    assert compared >= 35


def test_core_configs_are_built_from_params_by_field_name():
    from lmforge.params import load_params
    from lmforge.stages.fitting import optim_config, trainer_config
    from lmforge.stages.rlhf import rl_config

    params = load_params(overrides=["rlhf.kl_max=3.5", "rlhf.group_size=6", "pretrain.grad_clip=0.5"])
    assert rl_config(params.rlhf, seed=11).kl_max == 3.5 and rl_config(params.rlhf, seed=11).group_size == 6
    assert optim_config(params.pretrain).grad_clip == 0.5
    tcfg = trainer_config(params, "pretrain")
    assert tcfg.seed == params.stage_seed("pretrain") and tcfg.deterministic is params.deterministic
    assert tcfg.val_every_steps == params.pretrain.val_every_steps


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "rlhf"])
def test_fsdp_is_refused_with_the_reason(stage) -> None:
    """Issue 25: FSDP was passed through with no wrap policy, Muon on sharded matrices and a `.to("cpu")`
    of a sharded module after training; it is no longer offered, and naming it says why."""
    from lmforge.training import TrainerConfig

    with pytest.raises(
        ParamsError, match=rf"{stage}\.strategy: .*'fsdp' is not offered: .*Muon.*use strategy: ddp"
    ):
        load_params("params.yaml", overrides=[f"{stage}.strategy=fsdp"])
    with pytest.raises(ValueError, match=r"TrainerConfig\.strategy 'fsdp' is not offered"):
        TrainerConfig(max_steps=1, strategy="fsdp")
    assert load_params("params.yaml", overrides=[f"{stage}.strategy=ddp"]).section(stage).strategy == "ddp"
