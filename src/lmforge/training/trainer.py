"""Build and run the Lightning Trainer shared by all stages; export/load weights.

Multi-GPU / multi-node
----------------------
Set ``TrainerConfig(strategy="ddp", devices=<gpus per node>, num_nodes=<nodes>)`` (not FSDP:
``config.FSDP_REFUSED`` says why).
Lightning detects the cluster environment from env vars, so launch the same command on
every node:

* torchrun (one process per GPU, Lightning adopts them)::

      torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$NODE_RANK \\
          --master-addr=$MASTER_ADDR --master-port=29500 -m lmforge.cli pretrain ...

  (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.)
* Plain env vars (Lightning launches the per-node processes itself): set MASTER_ADDR,
  MASTER_PORT, NODE_RANK (and WORLD_SIZE) on each node and run the command once per node.
* SLURM: ``srun`` with ``--ntasks-per-node`` equal to ``devices``; Lightning's
  SLURMEnvironment reads SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, SLURM_NODELIST.

On CPU, "ddp" uses the gloo backend (NCCL needs GPUs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.strategies import DDPStrategy, Strategy

from lmforge.training.checkpointing import AtomicCheckpointIO, mark_run, resume_path, run_key
from lmforge.training.config import TrainerConfig


def _on_cuda(cfg: TrainerConfig) -> bool:
    if cfg.accelerator in ("gpu", "cuda"):
        return True
    return cfg.accelerator == "auto" and torch.cuda.is_available()


def training_device(cfg: TrainerConfig) -> torch.device:
    """The device this process trains on, known before a trainer exists: its own GPU (``LOCAL_RANK``,
    as every launcher sets it) on CUDA, else the CPU. A stage evaluates there too, before training and
    after (``trainer.strategy.root_device`` once a trainer exists)."""
    if _on_cuda(cfg):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def use_matmul_precision(cfg: TrainerConfig) -> str | None:
    """On CUDA, fp32 matmuls (a 32-true run, fp32 evaluation after training) as ``cfg.matmul_precision``
    says: "high" puts them on TF32 tensor cores. The CPU's setting is left alone (its results are the
    pipeline's reproducible bytes). Returns what was set, None on the CPU."""
    if not _on_cuda(cfg):
        return None
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    return cfg.matmul_precision


def resolve_precision(cfg: TrainerConfig) -> str:
    """Resolve "auto": bf16 autocast on CUDA (fp32 master weights), full fp32 elsewhere."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16-mixed" if _on_cuda(cfg) else "32-true"


def resolve_strategy(cfg: TrainerConfig) -> str | Strategy:
    if cfg.strategy == "ddp":
        # NCCL only exists for GPUs; gloo makes CPU DDP (and tests) work.
        return DDPStrategy(process_group_backend=None if _on_cuda(cfg) else "gloo")
    return cfg.strategy


def checkpoint_dir(default_root_dir: str | Path, ckpt_dir: str | Path | None = None) -> Path:
    return Path(ckpt_dir) if ckpt_dir is not None else Path(default_root_dir) / "checkpoints"


def build_trainer(
    cfg: TrainerConfig,
    *,
    default_root_dir: str | Path,
    logger: Any = None,
    callbacks: Sequence[Callback] = (),
    ckpt_dir: str | Path | None = None,
) -> L.Trainer:
    """A step-based Trainer: periodic + final `last.ckpt`, validation every `val_every_steps`."""
    cbs: list[Callback] = list(callbacks)
    cbs.append(
        ModelCheckpoint(
            dirpath=checkpoint_dir(default_root_dir, ckpt_dir),
            every_n_train_steps=cfg.checkpoint_every_steps or None,
            save_top_k=0,  # only last.ckpt: resume needs nothing else, and it bounds disk use
            save_last=True,  # also written at train end => the "final" checkpoint
            save_on_train_epoch_end=False,
            enable_version_counter=False,  # always last.ckpt: a resume knows where to look
        )
    )
    if cfg.enable_progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, cfg.log_every_steps)))
    validate = cfg.val_every_steps > 0 and cfg.val_batches > 0
    return L.Trainer(
        default_root_dir=str(default_root_dir),
        max_steps=cfg.max_steps,
        max_epochs=-1,  # the train stream is infinite; max_steps ends training
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        # val_check_interval counts micro-batches, not optimizer steps.
        val_check_interval=cfg.val_every_steps * cfg.accumulate_grad_batches if validate else None,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.val_batches if validate else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.log_every_steps,
        precision=resolve_precision(cfg),  # type: ignore[arg-type]
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=resolve_strategy(cfg),
        num_nodes=cfg.num_nodes,
        deterministic=cfg.deterministic,
        enable_progress_bar=cfg.enable_progress_bar,
        enable_model_summary=False,
        logger=logger if logger is not None else False,
        callbacks=cbs,
        plugins=[AtomicCheckpointIO()],  # write, fsync, rename: a killed save is never read back
        use_distributed_sampler=True,
    )


def fit(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    cfg: TrainerConfig,
    *,
    resume: bool,
    default_root_dir: str | Path,
    logger: Any = None,
    callbacks: Sequence[Callback] = (),
    ckpt_dir: str | Path | None = None,
) -> L.Trainer:
    """Train `module`, checkpointing to `<ckpt_dir>/last.ckpt`.

    With resume=True an interrupted run of the same key (config, initial weights, data: see
    `checkpointing.run_key`) continues from its last good checkpoint, and ends with the same weights
    as an uninterrupted run; checkpoints of another run are discarded. resume=False starts afresh.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    use_matmul_precision(cfg)
    trainer = build_trainer(
        cfg, default_root_dir=default_root_dir, logger=logger, callbacks=callbacks, ckpt_dir=ckpt_dir
    )
    folder = checkpoint_dir(default_root_dir, ckpt_dir)
    # The Trainer's own max_steps is left out: a run stopped early may be continued to more steps
    # (the schedule's length is in the optimizer config, which the module's hparams hold).
    key = run_key(module, datamodule, {k: v for k, v in cfg.to_dict().items() if k != "max_steps"})
    # Every rank picks the same file; only rank 0 tidies (removes stale or corrupt files).
    tidy = trainer.global_rank == 0
    ckpt_path = resume_path(folder, key, tidy=tidy) if resume else None
    if tidy:
        if not resume:
            for old in folder.glob("*.ckpt"):
                old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        mark_run(folder, key)
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True
    )
    return trainer
