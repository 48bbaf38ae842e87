"""Stage `rlhf`: tune the SFT policy against the frozen reward model (PPO, GRPO) or on the pairs (DPO).

`rlhf.max_steps` counts rollout batches for PPO/GRPO (each makes `ppo_epochs` optimizer
steps) and optimizer steps for DPO. Held-out evaluation: the reward model's mean score of
greedy replies to held-out prompts, SFT policy vs tuned policy, and the KL of the tuned
policy to the SFT reference on its own sampled replies.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lmforge.generation.sampling_params import SamplingParams
from lmforge.model import GPT
from lmforge.model_folder import load_gpt, load_reward_model, save_model_dir
from lmforge.params import Params, RLHFParams
from lmforge.stages import StageError, begin, runs_dir
from lmforge.stages.dialogues import conversations, pairs
from lmforge.stages.fitting import fields_of, fit_stage, for_evaluation, optim_config, trainer_config
from lmforge.tokenizer import ChatTokenizer
from lmforge.training import PreferenceDataModule, encode_pairs
from lmforge.training.config import RLConfig
from lmforge.training.dpo import DPOModule
from lmforge.training.policy_rl import PolicyRLModule, PromptDataModule, RLDivergenceError
from lmforge.training.rl_losses import sequence_logprobs
from lmforge.training.rollouts import RewardModelFn, evaluate_policy, rollout, stack_rollout
from lmforge.training.trainer import training_device
from lmforge.training.verifiable import VerifierReward, is_task, question_turn


def task_prompts(root: Path, params: Params, tok: ChatTokenizer, split: str, limit: int) -> list[list[int]]:
    """The verifiable task's questions of one split, rendered for the assistant to answer."""
    asks = [question_turn(d) for d in conversations(root, params, split) if is_task(d)]
    ids = (tok.render_chat(a, add_generation_prompt=True).ids for a in asks)
    return [i for i in ids if len(i) <= limit]


def rl_config(rp: RLHFParams, seed: int) -> RLConfig:
    """The core's RLConfig from the validated params, field by field (the stage seed as its seed)."""
    return RLConfig(**fields_of(rp, RLConfig), seed=seed)


@torch.no_grad()
def held_out_kl(
    policy: GPT, ref: GPT, prompts: list[list[int]], rp: RLHFParams, tok: ChatTokenizer, seed: int
) -> float:
    """Mean per-token KL(policy || ref) estimated on the policy's own sampled replies."""
    params = SamplingParams(
        max_new_tokens=rp.max_new_tokens, temperature=1.0, seed=seed, stop_token_ids=tok.stop_ids(chat=True)
    )
    replies = rollout(policy, prompts, params, tok.pad_id)
    ids, mask, response = stack_rollout(prompts, replies, tok.pad_id)
    lp = sequence_logprobs(policy, ids, mask, response)
    lr = sequence_logprobs(ref, ids, mask, response)
    counted = response[:, 1:].bool()
    return float(((lp - lr)[counted]).mean()) if counted.any() else 0.0


