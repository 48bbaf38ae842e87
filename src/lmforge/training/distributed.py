"""Which process of a distributed launch this is, before any trainer exists.

A stage decides at its start whether this process tracks and writes (rank 0 of the whole job) or
only trains. The answer comes from the launcher that started the process, read through Lightning's
cluster environments (the same ones its trainer uses):

* torchrun / torchelastic: ``RANK``;
* SLURM's ``srun``: ``SLURM_PROCID`` (``LOCAL_RANK`` is not set there, so every node's first
  process would otherwise think it is rank 0);
* Lightning's own launcher (the trainer spawning ``devices`` processes per node, one command per
  node with ``NODE_RANK``): rank 0 is node 0's local rank 0.

Once a trainer exists, ``trainer.global_rank`` / ``trainer.is_global_zero`` say the same.
Training core: torch and Lightning only.
"""

from __future__ import annotations

import os


def launcher_rank() -> int | None:
    """This process's global rank as its launcher set it (None: the launcher sets no global rank,
    as Lightning's own launcher, which sets ``NODE_RANK`` and ``LOCAL_RANK``)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment().global_rank()
    if SLURMEnvironment.detect():
        return SLURMEnvironment().global_rank()
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


def is_global_zero() -> bool:
    """Rank 0 of the whole job: the one process that tracks, writes metrics and tidies checkpoints."""
    rank = launcher_rank()
    if rank is not None:
        return rank == 0
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    return node == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def world_size(devices: int | str, num_nodes: int, accelerator: str = "auto") -> int:
    """Processes the trainer will run: devices per node (``auto``: every visible GPU, else one
    process, as Lightning resolves it) x nodes."""
    if devices == "auto":
        import torch

        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        devices = torch.cuda.device_count() if gpu else 1
    return int(devices) * num_nodes


def accumulation(global_tokens: int, micro_batch: int, block_size: int, world: int) -> int:
    """Micro-batches each process accumulates so one optimizer step sees ``global_tokens`` tokens
    whatever the number of processes: global = micro_batch x block_size x world x accumulation."""
    per_pass = micro_batch * block_size * world
    if global_tokens % per_pass:
        raise ValueError(
            f"global_batch_tokens {global_tokens} is not a multiple of batch_size {micro_batch} x "
            f"block_size {block_size} x {world} processes = {per_pass} tokens; pick a batch_size or a "
            "global batch that divide"
        )
    return global_tokens // per_pass
