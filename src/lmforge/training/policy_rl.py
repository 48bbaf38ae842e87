"""Online RLHF on the shared Lightning core: PPO or GRPO against a reward, with a KL leash.

One training step = one rollout batch: sample replies to ``rollout_batch_size`` prompts
(``group_size`` each) with the KV-cached sampler, score them, then run ``ppo_epochs`` clipped
policy updates on that batch. Optimisation is manual (several optimizer steps per batch), so
Lightning's ``global_step`` counts optimizer updates: ``TrainerConfig.max_steps`` (and
``OptimConfig.max_steps``) = rollouts * ppo_epochs. Devices, precision and checkpoints remain
the Trainer's job.

* PPO: per-token reward = -kl_coef * KL(policy || ref) plus the (normalised, clipped) score on
  the last reply token; GAE advantages from a learned value model; clipped value loss.
* GRPO: no value model; each reply's advantage is its score relative to its prompt's group,
  and the KL to the reference is a per-token penalty in the loss (k3 estimator).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict
from typing import Any

import pytorch_lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lmforge.generation.sampling_params import SamplingParams
from lmforge.heads import ScalarHeadModel
from lmforge.model import GPT
from lmforge.training import rl_losses as rl
from lmforge.training.config import OptimConfig, RLConfig
from lmforge.training.data import SeededBatches, content_digest
from lmforge.training.module import TrainModule
from lmforge.training.optim import build_optimizer
from lmforge.training.rollouts import RewardFn, rollout, stack_rollout

# We step the optimizer ppo_epochs times per rollout; checkpoints hold the post-update state, which is
# exactly what resume needs, so Lightning's note about pre-optimization state does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class RLDivergenceError(RuntimeError):
    """Training produced non-finite numbers; resume from the last good checkpoint with a lower lr."""


def _as_is(batch: Any) -> Any:
    return batch  # prompts stay python lists: the sampler wants ragged id lists, not tensors


class PromptDataModule(L.LightningDataModule):
    """Endless, seed-deterministic batches of `cfg.rollout_batch_size` prompt id lists (order from
    `cfg.seed`); resumes where the run left off."""

    def __init__(self, prompts: list[list[int]], cfg: RLConfig) -> None:
        super().__init__()
        if not prompts:
            raise ValueError("PromptDataModule needs at least one prompt")
        self.prompts, self.cfg = [list(p) for p in prompts], cfg
        self.batch_size, self.seed = cfg.rollout_batch_size, cfg.seed

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        start, rank, world = 0, 0, 1
        if trainer is not None:
            start = self.cfg.rollouts_done(trainer.global_step)
            rank, world = trainer.global_rank, trainer.world_size
        ds = SeededBatches(self.prompts, self.batch_size, self.seed, start=start, rank=rank, world=world)
        return DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=0)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "n_prompts": len(self.prompts)}

    def fingerprint(self) -> str:
        return content_digest(self.prompts, self.state_dict())


class PolicyRLModule(TrainModule):
    """PPO/GRPO policy optimisation; batches are lists of prompt id lists (`PromptDataModule`).

    ``value_init`` (PPO): a ScalarHeadModel to copy as the value model, typically the reward
    model; by default the value model is the policy's backbone with a fresh scalar head.
    """

    def __init__(
        self,
        policy: GPT,
        reward_fn: RewardFn,
        rl_cfg: RLConfig,
        optim: OptimConfig,
        *,
        end_id: int | None,
        stop_ids: tuple[int, ...] | None = None,
        pad_id: int = 0,
        value_init: ScalarHeadModel | None = None,
        compile_model: bool = False,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        extra = {
            "rl": asdict(rl_cfg),
            "end_id": end_id,
            "stop_ids": stop_ids,
            "pad_id": pad_id,
            **(hparams or {}),
        }
        super().__init__(policy, optim, compile_model=compile_model, hparams=extra)
        self.automatic_optimization = False  # several optimizer steps per rollout batch
        self.rl, self.end_id, self.pad_id = rl_cfg, end_id, pad_id
        # What ends a rollout (pass the tokenizer's `stop_ids(chat=True)`); by default <|end|> alone.
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else (() if end_id is None else (end_id,))
        self.ref_model = copy.deepcopy(policy).requires_grad_(False)
        self.value_model: ScalarHeadModel | None = None
        if rl_cfg.algorithm == "ppo":
            src = value_init if value_init is not None else ScalarHeadModel(policy)
            # A deep copy: the value model must never share (and drag) the policy's or RM's weights.
            self.value_model = copy.deepcopy(src).requires_grad_(True)
        self.reward_fn = reward_fn  # registered as a submodule when it is one (moves with the Trainer)
        self.stop_reason: str | None = None
        self._stats = [0.0, 0.0, 0.0]  # running reward count, mean, M2 (Chan et al. merge)

    def configure_optimizers(self) -> Any:
        trainable = nn.ModuleList([self.model] + ([self.value_model] if self.value_model else []))
        opt, sched = build_optimizer(trainable, self.optim)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rl_reward_stats"] = list(self._stats)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._stats = list(checkpoint.get("rl_reward_stats", self._stats))

    # ---- rollout ------------------------------------------------------------------
    def _normalize(self, scores: Tensor) -> Tensor:
        if self.rl.normalize_rewards and self.rl.algorithm == "ppo":
            n, mean, m2 = self._stats
            b = scores.numel()
            b_mean, b_m2 = float(scores.mean()), float(((scores - scores.mean()) ** 2).sum())
            tot = n + b
            delta = b_mean - mean
            self._stats = [tot, mean + delta * b / tot, m2 + b_m2 + delta**2 * n * b / tot]
            std = math.sqrt(self._stats[2] / tot)
            scores = (scores - self._stats[1]) / (std + 1e-8)
        if self.rl.reward_clip is not None:
            scores = scores.clamp(-self.rl.reward_clip, self.rl.reward_clip)
        return scores

    def _agreed(self, decision: bool) -> bool:
        """``decision`` made by any rank, on every rank. A stop or a raise decided on one rank alone
        would leave the others waiting forever in the next all-reduce, so every rank reaches each
        such decision together (one small all-reduce; a single process decides alone)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.world_size == 1:
            return decision
        return bool(trainer.strategy.reduce_boolean_decision(decision, all=False))

    def _check_finite(self, x: Tensor, what: str) -> None:
        local = not bool(torch.isfinite(x).all())
        if self._agreed(local):
            trainer = getattr(self, "_trainer", None)
            where = ""
            if trainer is not None and trainer.world_size > 1:
                where = f" (rank {trainer.global_rank}: {'here' if local else 'on another rank'})"
            raise RLDivergenceError(
                f"RL step {self.global_step}: {what} contains NaN/inf{where}. Training has diverged or the reward "
                "is broken; resume from the last good checkpoint with a lower lr / kl_coef, or fix the reward."
            )

    @torch.no_grad()
    def make_experience(self, prompts: list[list[int]]) -> dict[str, Any]:
        """Sample and score one rollout batch: ids, masks, old/ref log-probs, advantages."""
        cfg, limit = self.rl, self.model.config.block_size
        if any(len(p) >= limit for p in prompts):
            raise ValueError(
                f"every prompt must be shorter than block_size {limit} to leave room for a reply"
            )
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            stop_token_ids=self.stop_ids,
            # One seed per rollout index: a resumed run samples exactly what it would have.
            seed=cfg.seed * 1_000_003 + cfg.rollouts_done(self.global_step),
        )
        replies = rollout(self.model, prompts, params, self.pad_id)
        ids, _, response = stack_rollout(prompts, replies, self.pad_id, self.device)
        # Action mask over log-prob positions: entry t scores token t + 1, a reply token.
        mask = response[:, 1:].float()
        last = torch.tensor([len(p) + len(r) - 2 for p, r in zip(prompts, replies)], device=self.device)

        # Right padding needs no attention mask: a causal model never lets real tokens see it.
        logits = self.model(ids) / cfg.temperature
        self._check_finite(logits, "policy logits")
        old_logp = rl.token_logprobs(logits, ids)
        ref_logp = rl.token_logprobs(self.ref_model(ids) / cfg.temperature, ids)
        raw = torch.as_tensor(self.reward_fn(prompts, replies), dtype=torch.float32).to(self.device)
        self._check_finite(raw, "the reward function's scores")
        ended = torch.tensor([bool(r) and r[-1] == self.end_id for r in replies], device=self.device)
        if cfg.missing_eos_penalty and self.end_id is not None:
            raw = raw - cfg.missing_eos_penalty * (~ended).float()
        scores = self._normalize(raw)
        kl = rl.kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * mask
        exp: dict[str, Any] = {"ids": ids, "mask": mask, "old_logp": old_logp, "ref_logp": ref_logp}
        if self.value_model is not None:
            values = self.value_model.values(ids)[:, :-1] * mask
            token_rewards = -cfg.kl_coef * kl
            token_rewards[torch.arange(len(prompts), device=self.device), last] += scores
            adv, exp["returns"] = rl.gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
            exp["values"] = values
        else:
            adv = rl.grpo_advantages(scores, cfg.group_size)[:, None] * mask
        if cfg.whiten_advantages and self.value_model is not None:  # GRPO's are already group-normalised
            adv = rl.masked_whiten(adv, mask)
        exp["advantages"] = adv
        exp["metrics"] = {
            "rl/reward_mean": raw.mean(),
            "rl/end_of_turn_rate": ended.float().mean(),
            "rl/kl": rl.masked_mean(kl, mask),
            "rl/entropy": rl.masked_mean(rl.entropy_from_logits(logits[:, :-1]), mask),
            "rl/response_length": mask.sum(1).mean(),
        }
        return exp

    # ---- update -------------------------------------------------------------------
    def training_step(self, batch: list[list[int]], batch_idx: int) -> Tensor:
        cfg = self.rl
        # Sampling, old log-probs and updates must see one deterministic network (dropout would
        # make the PPO ratio != 1 before any update), so every submodule runs in eval mode.
        for child in self.children():
            child.eval()
        prompts = [list(p) for p in batch for _ in range(cfg.samples_per_prompt)]  # groups are consecutive
        exp = self.make_experience(prompts)
        n, mask, metrics = len(prompts), exp["mask"], exp["metrics"]
        kl = float(metrics["rl/kl"])
        if cfg.kl_max is not None and self._agreed(kl > cfg.kl_max):  # every rank stops together
            # Further updates would only move the policy further from the reference: stop here,
            # keeping the last checkpoint's (in-bound) policy as the result.
            self.stop_reason = f"mean KL {kl:.4g} exceeded kl_max {cfg.kl_max:g}"
            self.trainer.should_stop = True
            self.log_dict(metrics, batch_size=n)
            return torch.zeros((), device=self.device)

        opt, sched = self.optimizers(), self.lr_schedulers()
        sums: dict[str, float] = {"rl/clip_fraction": 0.0, "rl/approx_kl": 0.0, "train/loss": 0.0}
        if self.value_model is not None:
            sums["rl/value_loss"] = 0.0
        for _ in range(cfg.ppo_epochs):
            logits = self.model(exp["ids"]) / cfg.temperature
            self._check_finite(logits, "policy logits")
            logp = rl.token_logprobs(logits, exp["ids"])
            loss, clip_frac, approx_kl = rl.ppo_policy_loss(
                logp, exp["old_logp"], exp["advantages"], mask, cfg.clip_ratio
            )
            if self.value_model is not None:
                v = self.value_model.values(exp["ids"])[:, :-1]
                vloss = rl.value_loss(v, exp["values"], exp["returns"], mask, cfg.value_clip)
                loss = loss + cfg.vf_coef * vloss
                sums["rl/value_loss"] += float(vloss.detach()) / cfg.ppo_epochs
            else:
                # GRPO's KL leash lives in the loss; k3 is >= 0 with a gradient that pulls toward ref.
                loss = loss + cfg.kl_coef * rl.masked_mean(rl.kl_estimate(logp, exp["ref_logp"], "k3"), mask)
            self._check_finite(loss, "the loss")
            opt.zero_grad()
            self.manual_backward(loss)
            if self.optim.grad_clip > 0:
                self.clip_gradients(
                    opt, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm"
                )
            opt.step()
            sched.step()
            for k, val in (
                ("rl/clip_fraction", clip_frac),
                ("rl/approx_kl", approx_kl),
                ("train/loss", loss),
            ):
                sums[k] += float(val.detach()) / cfg.ppo_epochs
        self.log_dict({**metrics, **sums}, batch_size=n)
        self.log("lr", opt.param_groups[0]["lr"], batch_size=n)
        return torch.tensor(sums["train/loss"])
