"""Tests for the RLHF core: the pure RL math (lmforge.training.rl_losses), rollouts (rollouts), PPO/GRPO (policy_rl) and DPO (dpo)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import cpu_trainer_config, tiny_gpt
from lmforge.generation.sampling_params import SamplingParams
from lmforge.heads import ScalarHeadModel
from lmforge.model import GPT
from lmforge.training import OptimConfig, TrainerConfig, fit
from lmforge.training.chat_data import PreferenceDataModule, collate_pairs
from lmforge.training.dpo import DPOModule, default_response_mask
from lmforge.training.policy_rl import (
    PolicyRLModule,
    PromptDataModule,
    RLConfig,
    RLDivergenceError,
)
from lmforge.training.rl_losses import (
    dpo_loss,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    sequence_logprobs,
    token_logprobs,
    value_loss,
)
from lmforge.training.rollouts import RewardModelFn, evaluate_policy

VOCAB, BLOCK, PAD, END, TARGET = 16, 24, 0, 1, 5


# Policies and reward models here are `conftest.tiny_gpt` with one layer and two (query and kv) heads.
SHAPE = {"vocab_size": VOCAB, "block_size": BLOCK, "n_layer": 1, "n_head": 2, "n_kv_head": 2}


def prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, VOCAB, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def count_target(prompt_ids: list[list[int]], replies: list[list[int]]) -> torch.Tensor:
    """Toy reward: how often TARGET appears in the reply."""
    return torch.tensor([float(r.count(TARGET)) for r in replies])


def trainer_cfg(steps: int) -> TrainerConfig:
    return cpu_trainer_config(steps, val_every_steps=0, checkpoint_every_steps=0, seed=0)


def optim_cfg(steps: int, lr: float = 1e-2) -> OptimConfig:
    return OptimConfig(lr=lr, warmup_steps=0, max_steps=steps, weight_decay=0.0, min_lr_ratio=1.0)


# ---------------------------------------------------------------------------- pure functions


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # empty mask: 0, not NaN
    w = masked_whiten(x, m)
    assert w[0, 3] == 0 and masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(w**2, m).item() == pytest.approx(1.0, abs=1e-4)


def test_gae_hand_computed_three_steps():
    gamma, lam = 0.9, 0.8
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    d2 = 2.0 - 1.5  # terminal: no bootstrap
    d1 = 0.0 + gamma * 1.5 - 1.0
    d0 = 1.0 + gamma * 1.0 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(r, v, torch.ones(1, 3), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, adv + v)
    # Padding after the episode changes nothing; padded entries are 0.
    adv_p, ret_p = gae(
        torch.tensor([[1.0, 0.0, 2.0, 9.0]]),
        torch.tensor([[0.5, 1.0, 1.5, 9.0]]),
        torch.tensor([[1, 1, 1, 0]]),
        gamma,
        lam,
    )
    torch.testing.assert_close(adv_p[:, :3], adv)
    assert adv_p[0, 3] == 0 and ret_p[0, 3] == 0


def test_kl_estimates_hand_values():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    lr = ref - logp
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.exp(lr) - lr - 1)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert kl_estimate(logp, ref, "k3")[2] == 0  # identical distributions
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref, "k9")  # type: ignore[arg-type]


def test_ppo_clip_behaviour_hand_values():
    eps = 0.2
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.0]]))  # ratios 1.5, 1.5, 0.5, 1.0
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    mask = torch.ones(1, 4)
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, old, adv, mask, eps)
    # r=1.5,A=+1 -> clipped at 1.2: -1.2 | r=1.5,A=-1 -> unclipped 1.5 (pessimistic) |
    # r=0.5,A=-1 -> clipped at 0.8: 0.8 | r=1,A=2 -> -2
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 2.0) / 4)
    assert clip_frac.item() == pytest.approx(0.5)  # tokens 0 and 2
    assert approx_kl.item() > 0
    # Gradient: zero where the clip binds, flows elsewhere.
    lp = logp.clone().requires_grad_(True)
    ppo_policy_loss(lp, old, adv, mask, eps)[0].backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 2] == 0
    assert lp.grad[0, 1] != 0 and lp.grad[0, 3] != 0


def test_value_loss_clipping():
    old, ret, mask = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    v = torch.tensor([[0.5, 2.0]])
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: max((2-1)^2, (0.2-1)^2) = 1.0
    assert value_loss(v, old, ret, mask, 0.2).item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)


def test_grpo_advantages_hand_computed():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    adv = grpo_advantages(r, group_size=3, eps=0.0)
    s = math.sqrt(((1 - 2) ** 2 + (3 - 2) ** 2 + 0) / 2)  # unbiased std of (1, 3, 2)
    s2 = math.sqrt(((2 - 2) ** 2 + (0 - 2) ** 2 + (4 - 2) ** 2) / 2)
    torch.testing.assert_close(adv, torch.tensor([-1 / s, 1 / s, 0.0, 0.0, -2 / s2, 2 / s2]))
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(r, group_size=4)


def test_dpo_loss_hand_values_and_gradient():
    z = torch.zeros(3)
    loss, acc, margin = dpo_loss(z, z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert acc.item() == 0.0 and margin.item() == 0.0
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, acc, margin = dpo_loss(pc, pr, torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.5)
    m = 0.5 * (0.5 - (-0.5))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-m)))
    assert acc.item() == 1.0 and margin.item() == pytest.approx(m)
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected


def test_sequence_logprobs_and_entropy():
    model = tiny_gpt(**SHAPE).eval()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, PAD, PAD]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    resp = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    lp = sequence_logprobs(model, ids, attn, resp)
    assert lp.shape == (2, 3)
    full = model(ids).log_softmax(-1)
    assert lp[0, 1].item() == pytest.approx(full[0, 1, 5].item(), abs=1e-5)
    assert lp[0, 0] == 0 and lp[1, 1] == 0 and lp[1, 0] != 0
    torch.testing.assert_close(token_logprobs(model(ids), ids)[0, 2], full[0, 2, 6])
    ent = entropy_from_logits(torch.zeros(2, VOCAB))
    torch.testing.assert_close(ent, torch.full((2,), math.log(VOCAB)))


# ---------------------------------------------------------------------------- online RL


def rl_module(algorithm: str, steps: int, reward_fn=count_target, **kw) -> tuple[PolicyRLModule, RLConfig]:
    base = dict(
        algorithm=algorithm,
        rollout_batch_size=8 if algorithm == "grpo" else 16,  # 32 / 16 replies per rollout batch
        group_size=4,
        max_new_tokens=8,
        kl_coef=0.01,
        ppo_epochs=2,
        reward_clip=10.0,
        missing_eos_penalty=0.0,  # the toy reward does not ask the policy to end its turn
        seed=0,
    )
    cfg = RLConfig(**{**base, **kw})
    module = PolicyRLModule(
        tiny_gpt(**SHAPE), reward_fn, cfg, optim_cfg(steps * cfg.ppo_epochs), end_id=END, pad_id=PAD
    )
    return module, cfg


def eval_reward(model: GPT, ps: list[list[int]]) -> float:
    params = SamplingParams(max_new_tokens=8, temperature=1.0, stop_token_ids=(END,), seed=123)
    return evaluate_policy(model, ps * 4, count_target, params, pad_id=PAD)["mean_reward"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_rl_raises_toy_reward(algorithm, tmp_path):
    steps, ps = 8, prompts()
    module, cfg = rl_module(algorithm, steps)
    before = eval_reward(module.model, ps)
    trainer = fit(
        module,
        PromptDataModule(ps, cfg),
        trainer_cfg(steps * cfg.ppo_epochs),
        resume=False,
        default_root_dir=tmp_path,
    )
    after = eval_reward(module.model, ps)
    assert trainer.global_step == steps * cfg.ppo_epochs and module.stop_reason is None
    assert after > before + 1.0, (before, after)  # ~0.3 -> 3+ in practice
    logged = trainer.callback_metrics
    for key in ("rl/reward_mean", "rl/kl", "rl/entropy", "rl/clip_fraction", "rl/response_length"):
        assert torch.isfinite(logged[key]), key
    assert ("rl/value_loss" in logged) == (algorithm == "ppo")
    # The reference model stays frozen at the initial policy.
    assert all(not p.requires_grad for p in module.ref_model.parameters())
    assert not torch.equal(module.ref_model.lm_head.weight, module.model.lm_head.weight)


def test_ppo_resume_matches_uninterrupted_run(tmp_path):
    """Reward-model reward + value model from the RM; 2 + 2 resumed rollouts == 4 in one go."""
    torch.manual_seed(1)
    rm = ScalarHeadModel(tiny_gpt(seed=1, **SHAPE))

    def run(root, stops: list[int]) -> PolicyRLModule:
        for n in stops:
            cfg = RLConfig(algorithm="ppo", rollout_batch_size=4, max_new_tokens=4, ppo_epochs=2, seed=3)
            module = PolicyRLModule(
                tiny_gpt(**SHAPE),
                RewardModelFn(rm, END, PAD),
                cfg,
                optim_cfg(8),
                end_id=END,
                pad_id=PAD,
                value_init=rm,
            )
            fit(
                module,
                PromptDataModule(prompts(), cfg),
                trainer_cfg(n * 2),
                resume=True,
                default_root_dir=root,
            )
        return module

    a, b = run(tmp_path / "a", [4]), run(tmp_path / "b", [2, 4])
    assert b.trainer.global_step == 8
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)
    assert a._stats == b._stats
    # The value model started from the RM but trained; the RM inside the reward fn stayed put.
    assert not torch.equal(a.value_model.head.weight, rm.head.weight)
    torch.testing.assert_close(a.reward_fn.rm.head.weight, rm.head.weight)


def test_kl_bound_stops_training(tmp_path):
    steps = 10
    module, cfg = rl_module("ppo", steps, kl_max=1e-6, kl_estimator="k3")
    trainer = fit(
        module,
        PromptDataModule(prompts(), cfg),
        trainer_cfg(steps * cfg.ppo_epochs),
        resume=False,
        default_root_dir=tmp_path,
    )
    # Rollout 1 is on the reference policy itself (KL 0); the first update pushes it past the bound.
    assert module.stop_reason is not None and "kl_max" in module.stop_reason
    assert trainer.global_step == cfg.ppo_epochs


def test_nan_reward_raises_divergence_error(tmp_path):
    def nan_reward(p, r):
        return torch.full((len(r),), float("nan"))

    module, cfg = rl_module("grpo", 2, reward_fn=nan_reward)
    with pytest.raises(RLDivergenceError, match="reward function's scores contains NaN"):
        fit(
            module,
            PromptDataModule(prompts(), cfg),
            trainer_cfg(4),
            resume=False,
            default_root_dir=tmp_path,
        )


def test_prompt_datamodule_is_deterministic_and_cycles():
    ps = [[i + 2] for i in range(5)]
    dm = PromptDataModule(ps, RLConfig(rollout_batch_size=3, seed=7))
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(4)]
    assert all(isinstance(b, list) and len(b) == 3 and isinstance(b[0], list) for b in batches)
    flat = [p[0] for b in batches for p in b]
    assert sorted(flat[:5]) == [2, 3, 4, 5, 6] and sorted(flat[5:10]) == [2, 3, 4, 5, 6]
    it2 = iter(PromptDataModule(ps, RLConfig(rollout_batch_size=3, seed=7)).train_dataloader())
    assert [next(it2) for _ in range(4)] == batches


def test_reward_model_fn_appends_end_token():
    torch.manual_seed(0)
    rm = ScalarHeadModel(tiny_gpt(seed=1, **SHAPE)).eval()
    fn = RewardModelFn(rm, end_id=END, pad_id=PAD)
    scores = fn([[3, 4], [5]], [[6], [7, 8, END]])
    expect = torch.stack([rm(torch.tensor([[3, 4, 6, END]]))[0], rm(torch.tensor([[5, 7, 8, END]]))[0]])
    torch.testing.assert_close(scores, expect)


# ---------------------------------------------------------------------------- DPO


def test_dpo_module_learns_preferences(tmp_path):
    # chosen replies end in TARGET, rejected in 6; the prompt is shared within each pair.
    examples = [(p + [TARGET, END], p + [6, END]) for p in prompts(8)]
    batch = collate_pairs(examples, PAD)
    masks = [[0] * len(p) + [1, 1] for p in prompts(8)]
    width = batch["input_ids"].shape[1]
    batch["response_mask"] = torch.tensor([m + [0] * (width - len(m)) for m in masks * 2])
    assert batch["input_ids"].shape[0] == 16
    module = DPOModule(tiny_gpt(**SHAPE), optim_cfg(30, lr=3e-3), beta=0.5)
    loss0, m0 = module.compute_loss(batch)
    assert loss0.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert set(m0) == {"accuracy", "margin", "chosen_reward", "rejected_reward"}
    fit(
        module,
        PreferenceDataModule(examples, examples, batch_size=4, pad_id=PAD),
        trainer_cfg(30),
        resume=False,
        default_root_dir=tmp_path,
    )
    loss1, m1 = module.compute_loss(batch)
    assert loss1.item() < 0.5 * math.log(2) and m1["accuracy"].item() == 1.0
    # Without response_mask every real token after the first counts; the shared prompt cancels.
    no_mask = {k: v for k, v in batch.items() if k != "response_mask"}
    torch.testing.assert_close(module.compute_loss(no_mask)[0], loss1, atol=1e-4, rtol=1e-4)
    assert default_response_mask(torch.tensor([[1, 1, 1, 0]])).tolist() == [[0, 1, 1, 0]]


def test_missing_eos_penalty_lowers_the_score_of_cut_off_replies():
    def zero(p, r):
        return torch.zeros(len(r))

    module, _ = rl_module("grpo", 1, reward_fn=zero, missing_eos_penalty=1.5, normalize_rewards=False)
    exp = module.make_experience(prompts(8))
    ended = float(exp["metrics"]["rl/end_of_turn_rate"])
    # Zero reward for every reply, minus 1.5 for each reply that did not end with the end-of-turn token.
    assert float(exp["metrics"]["rl/reward_mean"]) == pytest.approx(-1.5 * (1 - ended))
    assert ended < 1.0  # a random tiny policy rarely stops within 8 tokens, so the penalty is exercised


def test_rl_trains_under_bf16_mixed_precision(tmp_path):
    """What `precision: auto` is on CUDA: the rollouts inside the training step run under autocast,
    and their bf16 k/v went into the fp32 generation cache ("Index put requires the source and
    destination dtypes match"), so RLHF on a GPU failed at its first rollout (found by gpu_smoke)."""
    from dataclasses import replace

    module, cfg = rl_module("grpo", 2)
    tcfg = replace(trainer_cfg(2 * cfg.ppo_epochs), precision="bf16-mixed")
    trainer = fit(module, PromptDataModule(prompts(), cfg), tcfg, resume=False, default_root_dir=tmp_path)
    assert trainer.global_step == 2 * cfg.ppo_epochs
    assert torch.isfinite(trainer.callback_metrics["rl/reward_mean"])
