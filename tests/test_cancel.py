"""Cancelling a run: the whole process tree stops within seconds, DVC's locks are released, nothing
half-written is left, the MLflow runs end KILLED, and the next run needs no manual cleanup.

Unit tests of `lmforge.orchestration.process_groups` on small Python process trees, then real cancellations in a
project copy: `dvc repro pretrain` interrupted with `process_groups.interrupt` (what the Prefect flow
does when a flow run is cancelled), and `lmforge run pretrain` sent SIGTERM (what Prefect's runner,
`kill` or a container stop do), followed by a normal run.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import BIN, copy_project, run_cmd
from lmforge import cancellation
from lmforge.orchestration import dvc_lock, process_groups
from lmforge.orchestration.overrides import apply_overrides
from test_flows import TOY

# A pretrain that runs until cancelled: the toy model, far too many steps, frequent (atomic) checkpoints.
LONG = {
    **{k: v for k, v in TOY.items() if k.split(".")[0] in ("model", "tokenizer", "pretrain")},
    "pretrain.max_steps": 100_000,
    "pretrain.val_every_steps": 100_000,
    "pretrain.checkpoint_every_steps": 20,
}
CANCEL_S = 10.0  # the whole tree must be gone this soon after the cancellation (it takes ~2-3 s)
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # what lmforge.atomic writes before renaming

# ------------------------------------------------------------------------------ process_groups units

TREE = """
import signal, subprocess, sys, time
args = sys.argv[1:]
if args[:1] == ["child"]:
    for name in args[1:]:
        if name.startswith("SIG"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
child = subprocess.Popen([sys.executable, __file__, "child", *args], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
if "--leave" in args:
    sys.exit(0)
while True:
    time.sleep(0.1)
"""


def start_tree(tmp_path: Path, *ignored: str) -> tuple[subprocess.Popen, int]:
    """A leader (plain Python: SIGINT stops it) and its child, which ignores the `ignored` signals."""
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    proc = process_groups.start(
        [sys.executable, str(script), *ignored],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    return proc, int(proc.stdout.readline())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize(
    ("ignored", "child_ends_by"),
    [((), signal.SIGINT), (("SIGINT",), signal.SIGTERM), (("SIGINT", "SIGTERM"), signal.SIGKILL)],
    ids=["sigint-suffices", "child-ignores-sigint", "child-ignores-sigint-and-sigterm"],
)
def test_interrupt_escalates_until_the_whole_group_is_gone(tmp_path, ignored, child_ends_by):
    proc, child = start_tree(tmp_path, *ignored)
    t0 = time.monotonic()
    code = process_groups.interrupt(proc, grace_s=1.0, term_grace_s=1.0)
    elapsed = time.monotonic() - t0
    assert code == -signal.SIGINT  # the leader's own exit: Python ends by SIGINT on an uncaught Ctrl-C
    assert gone(child), "the child outlived interrupt()"
    assert not process_groups.group_alive(proc.pid)
    # Each escalation waits out its grace (1 s) only when the group survived the signal before it.
    steps = {signal.SIGINT: 0, signal.SIGTERM: 1, signal.SIGKILL: 2}[child_ends_by]
    assert steps <= elapsed < steps + 1.0, f"took {elapsed:.2f} s"
    # Idempotent: again, nothing to send, same answer at once.
    t0 = time.monotonic()
    assert process_groups.interrupt(proc) == code
    assert time.monotonic() - t0 < 0.5
    assert proc not in process_groups.running()


def test_stopped_on_interrupt_stops_the_tree_and_reraises(tmp_path):
    proc, child = start_tree(tmp_path, "SIGINT")
    with pytest.raises(KeyboardInterrupt), process_groups.stopped_on_interrupt(proc, grace_s=0.5):
        raise KeyboardInterrupt
    assert proc.returncode is not None and gone(child)


def test_a_leader_that_exits_leaves_no_straggler_behind_the_block(tmp_path):
    proc, child = start_tree(tmp_path, "--leave")  # the leader exits 0, its child keeps running
    with process_groups.stopped_on_interrupt(proc, grace_s=2.0):
        assert proc.wait() == 0
        assert not gone(child)
    assert gone(child)


def test_an_interruption_while_waiting_skips_the_grace(tmp_path):
    """A second cancellation (here a timer) during interrupt() SIGKILLs the group at once, then re-raises."""
    proc, child = start_tree(tmp_path, "SIGINT", "SIGTERM")

    def hurry(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, hurry)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            process_groups.interrupt(proc, grace_s=30, term_grace_s=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - t0 < 3
    assert proc.wait(timeout=1) == -signal.SIGINT and gone(child)


def test_cancel_handlers_record_the_signal_and_restore_the_old_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with cancellation.cancel_handlers():
        assert cancellation.cancel_signal() is None
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert cancellation.cancel_signal() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C after the cancellation: ignored
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before
    assert cancellation.cancel_signal() == signal.SIGTERM  # kept for the exit status
    with cancellation.cancel_handlers():
        assert cancellation.cancel_signal() is None


TRANSACTION = """
import time
def transaction(seconds, log):
    log.append("begin")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    log.append("commit")
"""


@pytest.mark.parametrize(("seconds", "expected"), [(0.5, ["begin", "commit"]), (3.0, ["begin"])])
def test_a_cancellation_waits_for_the_database_layer_to_be_left(tmp_path, monkeypatch, seconds, expected):
    """A signal during a "transaction" (code under `defer_in`) raises once it is over, or after 1 s."""
    import importlib.util

    (tmp_path / "dblayer").mkdir()
    (tmp_path / "dblayer" / "txn.py").write_text(TRANSACTION)
    spec = importlib.util.spec_from_file_location("txn", tmp_path / "dblayer" / "txn.py")
    txn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(txn)
    monkeypatch.setattr(cancellation, "DEFER_MAX_S", 1.0)
    log: list[str] = []
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
    with cancellation.cancel_handlers(defer_in=[f"{os.sep}dblayer{os.sep}"]):
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            txn.transaction(seconds, log)
            time.sleep(5)
        elapsed = time.monotonic() - t0
    assert log == expected
    assert min(seconds, 1.1) <= elapsed < min(seconds, 1.1) + 0.3, elapsed


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_cancellation_dropped_by_a_finalizer_is_delivered_again():
    """Python drops an exception raised in `__del__` (or a weakref callback, as importlib's during an
    import): the cancellation must not be lost with it."""

    class Slow:
        def __del__(self):
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                time.sleep(0.01)

    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
    with cancellation.cancel_handlers():
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(cancellation.Cancelled):
            Slow()  # collected at once: __del__ runs here, and the signal arrives inside it
            time.sleep(5)  # dropped, it would sleep on; delivered again, it ends this 20 ms later
        elapsed = time.monotonic() - t0
    assert elapsed < 0.6, elapsed


def test_clear_stale_rwlock_removes_only_dead_processes(tmp_path):
    from dvc.rwlock import SCHEMA

    dead = subprocess.Popen(["true"])
    dead.wait()
    live = os.getpid()
    cmd = "dvc repro"
    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "rwlock").write_text(
        json.dumps(
            {
                "write": {"/p/models": {"pid": dead.pid, "cmd": cmd}, "/p/other": {"pid": live, "cmd": cmd}},
                "read": {
                    "/p/data": [{"pid": dead.pid, "cmd": cmd}, {"pid": live, "cmd": cmd}],
                    "/p/params.yaml": [{"pid": dead.pid, "cmd": cmd}],
                },
            }
        )
    )
    removed = dvc_lock.clear_stale_rwlock(tmp_path)
    assert sorted((e["mode"], e["path"], e["pid"]) for e in removed) == [
        ("read", "/p/data", dead.pid),
        ("read", "/p/params.yaml", dead.pid),
        ("write", "/p/models", dead.pid),
    ]
    lock = SCHEMA(json.loads((tmp / "rwlock").read_text()))  # still what DVC reads
    assert lock == {
        "write": {"/p/other": {"pid": live, "cmd": cmd}},
        "read": {"/p/data": [{"pid": live, "cmd": cmd}]},
    }
    assert dvc_lock.clear_stale_rwlock(tmp_path) == []
    # A writer killed mid-write leaves a file DVC refuses to read: moved aside.
    (tmp / "rwlock").write_text('{"write": {"/p/mod')
    assert [e["mode"] for e in dvc_lock.clear_stale_rwlock(tmp_path)] == ["corrupt"]
    assert not (tmp / "rwlock").exists() and (tmp / "rwlock.corrupt").exists()


# --------------------------------------------------------------------- real cancellations, via DVC


def environment() -> dict[str, str]:
    """The tests' environment, with DVC's shell fixed. DVC runs a stage's command through `$SHELL -c`
    (`/bin/sh` when SHELL is unset, as in CI). Debian's /bin/sh is dash, which does not exec the
    command: it waits for it and, having received the group's SIGINT itself, then dies by SIGINT, so DVC
    reports "exited with -2" whatever the stage's own exit was. bash execs a lone command, so DVC sees
    the stage's own exit status, which is what these tests check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LMFORGE_"))}
    return {
        **env,
        "SHELL": "/bin/bash",
        "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project copy with ingest .. shards done and a pretrain configured to run until cancelled."""
    root = copy_project(tmp_path_factory.mktemp("cancel") / "proj")
    run_cmd([BIN / "dvc", "init", "--no-scm", "-q"], root)
    apply_overrides(root / "params.yaml", None, LONG)
    run_cmd([BIN / "dvc", "repro", "shards"], root, env=environment())
    return root


def client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / '.lmforge' / 'mlflow' / 'mlflow.db'}")


def stage_runs(root: Path, stage: str) -> list:
    c = client(root)
    experiment = c.get_experiment_by_name("lmforge")
    return c.search_runs([experiment.experiment_id], filter_string=f"tags.`lmforge.stage` = '{stage}'")


def log_tail(path: Path, n: int = 3000) -> str:
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join(line for line in lines if not line.startswith(("Epoch", "Training")))[-n:]


def wait_training(root: Path, proc: subprocess.Popen, known: set[str], log: Path):
    """The new pretrain MLflow run once it has logged a training loss (the stage is mid-training)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (
            f"the run ended before it was cancelled ({proc.returncode}):\n{log_tail(log)}"
        )
        try:
            for run in stage_runs(root, "pretrain"):
                if run.info.run_id not in known and "train/loss" in run.data.metrics:
                    return run
        except Exception:  # the store is being written to: ask again
            pass
        time.sleep(0.3)
    raise AssertionError(f"pretrain did not start training:\n{log_tail(log)}")


def assert_clean(root: Path) -> None:
    """No process left in the project, DVC's locks free, no temporary or partial outputs."""
    left = []
    for p in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        cwd = p.info["cwd"] or ""
        if (cwd == str(root) or cwd.startswith(f"{root}/")) and p.info["status"] != psutil.STATUS_ZOMBIE:
            left.append((p.info["pid"], p.info["cmdline"]))
    assert not left, f"processes left: {left}"
    rwlock = json.loads((root / ".dvc" / "tmp" / "rwlock").read_text())
    assert not rwlock.get("read") and not rwlock.get("write"), rwlock
    with open(root / ".dvc" / "tmp" / "lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a process still holds it
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    temps = [
        p for d in ("models", "plots", "metrics", "data", ".lmforge/runs") for p in (root / d).rglob("*.tmp")
    ]
    assert not [p for p in temps if TEMP_NAME.fullmatch(p.name)], temps
    # DVC removed the stage's outputs before running it; a cancelled stage writes none of them.
    for out in ("models/pretrain", "metrics/pretrain.json", "plots/pretrain/train.csv"):
        assert not (root / out).exists(), f"{out} exists after the cancellation"
    run_cmd([BIN / "dvc", "status", "pretrain"], root, env=environment())


def stop_while_training(project: Path, cmd: list, log: Path, stop) -> tuple[Any, int, float]:
    """Start `cmd` in its own process group, wait until pretrain trains, then `stop(proc)` (returns
    the exit code); returns (the training stage's MLflow run, that code, the seconds `stop` took)."""
    known = {r.info.run_id for r in stage_runs(project, "pretrain")}
    with log.open("w") as out:
        proc = process_groups.start(cmd, cwd=project, env=environment(), stdout=out, stderr=out)
        with process_groups.stopped_on_interrupt(proc, grace_s=2):  # a failed assertion stops it too
            run = wait_training(project, proc, known, log)
            t0 = time.monotonic()
            code = stop(proc)
            elapsed = time.monotonic() - t0
    return run, code, elapsed


def test_interrupting_dvc_repro_stops_the_stage_and_releases_every_lock(project, tmp_path):
    log = tmp_path / "dvc.log"
    run, code, elapsed = stop_while_training(
        project, [BIN / "dvc", "repro", "pretrain"], log, process_groups.interrupt
    )
    assert elapsed < CANCEL_S, f"interrupt took {elapsed:.1f} s"
    # The stage ends by Ctrl-C's convention; DVC reports it as a failed stage (its own exit: 255).
    assert code == 255, log_tail(log)
    assert "exited with 130" in log_tail(log)
    assert client(project).get_run(run.info.run_id).info.status == "KILLED"
    assert_clean(project)


def test_sigterm_to_lmforge_run_kills_both_runs_and_the_next_run_works(project, tmp_path):
    log = tmp_path / "run.log"

    def sigterm(proc):
        os.killpg(proc.pid, signal.SIGTERM)  # as Prefect's runner stops a flow-run process
        # `lmforge run` returns once its own tree (dvc, and the stage in dvc's group) is gone.
        return proc.wait(timeout=30)

    run, code, elapsed = stop_while_training(project, [BIN / "lmforge", "run", "pretrain"], log, sigterm)
    assert elapsed < CANCEL_S, f"lmforge run took {elapsed:.1f} s to stop"
    assert code == 128 + signal.SIGTERM, log_tail(log)
    c = client(project)
    stage = c.get_run(run.info.run_id)
    assert stage.info.status == "KILLED"
    parent = c.get_run(stage.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    assert parent.data.tags["lmforge.pipeline_id"] == stage.data.tags["lmforge.pipeline_id"]
    assert_clean(project)

    # The next run needs no cleanup: a short pretrain completes and DVC records it.
    done = run_cmd(
        [
            BIN / "lmforge",
            "run",
            "pretrain",
            "--set",
            "pretrain.max_steps=4",
            "--set",
            "pretrain.val_every_steps=2",
        ],
        project,
        env=environment(),
    )
    assert (project / "models" / "pretrain" / "model.safetensors").is_file()
    latest = max(stage_runs(project, "pretrain"), key=lambda r: r.info.start_time)
    assert latest.info.status == "FINISHED"
    assert c.get_run(latest.data.tags["mlflow.parentRunId"]).info.status == "FINISHED"
    status = run_cmd([BIN / "dvc", "status", "pretrain"], project, env=environment())
    assert "up to date" in status.stdout, (status.stdout, done.stdout[-2000:])
    assert not any(json.loads((project / ".dvc" / "tmp" / "rwlock").read_text()).values())
