"""Exactly-once side effects of a 2-node x 2-process launch (issue 25), end to end with real processes.

`lmforge pretrain` runs as four DDP processes (gloo, CPU, 127.0.0.1 only) under each launcher:
torchrun (the README's command line, two `torchrun --node-rank {0,1}` started together), srun (the
README's stage arguments, the four tasks started by the test with the variables srun sets) and
Lightning's own launcher (one command per node with `NODE_RANK`; the trainer starts local rank 1).
Every Python process of the launch loads an audit hook (`sitecustomize.py` on `PYTHONPATH`) that logs
each file it creates, opens for writing, renames, links or removes under the project, and each SQLite
database it opens there, with its pid and a monotonic clock; the launcher's variables say which global
rank the process is. The project holds the data stages' outputs and MLflow runs. Then:

* the MLflow store holds exactly one new run, the stage's, FINISHED, which the run record names;
* `metrics/pretrain.json` and `metrics/runs/pretrain.json` are each written exactly once, by rank 0;
* the checkpoints survive until the stage ends: saved by rank 0 while training, present when rank 0
  discards them after writing the metrics, and removed by nobody else, nor earlier;
* every file of the project, the MLflow store included, is touched by global rank 0 only: the other
  three processes train and write nothing, nor open the store.

With the rank read from RANK / LOCAL_RANK only (before the fix in `lmforge.training.distributed`),
every srun task and Lightning's node 1 took themselves for rank 0: an MLflow run each, the metrics
files written by each (a worker's nearly empty, until rank 0 overwrote it) and the checkpoints deleted
while rank 0 was still evaluating; this test fails on each of those.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO

STAGE = "pretrain"
NODES, PER_NODE = 2, 2  # the README's 2 x 8 becomes 2 x 2 on CPU
WORLD = NODES * PER_NODE
MICRO, BLOCK, STEPS = 2, 32, 4
LAUNCH_TIMEOUT = 300  # seconds for one launch (about 25 on 2 cores)
REMOVALS = ("os.remove", "os.rmdir", "os.rename", "shutil.rmtree")
LAUNCH_VARS = re.compile(
    r"(RANK|LOCAL_RANK|GROUP_RANK|NODE_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|"
    r"(SLURM|TORCHELASTIC|PMI|OMPI|MLFLOW|LMFORGE|PL)_.*)"
)

# Loaded by every Python process of the launch (PYTHONPATH): an audit hook logging, to
# <EXACTLY_ONCE_LOG>/<pid>.jsonl, what the process does to files under <EXACTLY_ONCE_ROOT>. Audit
# events are raised by the interpreter itself (open, os.replace, shutil.rmtree...), so nothing in
# lmforge is patched. The first line says who the process is (pid, launcher variables).
SITECUSTOMIZE = r"""
import json, os, sys, threading, time

_LOG, _ROOT = os.environ.get("EXACTLY_ONCE_LOG"), os.environ.get("EXACTLY_ONCE_ROOT")
_EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink",
           "os.truncate", "shutil.rmtree", "sqlite3.connect"}
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_VARS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID",
         "SLURM_NODEID")
_busy = threading.local()
_fd = None