def run(params: Params, root: Path) -> dict:
    rp = params.rlhf
    seed = begin(params, "rlhf")  # a fresh PPO value head draws from the stage seed
    tok = ChatTokenizer.load(root / params.tokenizer.out_dir)
    tcfg, ocfg = trainer_config(params, "rlhf"), optim_config(rp)
    device = training_device(tcfg)  # evaluated before and after on the device that trains
    policy = for_evaluation(load_gpt(root / rp.init_from), device)
    reference = for_evaluation(load_gpt(root / rp.init_from), device)
    rm = for_evaluation(load_reward_model(root / rp.reward_from), device)
    block = policy.config.block_size
    limit = block - rp.max_new_tokens
    prompt_ids = {
        s: [
            ids
            for ids in (
                tok.render_chat(p["prompt"], add_generation_prompt=True).ids for p in pairs(root, params, s)
            )
            if len(ids) <= limit
        ]
        for s in ("train", "val")
    }
    task_ids = {s: task_prompts(root, params, tok, s, limit) for s in ("train", "val")}
    held_out = prompt_ids["val"][: rp.eval_prompts]
    if not prompt_ids["train"] or not held_out:
        raise StageError(f"rlhf: no prompt fits block_size {block} - max_new_tokens {rp.max_new_tokens}")
    if rp.reward != "model" and not task_ids["train"]:
        raise StageError(
            f"rlhf.reward={rp.reward} needs the verifiable task's dialogues among ingest.sft_sources"
        )
    score = RewardModelFn(rm, tok.end_id, tok.pad_id)
    verifier = VerifierReward(tok)
    greedy = SamplingParams(
        max_new_tokens=rp.max_new_tokens, temperature=0.0, stop_token_ids=tok.stop_ids(chat=True)
    )
    before = evaluate_policy(policy, held_out, score, greedy, pad_id=tok.pad_id)
    task_held_out = task_ids["val"][: rp.eval_prompts]
    task_before = (
        evaluate_policy(policy, task_held_out, verifier, greedy, pad_id=tok.pad_id) if task_held_out else None
    )
    # What scores the rollouts, and on which prompts (the task's half of a mix capped at the other half).
    rollout_prompts, rollout_reward = {
        "model": (prompt_ids["train"], score),
        "verifier": (task_ids["train"], verifier),
        "mix": (
            prompt_ids["train"] + task_ids["train"][: len(prompt_ids["train"])],
            VerifierReward(tok, score),
        ),
    }[rp.reward]

    if rp.algorithm == "dpo":
        train, _ = encode_pairs(tok, pairs(root, params, "train"), block)
        val, _ = encode_pairs(tok, pairs(root, params, "val"), block)
        module = DPOModule(
            policy.train(), ocfg, beta=rp.dpo_beta, ref_model=reference, compile_model=rp.compile
        )
        data = PreferenceDataModule(train, val, rp.batch_size, tok.pad_id, seed=seed)
        keys = ("train/loss", "val/loss", "val/accuracy", "val/margin")
    else:
        rl_cfg = rl_config(rp, seed)  # params count rollout batches; Lightning counts optimizer steps
        tcfg = replace(
            tcfg,
            max_steps=rl_cfg.optimizer_steps(rp.max_steps),
            val_every_steps=0,
            val_batches=0,
            checkpoint_every_steps=rl_cfg.optimizer_steps(rp.checkpoint_every_steps),
        )
        ocfg = replace(
            ocfg,
            max_steps=rl_cfg.optimizer_steps(rp.max_steps),
            warmup_steps=rl_cfg.optimizer_steps(rp.warmup_steps),
        )
        module = PolicyRLModule(
            policy.train(),
            rollout_reward,
            rl_cfg,
            ocfg,
            end_id=tok.end_id,
            stop_ids=tok.stop_ids(chat=True),
            pad_id=tok.pad_id,
            value_init=rm if rp.algorithm == "ppo" else None,
            compile_model=rp.compile,
        )
        data = PromptDataModule(rollout_prompts, rl_cfg)
        keys = (
            "train/loss",
            "rl/reward_mean",
            "rl/kl",
            "rl/entropy",
            "rl/clip_fraction",
            "rl/response_length",
        )
    run_name = f"rlhf-{rp.algorithm}"
    try:
        trainer, seconds = fit_stage(
            "rlhf", module, data, tcfg, root=root, resume=rp.resume, curve_keys=keys, run_name=run_name
        )
    except RLDivergenceError as err:
        last = runs_dir(root) / run_name / "checkpoints" / "last.ckpt"
        raise StageError(f"{err} (last good checkpoint: {last})") from None
    if trainer.global_rank != 0:
        return {}

    device = trainer.strategy.root_device  # the trainer's teardown left every module on the CPU
    tuned, reference, rm = (for_evaluation(m, device) for m in (module.model, reference, rm))
    after = evaluate_policy(tuned, held_out, score, greedy, pad_id=tok.pad_id)
    task_after = (
        evaluate_policy(tuned, task_held_out, verifier, greedy, pad_id=tok.pad_id) if task_held_out else None
    )
    task = {}
    if task_before is not None and task_after is not None:
        task = {
            "sft_task_accuracy": round(task_before["mean_reward"], 4),
            "tuned_task_accuracy": round(task_after["mean_reward"], 4),
        }
    kl = held_out_kl(tuned, reference, held_out, rp, tok, seed)
    save_model_dir(
        tuned,
        tuned.config,
        root / params.tokenizer.out_dir,
        root / rp.out_dir,
        extra={"stage": "rlhf", "algorithm": rp.algorithm},
    )
    stop_reason = getattr(module, "stop_reason", None)
    return {
        "algorithm": rp.algorithm,
        "reward": rp.reward,
        **task,
        "sft_mean_reward": round(before["mean_reward"], 4),
        "tuned_mean_reward": round(after["mean_reward"], 4),
        "reward_gain": round(after["mean_reward"] - before["mean_reward"], 4),
        "held_out_kl": round(kl, 4),
        "kl_max": rp.kl_max,
        "sft_mean_length": round(before["mean_length"], 2),
        "tuned_mean_length": round(after["mean_length"], 2),
        "stopped_early": int(stop_reason is not None),
        "stop_reason": stop_reason or "",
        "steps": trainer.global_step,
        "train_seconds": round(seconds, 1),
    }
