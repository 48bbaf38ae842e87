"""Stage `sft`: fine-tune the pretrained model on chat-rendered dialogues (loss on assistant tokens).

Same Lightning core as pretraining (`CausalLMModule` + `fit`); only the data differs.
Metrics: held-out assistant loss of the base and the SFT model on the same tokens, and the
share of sampled replies to held-out prompts that end with <|end|> before the length limit.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.atomic import atomic_write_text
from lmforge.evaluation import assistant_loss, reply_stats
from lmforge.generation.chat import ChatEngine
from lmforge.model_folder import load_gpt, save_model_dir
from lmforge.params import Params
from lmforge.stages import begin
from lmforge.stages.dialogues import conversations, prompts_of
from lmforge.stages.fitting import fit_stage, for_evaluation, optim_config, sample_markdown, trainer_config
from lmforge.tokenizer import ChatTokenizer
from lmforge.training import CausalLMModule, EncodeStats, SFTDataModule, encode_sft
from lmforge.training.trainer import training_device


def run(params: Params, root: Path) -> dict:
    import mlflow

    sp = params.sft
    seed = begin(params, "sft")
    tok = ChatTokenizer.load(root / params.tokenizer.out_dir)
    tcfg = trainer_config(params, "sft")
    model = for_evaluation(load_gpt(root / sp.init_from), training_device(tcfg))
    block = model.config.block_size
    train, train_stats = encode_sft(tok, conversations(root, params, "train"), block)
    val_convs = conversations(root, params, "val")
    val, val_stats = encode_sft(tok, val_convs, block)
    held_out = prompts_of(val_convs, sp.eval_prompts)
    base_loss = assistant_loss(model, val, block, tok.pad_id)
    base_replies = reply_stats(ChatEngine(model, tok), held_out, max_new_tokens=sp.sample_tokens)

    module = CausalLMModule(model.train(), optim_config(sp), compile_model=sp.compile)
    data = SFTDataModule(train, val, sp.batch_size, tok.pad_id, block, pack=sp.pack, seed=seed)
    trainer, seconds = fit_stage(
        "sft",
        module,
        data,
        tcfg,
        root=root,
        resume=sp.resume,
        curve_keys=("train/loss", "val/loss"),
    )
    if trainer.global_rank != 0:
        return {}

    model = for_evaluation(module.model, trainer.strategy.root_device)
    loss = assistant_loss(model, val, block, tok.pad_id)
    replies = reply_stats(ChatEngine(model, tok), held_out, max_new_tokens=sp.sample_tokens)
    out = save_model_dir(
        model, model.config, root / params.tokenizer.out_dir, root / sp.out_dir, extra={"stage": "sft"}
    )
    atomic_write_text(
        out / "samples.md", sample_markdown(model, tok, sp.sample_prompts, sp.sample_tokens, seed, chat=True)
    )
    mlflow.log_artifact(str(out / "samples.md"))
    return {
        "assistant_loss": round(loss, 4),
        "base_assistant_loss": round(base_loss, 4),
        "end_of_turn_rate": round(replies["end_of_turn_rate"], 4),
        "base_end_of_turn_rate": round(base_replies["end_of_turn_rate"], 4),
        "mean_reply_tokens": round(replies["mean_length"], 2),
        "steps": trainer.global_step,
        "train_seconds": round(seconds, 1),
        "examples": EncodeStats.summary(train_stats, val_stats),
    }