def _start(forked=False):
    global _fd
    _fd = os.open(os.path.join(_LOG, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _emit({"e": "start", "ppid": os.getppid(), "argv": sys.argv, "forked": forked,
           "env": {k: os.environ[k] for k in _VARS if k in os.environ}})


def _emit(record):
    record.update(pid=os.getpid(), t=time.monotonic())
    os.write(_fd, (json.dumps(record) + "\n").encode())


def _path(p, dir_fd=None):
    if isinstance(p, int):
        return None
    p = os.fsdecode(os.fspath(p))
    if dir_fd is not None and not os.path.isabs(p):
        try:
            p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        except OSError:
            return None
    p = os.path.abspath(p)
    return p if p == _ROOT or p.startswith(_ROOT + os.sep) else None


def _hook(event, args):
    if event not in _EVENTS or getattr(_busy, "on", False):
        return
    _busy.on = True
    try:
        if event == "open":
            path, mode, flags = args
            if not (any(c in mode for c in "wax+") if isinstance(mode, str) else flags & _WRITE):
                return
            args = (path,)
        if event == "sqlite3.connect":  # the MLflow store (a new file, or one a writer locks)
            args = (str(args[0]).removeprefix("file:").split("?")[0],)
        if event in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree"):
            paths = [_path(args[0], args[-1])]
        elif event in ("os.rename", "os.link"):
            paths = [_path(args[0], args[2]), _path(args[1], args[3])]
        elif event == "os.symlink":
            paths = [_path(args[0]), _path(args[1], args[2])]
        else:
            paths = [_path(args[0])]
        if not any(paths):
            return
        record = {"e": event, "path": paths[0] or os.fsdecode(args[0]), "dst": paths[1] if len(paths) > 1 else None}
        if event == "shutil.rmtree" and os.path.isdir(paths[0]):
            record["contents"] = sorted(os.listdir(paths[0]))
        if event == "os.mkdir":  # mkdir(exist_ok=True) of a folder that is there changes nothing
            record["existed"] = os.path.isdir(paths[0])
        _emit(record)
    except Exception as err:  # never break the process under test; the test reads the error
        _emit({"e": "hook-error", "error": repr(err)})
    finally:
        _busy.on = False


if _LOG and _ROOT:
    _start()
    os.register_at_fork(after_in_child=lambda: _start(forked=True))
    sys.addaudithook(_hook)
"""


# ------------------------------------------------------------------------------ the README's commands


def readme_commands() -> dict[str, list[str]]:
    """The launch commands of the README's multi-GPU section, split as the shell would (the `$VAR`s
    kept), by launcher: {"torchrun": [...], "srun": [...]}."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n### Multi-GPU and multi-node\n", 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = {}
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            commands[tokens[0]] = tokens
    assert set(commands) == {"torchrun", "srun"}, commands
    return commands


def substitute(tokens: list[str], replacements: dict[str, str], where: str) -> list[str]:
    """`tokens` with each key replaced by its value; each must be there exactly once, so a changed
    README fails here instead of leaving its new command untested."""
    out = list(tokens)
    for old, new in replacements.items():
        hits = [i for i, token in enumerate(out) if token == old]
        assert len(hits) == 1, f"README's {where} line should hold {old!r} once: {shlex.join(tokens)}"
        out[hits[0]] = new
    return out


def stage_args(tokens: list[str], where: str) -> list[str]:
    """The README's `pretrain --set ...` for 2 CPU processes per node instead of 8 GPUs."""
    assert tokens[0] == STAGE, tokens
    for knob in (f"pretrain.num_nodes={NODES}", "pretrain.strategy=ddp"):
        assert knob in tokens, f"README's {where} line should set {knob}: {shlex.join(tokens)}"
    args = substitute(
        tokens, {"preset=small": "preset=tiny", "pretrain.devices=8": f"pretrain.devices={PER_NODE}"}, where
    )
    return [*args, "--set", "pretrain.accelerator=cpu"]


def torchrun_commands(port: int) -> list[list[str]]:
    tokens = readme_commands()["torchrun"]
    assert f"--nnodes={NODES}" in tokens, tokens
    module = tokens.index("-m")
    assert tokens[module + 1] == "lmforge.cli", tokens
    launcher = [str(BIN / "torchrun"), *tokens[1:module], "-m", "lmforge.cli"]
    args = stage_args(tokens[module + 2 :], "torchrun")
    return [
        substitute(
            launcher,
            {
                "--nproc-per-node=8": f"--nproc-per-node={PER_NODE}",
                "--node-rank=$NODE_RANK": f"--node-rank={node}",
                "--master-addr=$MASTER_ADDR": "--master-addr=127.0.0.1",
                "--master-port=29500": f"--master-port={port}",
            },
            "torchrun",
        )
        + args
        for node in range(NODES)
    ]


def srun_args() -> list[str]:
    tokens = readme_commands()["srun"]
    for flag in (f"--nodes={NODES}", "--ntasks-per-node=8"):
        assert flag in tokens, f"README's srun line should have {flag}: {shlex.join(tokens)}"
    return stage_args(tokens[tokens.index("lmforge") + 1 :], "srun")


def lightning_args() -> list[str]:
    """The README's torchrun line's stage arguments, for Lightning's own launcher."""
    tokens = readme_commands()["torchrun"]
    return stage_args(tokens[tokens.index("-m") + 2 :], "torchrun")


def srun_env(rank: int, port: int) -> dict[str, str]:
    """What `srun --nodes=2 --ntasks-per-node=2` sets in task `rank` (no RANK, no LOCAL_RANK); the
    address and port of rank 0 as a job script exports them (Lightning would otherwise derive them
    from SLURM_NODELIST and SLURM_JOB_ID)."""
    return {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lmforge", "SLURM_STEP_ID": "0",
        "SLURM_NNODES": str(NODES), "SLURM_JOB_NUM_NODES": str(NODES), "SLURM_NODELIST": "127.0.0.1",
        "SLURM_NTASKS": str(WORLD), "SLURM_NPROCS": str(WORLD), "SLURM_NTASKS_PER_NODE": str(PER_NODE),
        "SLURM_TASKS_PER_NODE": f"{PER_NODE}(x{NODES})", "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % PER_NODE), "SLURM_NODEID": str(rank // PER_NODE),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }  # fmt: skip


# ------------------------------------------------------------------------------ the project


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny project with ingest, tokenizer and shards done (one process): their outputs and their
    MLflow runs, as `dvc repro` leaves them before pretrain."""
    root = tmp_path_factory.mktemp("exactly_once") / "proj"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "data" / "raw", root / "data" / "raw")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tokenizer"] = {"vocab_size": 512, "max_train_bytes": 200_000, "num_proc": 1}
    params["model"] = {"block_size": BLOCK, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32}
    params[STAGE] = {
        "max_steps": STEPS, "warmup_steps": 1, "batch_size": MICRO, "global_batch_tokens": MICRO * BLOCK * WORLD,
        "val_every_steps": 2, "val_batches": 1, "checkpoint_every_steps": 2, "log_every_steps": 1,
        "sample_tokens": 4, "raw_val_max_bytes": 2000,
    }  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(
        [sys.executable, "-c", "from lmforge.cli import main\nfor s in ('ingest', 'tokenizer', 'shards'):\n"
         "    assert main([s]) == 0, s"],
        cwd=root, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's, MLflow's or lmforge's variables (the test may itself
    run under SLURM or torchrun), one thread per process, gloo on the loopback interface."""
    env = {k: v for k, v in os.environ.items() if not LAUNCH_VARS.fullmatch(k)}
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ running a launch


def run_launch(commands: list[tuple[list[str], dict[str, str]]], root: Path, work: Path) -> None:
    """Start every command at once (each a launcher of its own process group), wait for all of them;
    on a failure or the timeout stop them all. Every process the launch started is gone afterwards."""
    log = work / "audit"
    log.mkdir()
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    procs, outputs = [], []
    try:
        for i, (cmd, extra) in enumerate(commands):
            env = clean_env(
                **extra,
                PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
                EXACTLY_ONCE_LOG=str(log),
                EXACTLY_ONCE_ROOT=str(root),
                EXACTLY_ONCE_TOKEN=token,
            )
            out = (work / f"launcher{i}.log").open("w")
            outputs.append(out)
            procs.append(
                subprocess.Popen(
                    cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while any(p.poll() is None for p in procs):
            assert all(p.returncode in (None, 0) for p in procs), "launch failed:\n" + tails(work)
            assert time.monotonic() < deadline, f"launch still running after {LAUNCH_TIMEOUT} s:\n" + tails(
                work
            )
            time.sleep(0.5)
        assert all(p.returncode == 0 for p in procs), "launch failed:\n" + tails(work)
    finally:
        for out in outputs:
            out.close()
        stray = stop(procs, log, token)
    assert not stray, f"processes of the launch still running after it ended: {stray}"


def stop(procs: list[subprocess.Popen], log: Path, token: str) -> list[int]:
    """Stop the launchers' process groups, then any process the audit logs name (torchrun starts its
    workers in sessions of their own) that still carries this launch's token. Returns the pids that
    were still running once the launchers had ended."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stray = []
    for path in log.glob("*.jsonl"):
        pid = int(path.stem)
        deadline = time.monotonic() + 10  # a worker may take a moment to exit after its launcher
        while ours(pid, token) and time.monotonic() < deadline:
            time.sleep(0.2)
        if ours(pid, token):
            stray.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return stray


def ours(pid: int, token: str) -> bool:
    """Process `pid` is alive (not a zombie) and was started by this launch (carries its token)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and f"EXACTLY_ONCE_TOKEN={token}".encode() in environ.split(b"\0")


def tails(work: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(work.glob("launcher*.log")))


def read_audit(log: Path) -> tuple[dict[int, int | None], list[dict]]:
    """{pid: global rank (None: a launcher)} and every logged event, in time order. Asserts that the
    launch ran one process of each rank (a process they fork counts as theirs)."""
    ranks, events, started = {}, [], []
    for path in log.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["e"] == "start":
                ranks[record["pid"]] = global_rank(record["env"])
                if not record["forked"] and ranks[record["pid"]] is not None:
                    started.append(ranks[record["pid"]])
            else:
                events.append(record)
    assert sorted(started) == list(range(WORLD)), ranks
    assert not [e for e in events if e["e"] == "hook-error"], events
    return ranks, sorted(events, key=lambda e: e["t"])


def global_rank(env: dict[str, str]) -> int | None:
    """The rank a launcher gave the process, read from its variables at start, as each launcher sets them."""
    if "RANK" in env:
        return int(env["RANK"])  # torchrun
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    if "NODE_RANK" in env:  # Lightning: the node's command (no LOCAL_RANK) or a process it started
        return int(env["NODE_RANK"]) * PER_NODE + int(env.get("LOCAL_RANK", "0"))
    return None  # a torchrun agent


def launches(port: int) -> dict[str, list[tuple[list[str], dict[str, str]]]]:
    stage = [sys.executable, "-m", "lmforge.cli"]
    return {
        "torchrun": [(cmd, {}) for cmd in torchrun_commands(port)],
        "srun": [([*stage, *srun_args()], srun_env(rank, port)) for rank in range(WORLD)],
        "lightning": [
            ([*stage, *lightning_args()], {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node)})
            for node in range(NODES)
        ],
    }  # fmt: skip


# ------------------------------------------------------------------------------ the test


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun", "lightning"])
def test_a_two_node_launch_tracks_writes_and_discards_exactly_once(launcher, prepared, tmp_path):
    import mlflow

    root = tmp_path / "proj"
    shutil.copytree(prepared, root)
    root = root.resolve()
    run_launch(launches(free_port())[launcher], root, tmp_path)
    ranks, events = read_audit(tmp_path / "audit")
    for event in events:
        event["rank"] = ranks.get(event["pid"], "?")

    # Exactly one MLflow run more in the store (beside the data stages'): the stage's, finished, the
    # one the run record names.
    client = mlflow.MlflowClient(f"sqlite:///{root / '.lmforge' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    new = [r for r in runs if r.info.run_name not in ("ingest", "tokenizer", "shards")]
    assert [(r.info.run_name, r.info.status) for r in new] == [(STAGE, "FINISHED")] and len(runs) == 4, [
        (r.info.run_name, r.info.status, r.info.run_id) for r in runs
    ]
    assert new[0].data.tags["lmforge.stage"] == STAGE and new[0].data.metrics["steps"] == STEPS
    record = root / "metrics" / "runs" / f"{STAGE}.json"
    assert json.loads(record.read_text())["mlflow_run_id"] == new[0].info.run_id

    # Each metrics file written exactly once, by rank 0: one atomic rename over it, no other write.
    metrics = root / "metrics" / f"{STAGE}.json"
    for path in (metrics, record):
        writes = [e for e in events if str(path) in (e["path"], e["dst"])]
        assert [(e["e"], e["rank"]) for e in writes] == [("os.rename", 0)], writes
    written = max(e["t"] for e in events if e["dst"] in (str(metrics), str(record)))
    result = json.loads(metrics.read_text())
    assert result["steps"] == STEPS
    assert result["tokens_seen"] == STEPS * MICRO * BLOCK * WORLD  # every process's micro-batches

    # The checkpoints survive until the stage ends: saved by rank 0 while training, there when rank 0
    # discards them after writing the metrics, and removed (or renamed away) by no one before that.
    folder = root / ".lmforge" / "runs" / STAGE / "checkpoints"
    saves = [e for e in events if e["e"] == "os.rename" and e["dst"] == str(folder / "last.ckpt")]
    assert len(saves) >= 2 and {e["rank"] for e in saves} == {0}, saves  # step 2 and the end
    discards = [e for e in events if e["e"] == "shutil.rmtree" and e["path"] == str(folder)]
    assert [e["rank"] for e in discards] == [0], discards
    assert "last.ckpt" in discards[0]["contents"] and discards[0]["t"] > written > saves[-1]["t"], discards
    gone = (str(folder), str(folder / "last.ckpt"))
    early = [e for e in events if e["e"] in REMOVALS and e["path"] in gone and e["t"] < discards[0]["t"]]
    assert not early, early
    assert not folder.exists()  # a finished stage keeps no checkpoints (discard_checkpoints)

    # And nothing else: the other three processes (and torchrun's agents) train, and touch no file of
    # the project, nor the MLflow store (not even to open it).
    others = sorted(
        {
            (e["rank"], e["e"], os.path.relpath(e["path"], root))
            for e in events
            if e["rank"] != 0 and not e.get("existed")
        }
    )
    assert not others, f"processes other than rank 0 touched the project (rank, event, path): {others}"
