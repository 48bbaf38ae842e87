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
