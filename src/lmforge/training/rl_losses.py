"""Pure tensor functions for RLHF: advantages, KL estimators, PPO/GRPO/DPO losses, log-probs.

Conventions shared by every function here:

* token-level tensors are [B, T] and come with a 1/0 ``mask`` of the same shape; masked-out
  positions never influence a result (means are over mask == 1 only);
* log-probs are "next-token" aligned: for ``input_ids`` [B, T] the log-prob tensor is
  [B, T - 1] and entry ``t`` is log p(input_ids[:, t + 1] | input_ids[:, :t + 1]).

Everything is stateless, so each function is unit-testable by hand. Sampling the replies and
scoring them is :mod:`lmforge.training.rollouts`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.training.config import KLKind


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` where ``mask`` is 1 (0 when nothing is selected, never NaN)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance of ``x`` over mask == 1."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean  # keep the sign information of e.g. advantages that are all positive
    return out * mask.to(x.dtype)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over [B, T] per-token rewards and values.

    Each row's masked span is one episode: the value after its last real step is 0 (terminal),
    so rows of different lengths can share a padded tensor. Returns (advantages, returns) with
    ``returns = advantages + values`` on the mask and 0 elsewhere.
    """
    m = mask.to(rewards.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    running = rewards.new_zeros(B)
    for t in reversed(range(T)):
        # Beyond the episode (next step masked out) there is nothing to bootstrap from.
        next_m = m[:, t + 1] if t + 1 < T else rewards.new_zeros(B)
        next_v = values[:, t + 1] * next_m if t + 1 < T else rewards.new_zeros(B)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = delta + gamma * lam * next_m * running
        adv[:, t] = running
    adv = adv * m
    return adv, (adv + values) * m


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy (Schulman's k1/k2/k3).

    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2 (biased, low
    variance); k3 = exp(log q - log p) - (log q - log p) - 1 (unbiased and always >= 0).
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        # Clamped so one extreme token cannot overflow exp() into inf and poison the batch.
        log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kl kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate (to minimise), the fraction of tokens where the clip binds, approx KL.

    loss = mean(max(-A * r, -A * clip(r, 1 - clip, 1 + clip))) with r = exp(logp - old_logp).
    The clip "binds" where the clipped term is the larger one (its gradient is then zero).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)  # k3 of old || new, >= 0
    return loss, clip_fraction, approx_kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """Clipped value loss 0.5 * mean(max((v - R)^2, (v_clipped - R)^2)), v_clipped within clip of old."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    losses = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages: (r - group mean) / (group std + eps); groups are consecutive rows.

    The std is the unbiased (n - 1) sample std, as in DeepSeekMath's GRPO and TRL.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"grpo_advantages needs group_size >= 2 dividing the batch ({rewards.numel()}), got {group_size}"
        )
    groups = rewards.reshape(-1, group_size)
    adv = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + eps)
    return adv.reshape(rewards.shape)


def dpo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO loss on summed sequence log-probs [B]; returns (loss, reward accuracy, reward margin).

    Implicit rewards are beta * (log pi - log pi_ref); loss = -log sigmoid(r_chosen - r_rejected).
    """
    chosen_reward = beta * (policy_chosen_logp - ref_chosen_logp)
    rejected_reward = beta * (policy_rejected_logp - ref_rejected_logp)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        accuracy = (margin > 0).to(margin.dtype).mean()
    return loss, accuracy, margin.detach().mean()


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """[B, T - 1] log-prob of each realised next token, from logits [B, T, V] (computed in fp32)."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].long()
    # gather - logsumexp avoids materialising a second [B, T, V] log_softmax tensor.
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax distribution at every position: [..., V] -> [...] (fp32)."""
    logits = logits.float()
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def model_attention_mask(attention_mask: Tensor | None) -> Tensor | None:
    """The mask to hand the model, or None when it cannot change any real token's logits.

    Right padding (every row 1...1 0...0) is invisible to a causal model, so it takes the
    fused causal kernel; only left/inner padding needs the masked path.
    """
    if attention_mask is None:
        return None
    m = attention_mask.long()
    return None if bool((m[:, 1:] <= m[:, :-1]).all()) else attention_mask


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    response_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token log-probs [B, T - 1] of the realised next tokens under ``model`` (a GPT).

    With ``response_mask`` [B, T], entries whose target token is not part of the response are 0,
    so ``.sum(-1)`` is the response's log-likelihood. ``temperature`` scales the logits first
    (RL must score tokens under the distribution they were sampled from). The tensors are moved
    to the model's device, so rows built on the CPU (``stack_rollout`` without a device) work.
    """
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    logits = model(input_ids, attention_mask=model_attention_mask(attention_mask))
    logp = token_logprobs(logits / temperature if temperature != 1.0 else logits, input_ids)
    if response_mask is not None:
        logp = logp * response_mask[:, 1:].to(device=logp.device, dtype=logp.dtype)
    return logp
