"""Stage `pretrain`: the GPT on the token shards, with the shared Lightning core.

Outputs `<out_dir>/{model.safetensors,config.json,tokenizer.json}`, the loss curve for
`dvc plots` (`plots/pretrain/{train,val}.csv`), and samples from the base model as an
MLflow artifact. Metrics: final val loss and bits per byte against the unigram baseline, and the
raw-text figure: the val documents as one stream without special tokens, scored by issue 17's rule
(`lmforge.evaluation.text_bits_per_byte`); with documents that keep their separators the two agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lmforge.atomic import atomic_write_text
from lmforge.evaluation import full_val_loss, text_bits_per_byte
from lmforge.model import GPT
from lmforge.model_folder import save_model_dir
from lmforge.params import Params
from lmforge.stages import begin, is_worker_rank
from lmforge.stages.fitting import (
    fit_stage,
    for_evaluation,
    gpt_config,
    optim_config,
    sample_markdown,
    trainer_config,
)
from lmforge.stages.tokenizer import val_text
from lmforge.tokenizer import ChatTokenizer
from lmforge.training import CausalLMModule, ShardInfo, TokenShardDataModule, bits_per_byte
from lmforge.training.data import load_shards

CHUNK_TOKENS = 1 << 24


def unigram_bits_per_byte(shard_dir: Path, info: ShardInfo) -> float:
    """Cross-entropy of val under the train unigram distribution (add-one smoothed): the bar to beat.

    Counted file by file in chunks, so memory stays bounded at any corpus size."""

    def counts(split: str) -> np.ndarray:
        total = np.zeros(info.vocab_size, dtype=np.int64)
        for part in load_shards(shard_dir, split, info):
            for i in range(0, len(part), CHUNK_TOKENS):
                total += np.bincount(part[i : i + CHUNK_TOKENS], minlength=info.vocab_size)
        return total

    train = counts("train").astype(np.float64) + 1
    logp = np.log(train / train.sum())
    val = counts("val")
    nats = -float((val * logp).sum() / val.sum())
    return float(bits_per_byte(nats, info.tokens_per_byte("val")))


def run(params: Params, root: Path) -> dict:
    import mlflow

    tp, shard_dir = params.pretrain, root / params.tokenizer.shards_dir
    seed = begin(params, "pretrain")  # the random init below draws from the stage seed
    info = ShardInfo.load(shard_dir)
    cfg = gpt_config(params.model, info.vocab_size)
    model = GPT(cfg)
    module = CausalLMModule(
        model, optim_config(tp), val_tokens_per_byte=info.tokens_per_byte("val"), compile_model=tp.compile
    )
    data = TokenShardDataModule(
        shard_dir, cfg.block_size, tp.batch_size, seed=seed, val_batches=tp.val_batches
    )
    out = root / tp.out_dir
    if not is_worker_rank():  # only rank 0 has an MLflow run (a worker would open one of its own)
        mlflow.log_params(
            {"model.n_params": model.num_params(), "model.n_params_non_embedding": model.num_params(True)}
        )
    trainer, train_seconds = fit_stage(
        "pretrain",
        module,
        data,
        trainer_config(params, "pretrain"),
        root=root,
        resume=tp.resume,
        curve_keys=("train/loss", "val/loss", "val/bits_per_byte"),
    )
    if trainer.global_rank != 0:
        return {}

    model = for_evaluation(module.model, trainer.strategy.root_device)
    val_loss = full_val_loss(model, shard_dir, info, cfg.block_size)
    tok = ChatTokenizer.load(root / params.tokenizer.out_dir)
    # The same val documents as raw text (issue 17's rule): no <|bos|> to predict, blank lines kept.
    raw_text, raw_docs = val_text(root, params, tp.raw_val_max_bytes)
    raw_bpb, raw_bytes = text_bits_per_byte(model, tok, raw_text, cfg.block_size)
    save_model_dir(model, cfg, root / params.tokenizer.out_dir, out, extra={"stage": "pretrain"})
    samples = sample_markdown(model, tok, tp.sample_prompts, tp.sample_tokens, seed=seed)
    atomic_write_text(out / "samples.md", samples)
    mlflow.log_artifact(str(out / "samples.md"))
    mlflow.log_artifact(str(out / "config.json"))
    # Every process's micro-batches count: steps x micro-batch x accumulation x context x processes.
    tokens_seen = (
        trainer.global_step
        * tp.batch_size
        * trainer.accumulate_grad_batches
        * cfg.block_size
        * trainer.world_size
    )
    return {
        "val_loss": round(val_loss, 4),
        "val_bits_per_byte": round(float(bits_per_byte(val_loss, info.tokens_per_byte("val"))), 4),
        "raw_val_bits_per_byte": round(raw_bpb, 4),
        "raw_val_bytes": raw_bytes,
        "raw_val_documents": raw_docs,
        "unigram_val_bits_per_byte": round(unigram_bits_per_byte(shard_dir, info), 4),
        "val_perplexity": round(math.exp(val_loss), 2),
        "steps": trainer.global_step,
        "tokens_seen": tokens_seen,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_seen / max(train_seconds, 1e-9), 1),
        "n_params": model.num_params(),
    }
