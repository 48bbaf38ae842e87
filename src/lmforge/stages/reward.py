"""Stage `reward`: a reward model (SFT backbone + scalar head) on preference pairs, Bradley-Terry loss.

Metrics: held-out preference accuracy and mean margin (also before training, for comparison).
"""

from __future__ import annotations

from pathlib import Path

from lmforge.evaluation import preference_accuracy
from lmforge.heads import ScalarHeadModel
from lmforge.model_folder import load_gpt, save_model_dir
from lmforge.params import Params
from lmforge.stages import begin
from lmforge.stages.dialogues import pairs
from lmforge.stages.fitting import fit_stage, for_evaluation, optim_config, trainer_config
from lmforge.tokenizer import ChatTokenizer
from lmforge.training import EncodeStats, PreferenceDataModule, RewardModule, encode_pairs
from lmforge.training.trainer import training_device


def run(params: Params, root: Path) -> dict:
    rp = params.reward
    seed = begin(params, "reward")  # the scalar head's random init draws from the stage seed
    tok = ChatTokenizer.load(root / params.tokenizer.out_dir)
    tcfg = trainer_config(params, "reward")
    rm = for_evaluation(ScalarHeadModel(load_gpt(root / rp.init_from)), training_device(tcfg))
    block = rm.config.block_size
    train, train_stats = encode_pairs(tok, pairs(root, params, "train"), block)
    val, val_stats = encode_pairs(tok, pairs(root, params, "val"), block)
    before = preference_accuracy(rm, val, tok.pad_id)

    module = RewardModule(rm.train(), optim_config(rp), compile_model=rp.compile)
    data = PreferenceDataModule(train, val, rp.batch_size, tok.pad_id, seed=seed)
    trainer, seconds = fit_stage(
        "reward",
        module,
        data,
        tcfg,
        root=root,
        resume=rp.resume,
        curve_keys=("train/loss", "val/loss", "val/accuracy", "val/margin"),
    )
    if trainer.global_rank != 0:
        return {}

    rm = for_evaluation(module.model, trainer.strategy.root_device)
    after = preference_accuracy(rm, val, tok.pad_id)
    save_model_dir(
        rm,
        rm.config,
        root / params.tokenizer.out_dir,
        root / rp.out_dir,
        kind="reward_model",
        extra={"stage": "reward"},
    )
    return {
        "accuracy": round(after["accuracy"], 4),
        "margin": round(after["margin"], 4),
        "accuracy_before": round(before["accuracy"], 4),
        "steps": trainer.global_step,
        "train_seconds": round(seconds, 1),
        "pairs": EncodeStats.summary(train_stats, val_stats),
    }
