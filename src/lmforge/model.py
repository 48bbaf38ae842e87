"""A small Llama-style decoder-only transformer.

Token embedding -> N x [RMSNorm -> GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head. No biases anywhere.

Three call paths share the same modules:

* training (no cache, no mask): one fused causal SDPA call per layer with
  ``is_causal=True`` and no data-dependent Python branching, so it can take the
  flash kernel and be wrapped in ``torch.compile``;
* scoring (no cache): an optional 1/0 ``attention_mask`` for padded batches.
  RoPE positions are derived from the mask, so a left-padded sequence gets
  exactly the logits of the same sequence without padding;
* generation (:meth:`GPT.forward_slots`): a preallocated :class:`SlotKVCache`
  where every row writes at its own positions (the generation engine's
  continuous batching, :mod:`lmforge.generation.engine`);
* packed training (no cache): ``segment_ids`` [B, T] marks runs of equal ids as
  separate sequences. Attention is block-diagonal causal and RoPE positions
  restart at each segment, so each packed sequence gets exactly the logits it
  would get alone. Only taken when ``segment_ids`` is passed.

Training core: imports only torch and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.knobs import check, knob
from lmforge.kv_cache import SlotKVCache, SlotView

# `enable_gqa` lets SDPA broadcast the shared k/v heads without materialising copies (torch >= 2.5).
_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


def kv_for_sdpa(k: Tensor, v: Tensor, n_head: int, attn_mask: Tensor | None) -> tuple[Tensor, Tensor, dict]:
    """K/V [B, n_kv_head, S, D] and SDPA's keyword arguments, as its fast kernels take them.

    Grouped-query attention shares each k/v head among n_head / n_kv_head query heads. On the causal
    path SDPA broadcasts them itself (``enable_gqa``), which the flash kernel takes. With a mask (SFT
    packing, the reward model, rollouts, serving) flash is out (it takes no mask) and CUDA's
    memory-efficient kernel rejects GQA, which leaves the math kernel and a B x H x T x S score tensor
    (about 0.8 GB a layer for SFT at 32 x 1024); repeated k/v heads let the memory-efficient kernel
    run. The CPU keeps ``enable_gqa`` (its kernels take both, and its results stay what they were).
    """
    groups = n_head // k.shape[1]
    if groups == 1:
        return k, v, {}
    if _SDPA_HAS_GQA and not (attn_mask is not None and k.is_cuda):
        return k, v, {"enable_gqa": True}
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), {}


MLPKind = Literal["swiglu", "relu2"]  # the keys of MLPS


@dataclass
class GPTConfig:
    """Model shape, every knob declared once (:func:`lmforge.knobs.knob`; the params models derive
    from it). ``n_kv_head`` and ``ffn_hidden`` are resolved to ints on construction."""

    vocab_size: int = knob(doc="tokens in the vocabulary (from the tokenizer)", ge=1)
    block_size: int = knob(256, ge=8, doc="context length in tokens")
    n_layer: int = knob(4, ge=1, doc="transformer blocks")
    n_head: int = knob(4, ge=1, doc="attention heads per block")
    n_kv_head: int | None = knob(None, ge=1, doc="key/value heads (grouped-query attention; None: n_head)")
    n_embd: int = knob(256, ge=8, doc="width of the residual stream")
    ffn_hidden: int | None = knob(
        None, ge=8, doc="MLP hidden width (None: 8/3 n_embd for swiglu, 4 n_embd for relu2, rounded up to 64)"
    )
    rope_theta: float = knob(10000.0, gt=0, doc="RoPE base")
    tie_embeddings: bool = knob(True, doc="the output layer shares the token embedding's weights")
    norm_eps: float = knob(1e-5, gt=0, doc="RMSNorm epsilon")
    dropout: float = knob(0.0, ge=0, lt=1, doc="dropout probability in training")
    qk_norm: bool = knob(
        False,
        doc="RMSNorm of each head's q and k before RoPE (a learned gain per head dim, as Qwen3 / modded-nanogpt)",
    )
    mlp: MLPKind = knob(
        "swiglu", doc="swiglu (SiLU-gated, 3 matrices) or relu2 (ReLU squared, 2 matrices, as modded-nanogpt)"
    )
    x0_skip: bool = knob(
        False,
        doc="each block first mixes the token embedding back in, x = a*x + b*x0, learned a (init 1) and b "
        "(init 0) per block (modded-nanogpt's x0 skip)",
    )

    def __post_init__(self) -> None:
        check(self)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}) "
                "for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig head_dim = n_embd / n_head = {self.head_dim} must be even for RoPE")
        if self.ffn_hidden is None:
            # SwiGLU has 3 matrices instead of 2, so 8/3 * n_embd keeps the MLP at ~8 * n_embd^2
            # parameters (ReLU²: 4 * n_embd); multiples of 64 keep matmuls tensor-core friendly.
            width = 8 * self.n_embd // 3 if self.mlp == "swiglu" else 4 * self.n_embd
            self.ffn_hidden = -(-width // 64) * 64

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown GPTConfig field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**d)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[Tensor, Tensor]:
    """Full-width tables of shape [length, head_dim] (computed in fp32): cos of each pair's angle on
    both halves, and sin with the first half negated, so that :func:`apply_rope` is two products."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + D/2]) ("rotate-half" convention). x: [B, H, T, D].

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written as x * cos + swap_halves(x) * sin with the
    tables of :func:`rope_tables`: two products and one concatenation (a third fewer elementwise
    kernels than the halves spelled out, which showed in the CPU step profile)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_kv_head is not None
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # One fused matmul for q, k and v; k/v are narrower under GQA.
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        attn_mask: Tensor | None,
        is_causal: bool,
        kv_cache: SlotView | None,
        layer: int,
        trace: Trace | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim],
            dim=-1,
        )
        q = apply_rope(self.q_norm(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)

        if trace is not None:  # introspection: the same attention, with its weights kept
            y = self._attention_with_weights(q, k, v, attn_mask, is_causal, trace)
            y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
            return self.resid_drop(self.proj(y))
        k, v, kwargs = kv_for_sdpa(k, v, self.n_head, attn_mask)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            **kwargs,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_drop(self.proj(y))

    def _attention_with_weights(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, trace: Trace
    ) -> Tensor:
        """softmax(q k^T / sqrt(d)) v spelled out (what SDPA computes), recording the weights [B, H, T, S]."""
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        T, S = scores.shape[-2:]
        if is_causal:
            allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            scores = scores.masked_fill(~allowed, float("-inf"))
        elif attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        trace.attention.append(weights)
        return weights @ v


@dataclass
class Trace:
    """What :meth:`GPT.hidden_states` records when given one: each layer's attention weights
    [B, n_head, T, T] and the residual stream [B, T, n_embd] after the embedding and after each block."""

    attention: list[Tensor] = field(default_factory=list)
    residual: list[Tensor] = field(default_factory=list)


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.ffn_hidden is not None
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.ffn_hidden, bias=False)  # fused gate + up
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(gate) * up))


