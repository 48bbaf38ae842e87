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
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pytorch_lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lmforge.heads import ScalarHeadModel
from lmforge.model import GPT
from lmforge.sampling import SamplingParams
from lmforge.training import rl
from lmforge.training.config import OptimConfig
from lmforge.training.data import SeededBatches, consumed_batches, content_digest
from lmforge.training.module import TrainModule
from lmforge.training.optim import build_optimizer

# The reward adapter and evaluation helper live with the rollout code in `rl`; re-exported here.
from lmforge.training.rl import RewardFn, rollout

# We step the optimizer ppo_epochs times per rollout; checkpoints hold the post-update state, which is
# exactly what resume needs, so Lightning's note about pre-optimization state does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class RLDivergenceError(RuntimeError):
    """Training produced non-finite numbers; resume from the last good checkpoint with a lower lr."""


@dataclass
class RLConfig:
    """Rollout, reward shaping and PPO/GRPO update hyperparameters (see the module docstring)."""

    algorithm: Literal["ppo", "grpo"] = "ppo"
    rollout_batch_size: int = 8  # prompts per step
    group_size: int = 1  # samples per prompt (GRPO needs >= 2)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    kl_coef: float = 0.05
    kl_estimator: rl.KLKind = "k1"  # PPO reward shaping and the reported rl/kl
    kl_target_max: float | None = None  # stop training once the mean per-token KL exceeds this
    ppo_epochs: int = 4
    clip_ratio: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    normalize_rewards: bool = True  # PPO: running mean/std of scores (GRPO is group-normalised)
    reward_clip: float | None = 10.0
    # Subtracted from the score of a reply that hit max_new_tokens without the end-of-turn token:
    # without it a reward model that likes longer text teaches the policy never to stop.
    missing_eos_penalty: float = 0.0
    whiten_advantages: bool = True  # PPO only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ("ppo", "grpo") or self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError("RLConfig.algorithm must be ppo|grpo and kl_estimator k1|k2|k3")
        for name in ("rollout_batch_size", "group_size", "max_new_tokens", "ppo_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ValueError("RLConfig.group_size must be >= 2 for GRPO (advantages are group-relative)")
        if not self.temperature > 0:
            raise ValueError("RLConfig.temperature must be > 0: RL needs sampled, not greedy, rollouts")
        if self.kl_coef < 0 or not 0 < self.clip_ratio < 1 or self.value_clip <= 0:
            raise ValueError("RLConfig needs kl_coef >= 0, 0 < clip_ratio < 1 and value_clip > 0")


def _as_is(batch: Any) -> Any:
    return batch  # prompts stay python lists: the sampler wants ragged id lists, not tensors


class PromptDataModule(L.LightningDataModule):
    """Endless, seed-deterministic batches of prompt id lists; resumes where the run left off."""

    def __init__(self, prompts: list[list[int]], batch_size: int, seed: int = 0) -> None:
        super().__init__()
        if not prompts or batch_size < 1:
            raise ValueError("PromptDataModule needs at least one prompt and batch_size >= 1")
        self.prompts, self.batch_size, self.seed = [list(p) for p in prompts], batch_size, seed

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        start, rank, world = 0, 0, 1
        if trainer is not None:
            # Resume: each batch took `optimizer_steps_per_batch` optimizer steps (PPO epochs).
            per_batch = getattr(trainer.lightning_module, "optimizer_steps_per_batch", 1)
            start = consumed_batches(trainer, per_optimizer_step=per_batch)
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
        pad_id: int = 0,
        value_init: ScalarHeadModel | None = None,
        compile_model: bool = False,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        extra = {"rl": asdict(rl_cfg), "end_id": end_id, "pad_id": pad_id, **(hparams or {})}
        super().__init__(policy, optim, compile_model=compile_model, hparams=extra)
        self.automatic_optimization = False  # several optimizer steps per rollout batch
        self.rl, self.end_id, self.pad_id = rl_cfg, end_id, pad_id
        self.ref_model = copy.deepcopy(policy).requires_grad_(False)
        self.value_model: ScalarHeadModel | None = None
        if rl_cfg.algorithm == "ppo":
            src = value_init if value_init is not None else ScalarHeadModel(policy)
            # A deep copy: the value model must never share (and drag) the policy's or RM's weights.
            self.value_model = copy.deepcopy(src).requires_grad_(True)
        self.reward_fn = reward_fn  # registered as a submodule when it is one (moves with the Trainer)
        self.stop_reason: str | None = None
        self._stats = [0.0, 0.0, 0.0]  # running reward count, mean, M2 (Chan et al. merge)

    @property
    def optimizer_steps_per_batch(self) -> int:
        return self.rl.ppo_epochs

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

    def _check_finite(self, x: Tensor, what: str) -> None:
        if not bool(torch.isfinite(x).all()):
            raise RLDivergenceError(
                f"RL step {self.global_step}: {what} contains NaN/inf. Training has diverged or the reward "
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
            stop_token_ids=() if self.end_id is None else (self.end_id,),
            # One seed per rollout index: a resumed run samples exactly what it would have.
            seed=cfg.seed * 1_000_003 + self.global_step // self.optimizer_steps_per_batch,
        )
        replies = rollout(self.model, prompts, params, self.pad_id)
        ids, _, response = rl.stack_rollout(prompts, replies, self.pad_id, self.device)
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
        prompts = [list(p) for p in batch for _ in range(cfg.group_size)]  # groups are consecutive
        exp = self.make_experience(prompts)
        n, mask, metrics = len(prompts), exp["mask"], exp["metrics"]
        kl = float(metrics["rl/kl"])
        if cfg.kl_target_max is not None and kl > cfg.kl_target_max:
            # Further updates would only move the policy further from the reference: stop here,
            # keeping the last checkpoint's (in-bound) policy as the result.
            self.stop_reason = f"mean KL {kl:.4g} exceeded kl_target_max {cfg.kl_target_max:g}"
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
