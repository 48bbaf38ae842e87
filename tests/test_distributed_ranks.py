"""Which process of a distributed launch tracks and writes (issue 25): rank 0 of the whole job, read
from the launcher's environment as torchrun, srun and Lightning's own launcher set it. Before the fix
only RANK / LOCAL_RANK were read, so under srun (no LOCAL_RANK) and on Lightning's nodes after the
first (LOCAL_RANK=0, NODE_RANK=1) every node's first process took itself for rank 0."""

from __future__ import annotations

import pytest

from lmforge.stages import is_worker_rank
from lmforge.training.distributed import is_global_zero, launcher_rank

LAUNCH_VARS = (
    "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
    "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NAME", "SLURM_JOB_ID",
)  # fmt: skip


def torchrun(rank: int, local: int, node: int) -> dict[str, str]:
    """What `torchrun --nnodes 2 --nproc-per-node 2` sets in each process."""
    return {
        "RANK": str(rank), "LOCAL_RANK": str(local), "GROUP_RANK": str(node), "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
    }  # fmt: skip


def srun(rank: int, local: int, node: int) -> dict[str, str]:
    """What `srun --nodes 2 --ntasks-per-node 2` sets in each task (no RANK, no LOCAL_RANK)."""
    return {
        "SLURM_NTASKS": "4", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "lmforge", "SLURM_JOB_ID": "42",
    }  # fmt: skip


def lightning(local: int, node: int) -> dict[str, str]:
    """Lightning's launcher: one command per node with NODE_RANK, which spawns LOCAL_RANK 1.. itself."""
    env = {"NODE_RANK": str(node)}
    if local:
        env["LOCAL_RANK"] = str(local)
    return env


LAUNCHES = {
    "torchrun": [(torchrun(r, r % 2, r // 2), r) for r in range(4)],
    "srun": [(srun(r, r % 2, r // 2), r) for r in range(4)],
    "lightning": [(lightning(r % 2, r // 2), None) for r in range(4)],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHES))
def test_exactly_one_process_of_a_two_node_launch_is_rank_zero(launcher, monkeypatch):
    zeros = []
    for env, rank in LAUNCHES[launcher]:
        for name in LAUNCH_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert launcher_rank() == rank
        zeros.append(is_global_zero())
        assert is_worker_rank() == (not zeros[-1])
    assert zeros == [True, False, False, False]


def test_a_plain_process_is_rank_zero(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert launcher_rank() is None and is_global_zero() and not is_worker_rank()
