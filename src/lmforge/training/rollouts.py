"""RL rollouts: the policy's sampled replies (from the generation engine), stacked into training
rows, scored by a frozen reward model; and the held-out reward of a policy.

Shared by RLHF training (:mod:`lmforge.training.policy_rl`), its stage and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lmforge.generation.driver import generate
from lmforge.generation.sampling_params import SamplingParams
from lmforge.heads import ScalarHeadModel
from lmforge.model import GPT
from lmforge.padding import attention_mask, pad

# (prompt ids, reply ids) -> one score per reply [N]. Replies that stopped keep their stop token.
RewardFn = Callable[[list[list[int]], list[list[int]]], Tensor]


def right_pad(
    seqs: list[list[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Right-padded ``ids`` and their 1/0 ``attention_mask`` [N, T] on ``device``."""
    return pad(seqs, pad_id, device=device), attention_mask(seqs, device=device)


def stack_rollout(
    prompts: list[list[int]], replies: list[list[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """prompt + reply rows, right-padded: ``ids``, ``attention_mask`` and ``response_mask`` [N, T]
    (1 on each reply's tokens)."""
    ids, attention = right_pad([p + r for p, r in zip(prompts, replies)], pad_id, device)
    response = torch.zeros_like(attention)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        response[i, len(p) : len(p) + len(r)] = 1
    return ids, attention, response


def rollout(model: GPT, prompts: list[list[int]], params: SamplingParams, pad_id: int) -> list[list[int]]:
    """Sampled replies from the generation engine (on the model's device); a reply that ended on a
    stop token keeps it (the policy chose to stop). Row ``i`` draws from stream ``i`` of the seed,
    so the samples of one prompt's group differ."""
    return [g.ids_with_stop for g in generate(model, prompts, params, pad_id=pad_id)]


class RewardModelFn(nn.Module):
    """A frozen reward model as a `RewardFn`: scores prompt + reply (+ end-of-turn if missing).

    An nn.Module so that, stored on the LightningModule, the Trainer moves it to the device.
    The reward model is frozen in place (requires_grad off).
    """

    def __init__(self, rm: ScalarHeadModel, end_id: int, pad_id: int) -> None:
        super().__init__()
        self.rm, self.end_id, self.pad_id = rm.requires_grad_(False), end_id, pad_id

    @torch.no_grad()
    def forward(self, prompts: list[list[int]], responses: list[list[int]]) -> Tensor:
        self.rm.eval()  # dropout must never perturb the scores
        limit = self.rm.config.block_size
        seqs = []
        for p, r in zip(prompts, responses, strict=True):
            s = list(p) + list(r) + ([] if r and r[-1] == self.end_id else [self.end_id])
            seqs.append(s[-limit:])  # keep the end: the score is read at the last token
        ids, mask = right_pad(seqs, self.pad_id, next(self.rm.parameters()).device)
        return self.rm(ids, mask).float()


@torch.no_grad()
def evaluate_policy(
    model: GPT,
    prompts: list[list[int]],
    reward_fn: RewardFn,
    sampling: SamplingParams,
    *,
    pad_id: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Mean reward and reply length on held-out prompts (pass a greedy or seeded ``sampling``)."""
    rewards: list[float] = []
    lengths: list[int] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        replies = rollout(model, chunk, sampling, pad_id)
        rewards += torch.as_tensor(reward_fn(chunk, replies)).float().cpu().tolist()
        lengths += [len(r) for r in replies]
    return {"mean_reward": sum(rewards) / len(rewards), "mean_length": sum(lengths) / len(lengths)}
