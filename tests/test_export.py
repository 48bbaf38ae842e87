"""`lmforge export`: the exported folder loads in stock transformers with identical logits and tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_gpt
from lmforge.cli import main
from lmforge.export import ExportError, export_hf
from lmforge.model import GPT
from lmforge.model_folder import save_model_dir
from lmforge.tokenizer import ChatTokenizer, train_bpe

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "user: what is the capital of France? assistant: Paris, of course.",
    "Byte-level BPE handles unicode too: café, naïve, 東京, emoji 🙂.",
] * 20

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello there, what is the capital of France?"},
    {"role": "assistant", "content": "Paris, of course."},
    {"role": "user", "content": "And café naïve 🙂?"},
]

WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city, «today»",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOLS = [{"type": "function", "function": WEATHER}]
TOOL_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Weather in Paris and in Tōkyō?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            },
            {
                "id": "b",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Tōkyō"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "a", "content": "sunny, 21 °C"},
    {"role": "tool", "tool_call_id": "b", "content": "rain <heavy> & wind"},
    {"role": "assistant", "content": "Sunny in Paris; rain in Tōkyō."},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    ChatTokenizer(train_bpe(TEXTS, vocab_size=300)).save(d)
    return d


def _model_dir(root: Path, tok_dir: Path, *, tie: bool, seed: int = 0, **arch) -> tuple[Path, GPT]:
    tok = ChatTokenizer.load(tok_dir)
    model = tiny_gpt(
        tok.vocab_size,
        seed=seed,
        block_size=64,
        n_embd=64,
        n_kv_head=2,
        tie_embeddings=tie,
        rope_theta=5000.0,
        norm_eps=1e-6,
        **arch,
    )
    with torch.no_grad():  # exercise the norm weights (they init to ones)
        for m in model.modules():
            if isinstance(m, torch.nn.RMSNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
    model.eval()
    name = "-".join(["tied" if tie else "untied", *(f"{k}={v}" for k, v in arch.items())])
    return save_model_dir(model, model.config, tok_dir, root / name), model


@pytest.mark.parametrize(
    ("tie", "arch", "architecture"),
    [
        (True, {}, "LlamaForCausalLM"),
        (False, {}, "LlamaForCausalLM"),
        (True, {"qk_norm": True}, "Qwen3ForCausalLM"),
        (False, {"mlp": "relu2"}, "ArceeForCausalLM"),
    ],
    ids=["tied", "untied", "qk_norm-qwen3", "relu2-arcee"],
)
def test_logits_match_transformers(
    tmp_path: Path, tok_dir: Path, tie: bool, arch: dict, architecture: str
) -> None:
    src, model = _model_dir(tmp_path, tok_dir, tie=tie, **arch)
    if arch.get("qk_norm"):
        with torch.no_grad():  # the q/k norm gains init to ones: make the mapping matter
            for block in model.blocks:
                block.attn.q_norm.weight.add_(0.3 * torch.randn_like(block.attn.q_norm.weight))
                block.attn.k_norm.weight.add_(0.3 * torch.randn_like(block.attn.k_norm.weight))
        src = save_model_dir(model, model.config, tok_dir, src)
    out = export_hf(src, tmp_path / "hf")

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [architecture]
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is tie
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is (not tie)  # noqa: SIM118

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == architecture
    ids = torch.randint(0, model.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, diff


def test_tokenizer_and_chat_template_match(tmp_path: Path, tok_dir: Path) -> None:
    src, _ = _model_dir(tmp_path, tok_dir, tie=True)
    out = export_hf(src, tmp_path / "hf")
    ours = ChatTokenizer.load(src)
    theirs = transformers.AutoTokenizer.from_pretrained(out)

    text = "Hello world! The quick brown fox, café naïve 東京 🙂\n  indented"
    assert theirs.encode(text) == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
    )

    for gen in (True, False):
        got = theirs.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert list(got) == ours.render_chat(CHAT, add_generation_prompt=gen).ids

    # The tool-call format (lmforge.tool_calls): tools in the system turn (an existing one, or one of
    # their own), calls with dict or JSON-text arguments, tool results, a reply without content.
    for chat in (TOOL_CHAT, TOOL_CHAT[1:]):
        for gen in (True, False):
            got = theirs.apply_chat_template(
                chat, tools=TOOLS, add_generation_prompt=gen, tokenize=True, return_dict=False
            )
            assert list(got) == ours.render_chat(chat, tools=TOOLS, add_generation_prompt=gen).ids

    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == [ours.end_id, ours.eos_id]


def test_rejects_non_causal_lm_folders(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(ExportError, match="config not found"):
        export_hf(tmp_path, tmp_path / "out")
    src, _ = _model_dir(tmp_path, tok_dir, tie=True)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "kind": "reward_model"}))
    with pytest.raises(ExportError, match="causal_lm"):
        export_hf(src, tmp_path / "out")


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ({"x0_skip": True}, "x0_skip has no stock"),
        ({"qk_norm": True, "mlp": "relu2"}, "qk_norm with mlp relu2"),
    ],
)
def test_rejects_architectures_transformers_lacks(
    tmp_path: Path, tok_dir: Path, arch: dict, message: str
) -> None:
    src, _ = _model_dir(tmp_path, tok_dir, tie=True, **arch)
    with pytest.raises(ExportError, match=message):
        export_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _model_dir(tmp_path, tok_dir, tie=True)
    out = tmp_path / "exports" / "hf"
    assert main(["export", "--model-dir", str(src), "--out", str(out)]) == 0
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= {p.name for p in out.iterdir()}
    assert main(["export", "--model-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err