class ReLU2(nn.Module):
    """relu(x W_up)^2 W_down: two matrices, sparse activations (modded-nanogpt's MLP)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.ffn_hidden is not None
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.relu(self.up(x)).square()))


MLPS: dict[MLPKind, type[nn.Module]] = {"swiglu": SwiGLU, "relu2": ReLU2}


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLPS[cfg.mlp](cfg)
        if cfg.x0_skip:
            self.x0_mix = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, x0: Tensor | None = None, **attn_kwargs: Any
    ) -> Tensor:
        if x0 is not None and hasattr(self, "x0_mix"):
            x = self.x0_mix[0] * x + self.x0_mix[1] * x0
        x = x + self.attn(self.attn_norm(x), cos, sin, **attn_kwargs)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        # Derived from the config, so not worth storing in checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    @classmethod
    def from_config(cls, config: GPTConfig | Mapping[str, Any]) -> GPT:
        """Build a freshly initialised model from a config or its ``to_dict()`` form."""
        return cls(config if isinstance(config, GPTConfig) else GPTConfig.from_dict(config))

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # Each block adds two residual branches; shrinking their output projections keeps the
        # residual stream's variance roughly independent of depth at init (GPT-2).
        out_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=out_std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=out_std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights counted once).

        ``exclude_embeddings`` drops the token embedding and the lm_head (Kaplan-style "non-embedding" N).
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 x the parameters that multiply (the
        blocks and the lm_head matmul, tied or not; the embedding lookup multiplies nothing) +
        12 * n_layer * n_embd * seq_len for attention's scores and values."""
        seq_len = self.config.block_size if seq_len is None else seq_len
        cfg = self.config
        matmul = self.num_params(exclude_embeddings=True) + cfg.n_embd * cfg.vocab_size
        return 6.0 * matmul + 12.0 * cfg.n_layer * cfg.n_embd * seq_len

    def _attention_inputs(
        self, B: int, T: int, attention_mask: Tensor | None, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        """RoPE cos/sin (broadcastable to [B, H, T, D/2]), SDPA mask and is_causal for this call."""
        block_size = self.config.block_size
        if attention_mask is None:
            return self.rope_cos[:T], self.rope_sin[:T], None, T > 1

        mask = attention_mask.to(device=device, dtype=torch.bool)
        if mask.shape != (B, T):
            raise ValueError(
                f"attention_mask must have shape (batch, seq_len) = {(B, T)}, got {tuple(mask.shape)}"
            )
        # A token's position is the number of real tokens before it, so left padding is invisible.
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if int(positions.max()) >= block_size:
            raise ValueError(f"Token position {int(positions.max())} exceeds block_size {block_size}")
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        q_pos = torch.arange(T, device=device)[:, None]
        k_pos = torch.arange(T, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None] & mask[:, None, :]
        # Padding queries would otherwise attend to nothing and produce NaNs; letting them see
        # themselves keeps everything finite, and no real token ever attends to them.
        allowed = allowed | (k_pos == q_pos)[None]
        return cos, sin, allowed[:, None], False

    def _segment_inputs(
        self, segment_ids: Tensor, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, bool]:
        """RoPE tables and a block-diagonal causal SDPA mask for packed rows (training path)."""
        B, T = segment_ids.shape
        device = segment_ids.device
        t = torch.arange(T, device=device)
        # A segment starts wherever the id changes; numbering runs (not raw ids) means a reused
        # id further along the row can never see an earlier, unrelated sequence.
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        run = starts.long().cumsum(-1)
        positions = t - torch.where(starts, t, 0).cummax(-1).values
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        allowed = (t[None, :] <= t[:, None])[None] & (run[:, :, None] == run[:, None, :])
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(
                    f"attention_mask must have shape {(B, T)} with segment_ids, got {tuple(attention_mask.shape)}"
                )
            # Keep the diagonal so fully masked (padding) queries stay finite.
            allowed = (allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]) | (
                t[None, :] == t[:, None]
            )[None]
        return cos, sin, allowed[:, None], False

    def hidden_states(
        self,
        idx: Tensor,
        *,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        trace: Trace | None = None,
    ) -> Tensor:
        """Final-norm hidden states [B, T, n_embd]; the base for lm_head and reward/value heads.

        ``trace`` records attention weights and the residual stream per layer (introspection).

        ``segment_ids`` [B, T] (training only) packs several sequences per row; see the
        module docstring.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [batch, seq_len], got {tuple(idx.shape)}")
        batch, seq_len = idx.shape
        if seq_len > self.config.block_size:
            raise ValueError(f"Input length {seq_len} exceeds block_size {self.config.block_size}")
        if segment_ids is not None:
            if segment_ids.shape != idx.shape:
                raise ValueError(
                    f"segment_ids must have the shape of idx {tuple(idx.shape)}, got {tuple(segment_ids.shape)}"
                )
            cos, sin, attn_mask, is_causal = self._segment_inputs(segment_ids.to(idx.device), attention_mask)
        else:
            cos, sin, attn_mask, is_causal = self._attention_inputs(
                batch, seq_len, attention_mask, idx.device
            )

        x = self.drop(self.tok_emb(idx))
        extra: dict[str, Any] = {}
        if trace is not None:
            trace.residual.append(x)
            extra["trace"] = trace
        x0 = x
        for i, block in enumerate(self.blocks):
            x = block(
                x, cos, sin, x0, attn_mask=attn_mask, is_causal=is_causal, kv_cache=None, layer=i, **extra
            )
            if trace is not None:
                trace.residual.append(x)
        return self.norm_f(x)

    def new_slot_cache(
        self, slots: int, max_len: int | None = None, device: torch.device | str | None = None
    ) -> SlotKVCache:
        """A generation cache of ``slots`` sequences of up to ``max_len`` tokens (default: block_size),
        on the model's device."""
        w = self.tok_emb.weight
        cfg = self.config
        assert cfg.n_kv_head is not None
        return SlotKVCache(
            cfg.n_layer,
            slots,
            cfg.n_kv_head,
            cfg.block_size if max_len is None else min(max_len, cfg.block_size),
            cfg.head_dim,
            device=w.device if device is None else device,
            dtype=w.dtype,
        )

    def forward_slots(self, idx: Tensor, view: SlotView, *, last: Tensor | None = None) -> Tensor:
        """Logits for rows of a :class:`SlotKVCache` (continuous batching).

        ``idx`` [B, T] are new tokens at ``view.positions`` [B, T]; each attends to its own slot's
        keys at positions <= its own. Returns logits [B, T, V], or [B, V] at index ``last`` [B] of
        each row when given (the prefill of right-padded prompts needs only the last real token).
        """
        positions = view.positions
        if int(view.span) > self.config.block_size:
            raise ValueError(f"Token position {view.span - 1} exceeds block_size {self.config.block_size}")
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        keys = torch.arange(view.span, device=idx.device)
        allowed = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, span]
        x = x0 = self.tok_emb(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, x0, attn_mask=allowed, is_causal=False, kv_cache=view, layer=i)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last]
        return self.lm_head(self.norm_f(x))

    def forward(
        self,
        idx: Tensor,
        *,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits [B, T, vocab_size]."""
        return self.lm_head(self.hidden_states(idx, attention_mask=attention_mask, segment_ids=segment_ids))
