"""Export a causal-LM model folder to Hugging Face transformers format (Llama, Qwen3 or Arcee).

lmforge's GPT is a Llama: RMSNorm pre-norm blocks, GQA attention with rotate-half RoPE,
SwiGLU MLP, no biases. Its options map onto two close relatives: `qk_norm` is Qwen3 (a per-head
RMSNorm of q and k before RoPE), `mlp: relu2` is Arcee (a non-gated ReLU² MLP). So an exported
folder loads with stock transformers, no remote code (`x0_skip`, and qk_norm with relu2 together,
have no stock architecture and are refused):

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exports/hf")
    tok = AutoTokenizer.from_pretrained("exports/hf")

Weight mapping (per layer N):

    tok_emb.weight                   -> model.embed_tokens.weight
    blocks.N.attn_norm.weight        -> model.layers.N.input_layernorm.weight
    blocks.N.attn.qkv.weight         -> model.layers.N.self_attn.{q,k,v}_proj.weight  (row split)
    blocks.N.attn.proj.weight        -> model.layers.N.self_attn.o_proj.weight
    blocks.N.mlp_norm.weight         -> model.layers.N.post_attention_layernorm.weight
    blocks.N.mlp.gate_up.weight      -> model.layers.N.mlp.{gate,up}_proj.weight      (row split)
    blocks.N.mlp.down.weight         -> model.layers.N.mlp.down_proj.weight
    blocks.N.mlp.up.weight           -> model.layers.N.mlp.up_proj.weight              (relu2, Arcee)
    blocks.N.attn.{q,k}_norm.weight  -> model.layers.N.self_attn.{q,k}_norm.weight     (qk_norm, Qwen3)
    norm_f.weight                    -> model.norm.weight
    lm_head.weight                   -> lm_head.weight (only when embeddings are untied)

No q/k row permutation is needed: lmforge's RoPE already rotates the pairs
(x[i], x[i + head_dim/2]) of each head ("rotate-half", the convention of HF's Llama), with the
same inverse frequencies theta^(-2i/head_dim), and q/k rows are laid out head-major exactly as
HF's ``view(B, T, heads, head_dim)`` expects. GQA query head h reads kv head h // (n_head /
n_kv_head) in both (SDPA ``enable_gqa`` and HF ``repeat_kv``).

Imports only torch, safetensors, json and the standard library (plus lmforge's torch-only model);
transformers is needed to load the result, not to write it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file

from lmforge.model import GPT, GPTConfig

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


class ExportError(ValueError):
    """The source folder cannot be exported (not a causal LM model folder, missing files)."""


def _jinja_str(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template_jinja() -> str:
    """A Jinja chat template that renders exactly like ``ChatTokenizer.render_chat``, tools included.

    ``<|bos|>`` then ``<|role|>content<|end|>`` per message, then ``<|assistant|>`` when
    ``add_generation_prompt``. Unknown roles raise, like render_chat. The tool-call format of
    :mod:`lmforge.tool_calls` is rendered from its own constants: ``tools`` (``apply_chat_template``'s
    argument) listed in the system turn, assistant ``tool_calls`` as ``<tool_call>`` JSON (arguments
    given as a dict are written compact; as a string, verbatim), ``role: "tool"`` messages as
    ``<tool_response>`` user turns.
    """
    from lmforge import tool_calls as tc
    from lmforge.tokenizer import BOS, END, ROLE_TOKENS  # `tokenizers` is a core dependency

    roles = ", ".join(f"'{r}': '{t}'" for r, t in ROLE_TOKENS.items())
    compact = "tojson(separators=(',', ':'))"
    tools_block = (
        _jinja_str(tc.TOOLS_PROMPT + tc.TOOLS_OPEN + "\n")
        + " + ns.tool_lines | join('\\n') + "
        + _jinja_str("\n" + tc.TOOLS_CLOSE)
    )
    return (
        "{%- set role_tokens = {" + roles + "} -%}"
        "{{- '" + BOS + "' -}}"
        "{%- set ns = namespace(tools_pending=false, tool_lines=[], content='') -%}"
        "{%- if tools -%}"
        "{%- for tool in tools -%}"
        "{%- set fn = tool['function'] if tool['function'] is defined else tool -%}"
        "{%- set ns.tool_lines = ns.tool_lines + [fn | " + compact + "] -%}"
        "{%- endfor -%}"
        "{%- set tools_text = " + tools_block + " -%}"
        "{%- set ns.tools_pending = true -%}"
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        "{{- role_tokens['system'] + tools_text + '" + END + "' -}}"
        "{%- set ns.tools_pending = false -%}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- set role = message['role'] -%}"
        "{%- set ns.content = message.get('content') if message.get('content') is not none else '' -%}"
        "{%- if role == 'tool' -%}"
        "{%- set role = 'user' -%}"
        "{%- set ns.content = "
        + _jinja_str(tc.RESULT_OPEN)
        + " + ns.content + "
        + _jinja_str(tc.RESULT_CLOSE)
        + " -%}"
        "{%- elif message['tool_calls'] is defined and message['tool_calls'] -%}"
        "{%- for call in message['tool_calls'] -%}"
        "{%- set fn = call['function'] if call['function'] is defined else call -%}"
        "{%- set args = fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | "
        + compact
        + ") -%}"
        "{%- set ns.content = ns.content + "
        + _jinja_str(tc.CALL_OPEN + '{"name":')
        + " + (fn['name'] | tojson)"
        " + ',\"arguments\":' + args + '}' + " + _jinja_str(tc.CALL_CLOSE) + " -%}"
        "{%- endfor -%}"
        "{%- elif loop.first and ns.tools_pending -%}"
        "{%- set ns.content = ns.content + '\\n\\n' + tools_text -%}"
        "{%- endif -%}"
        "{%- if role not in role_tokens -%}"
        "{{- raise_exception('message role must be one of " + ", ".join(sorted(ROLE_TOKENS)) + "') -}}"
        "{%- endif -%}"
        "{{- role_tokens[role] + ns.content + '" + END + "' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + ROLE_TOKENS["assistant"] + "' -}}{%- endif -%}"
    )


def _read_source(model_dir: Path) -> tuple[GPTConfig, dict]:
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: not a directory (expected an lmforge model folder)")
    cfg_path = model_dir / CONFIG
    if not cfg_path.is_file():
        raise ExportError(f"{cfg_path}: model config not found (is {model_dir} an lmforge model folder?)")
    raw = json.loads(cfg_path.read_text())
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind != "causal_lm" or not isinstance(raw.get("model"), dict):
        raise ExportError(
            f"{model_dir}: only causal LM folders (config.json kind 'causal_lm') can be exported to "
            f"LlamaForCausalLM, got kind {kind!r}"
        )
    for name in (WEIGHTS, TOKENIZER):
        if not (model_dir / name).is_file():
            raise ExportError(f"{model_dir / name}: missing from the model folder")
    return GPTConfig.from_dict(raw["model"]), raw


def _hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    cfg = model.config
    assert cfg.n_kv_head is not None and cfg.ffn_hidden is not None
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.tok_emb.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([q_rows, kv_rows, kv_rows], dim=0)
        out.update(
            {
                p + "input_layernorm.weight": block.attn_norm.weight,
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v,
                p + "self_attn.o_proj.weight": block.attn.proj.weight,
                p + "post_attention_layernorm.weight": block.mlp_norm.weight,
                p + "mlp.down_proj.weight": block.mlp.down.weight,
            }
        )
        if cfg.mlp == "relu2":
            out[p + "mlp.up_proj.weight"] = block.mlp.up.weight
        else:
            gate, up = block.mlp.gate_up.weight.chunk(2, dim=0)
            out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = block.attn.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = block.attn.k_norm.weight
    out["model.norm.weight"] = model.norm_f.weight
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    # safetensors wants independent, contiguous storage for every tensor.
    return {name: t.detach().contiguous().clone() for name, t in out.items()}


def _special_ids(tokenizer_file: Path) -> dict[str, int]:
    added = json.loads(tokenizer_file.read_text()).get("added_tokens", [])
    return {t["content"]: int(t["id"]) for t in added if t.get("special")}


def hf_architecture(cfg: GPTConfig, where: Path) -> tuple[str, str, str]:
    """(architecture, model_type, hidden_act) of the stock transformers model `cfg` is."""
    if cfg.x0_skip:
        raise ExportError(f"{where}: x0_skip has no stock transformers architecture; export needs it off")
    if cfg.qk_norm and cfg.mlp == "relu2":
        raise ExportError(
            f"{where}: qk_norm with mlp relu2 has no stock transformers architecture "
            "(qk_norm alone exports as Qwen3, relu2 alone as Arcee)"
        )
    if cfg.qk_norm:
        return "Qwen3ForCausalLM", "qwen3", "silu"
    if cfg.mlp == "relu2":
        return "ArceeForCausalLM", "arcee", "relu2"
    return "LlamaForCausalLM", "llama", "silu"


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``model_dir`` (an lmforge causal LM folder) as a transformers folder at ``out_dir``
    (Llama; Qwen3 with qk_norm; Arcee with the relu2 MLP)."""
    from lmforge.tokenizer import BOS, END, EOS, PAD, SPECIAL_TOKENS

    model_dir, out = Path(model_dir), Path(out_dir)
    cfg, _ = _read_source(model_dir)
    architecture, model_type, hidden_act = hf_architecture(cfg, model_dir)
    if out.resolve() == model_dir.resolve():
        raise ExportError(f"{out}: the export folder must differ from the source model folder")

    model = GPT(cfg)
    load_model(model, str(model_dir / WEIGHTS), strict=True)
    tensors = _hf_state_dict(model)
    dtype = str(model.tok_emb.weight.dtype).removeprefix("torch.")

    special = _special_ids(model_dir / TOKENIZER)
    missing = [t for t in SPECIAL_TOKENS if t not in special]
    if missing:
        raise ExportError(f"{model_dir / TOKENIZER}: lacks lmforge special tokens {missing}")
    bos_id, eos_id, pad_id, end_id = special[BOS], special[EOS], special[PAD], special[END]

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})

    hf_config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": hidden_act,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        # `rope_theta` for transformers 4.x, `rope_parameters` for 5.x.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
    }
    _write_json(out / CONFIG, hf_config)
    # Chat generation stops at the end of the assistant's turn, like lmforge's engine.
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": bos_id,
            "eos_token_id": [end_id, eos_id],
            "pad_token_id": pad_id,
        },
    )

    shutil.copy(model_dir / TOKENIZER, out / TOKENIZER)
    extra = [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)]
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            # Byte-level BPE covers every input, so there is no unknown token.
            "unk_token": None,
            "additional_special_tokens": extra,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.block_size,
            "padding_side": "left",
            "chat_template": chat_template_jinja(),
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "additional_special_tokens": extra,
        },
    )
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
