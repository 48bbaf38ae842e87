"""Team mode on real servers (issue 26): PostgreSQL and the MLflow tracking server
(`lmforge team-server`'s `team_server`), and a DVC remote over SSH (Debian's openssh-server), all on
127.0.0.1, as fixtures and helpers. The end-to-end run is in tests/test_flows.py (one pipeline run
serves both checks): a Prefect worker runs the pipeline in its own git + DVC checkout against the
shared server and pushes its outputs; a `git clone` pulls them and gets the same bytes with
`dvc status` clean, no retraining, and sees the registered version through the same server."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, copy_project, run_cmd
from lmforge.orchestration import process_groups
from lmforge.orchestration.team import TeamConfig, team_server

SSHD = Path("/usr/sbin/sshd")
OUTPUTS = ("data/processed", "data/tokenizer", "data/tokens", "models", "plots", "metrics", "reports")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_folder() -> Path:
    """A scratch folder the `postgres` user can reach too (PostgreSQL runs as it when we are root);
    pytest's own tmp folders are private to us."""
    folder = Path(tempfile.mkdtemp(prefix="lmforge-team-"))
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def shared():
    folder = open_folder()
    try:
        with team_server(TeamConfig(folder / "team", port=free_port(), pg_port=free_port())) as cfg:
            yield cfg
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ssh_remote(tmp_path_factory):
    """sshd on 127.0.0.1 with a key of its own; returns (url of an empty remote folder, client key)."""
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / name], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        "Subsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    proc = process_groups.start([SSHD, "-D", "-e", "-f", config], stderr=(d / "sshd.log").open("w"))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, (d / "sshd.log").read_text()
            time.sleep(0.2)
        remote = d / "remote"
        remote.mkdir()
        yield f"ssh://{getpass.getuser()}@127.0.0.1:{port}{remote}", d / "client_key"
    finally:
        process_groups.interrupt(proc, grace_s=5)


GIT = ["git", "-c", "user.name=lmforge-test", "-c", "user.email=test@lmforge.invalid"]


def checkout(root: Path, remote: str) -> Path:
    """A git + DVC project with the team's remote as its default, committed."""
    copy_project(root)
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    run_cmd(["git", "init", "-q"], root)
    run_cmd([BIN / "dvc", "init", "-q"], root)
    run_cmd([BIN / "dvc", "remote", "add", "-d", "team", remote], root)
    commit(root, "project")
    return root


def commit(root: Path, message: str) -> None:
    run_cmd(["git", "add", "-A"], root)
    run_cmd([*GIT, "commit", "-q", "-m", message], root)


def use_key(root: Path, key: Path) -> None:
    """Each person's own key, in `.dvc/config.local`, which git ignores: never in the repository."""
    run_cmd([BIN / "dvc", "remote", "modify", "--local", "team", "keyfile", key], root)


def digests(root: Path) -> dict[str, str]:
    files = [p for rel in OUTPUTS for p in sorted((root / rel).rglob("*")) if p.is_file()]
    files = [p for p in files if "runs" not in p.relative_to(root).parts]  # run records: ids and seconds
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def push_pull_and_compare(first: Path, second: Path, key: Path, env: dict, tracking_uri: str) -> None:
    """`first` ran the pipeline against the shared server: commit (params.yaml, dvc.lock, metrics go to
    git), `dvc push` (the outputs go to the remote); a `git clone` of it in `second` pulls and must hold
    the same bytes, with `dvc status` up to date, and see the registered version through the server."""
    registered = json.loads((first / "metrics" / "runs" / "register.json").read_text())
    commit(first, "a run")
    run_cmd([BIN / "dvc", "push"], first, env=env)
    assert "config.local" not in run_cmd(["git", "ls-files", ".dvc"], first).stdout

    run_cmd(["git", "clone", "-q", first, second], second.parent)
    use_key(second, key)
    assert not (second / "models" / "rlhf" / "model.safetensors").exists()  # git holds no output
    run_cmd([BIN / "dvc", "pull"], second, env=env)
    assert digests(second) == digests(first)
    status = run_cmd([BIN / "dvc", "status"], second, env=env)
    assert "up to date" in status.stdout, status.stdout

    probe = (
        "import json, sys, mlflow; from lmforge import tracking; from lmforge.names import MODEL_NAME;"
        "v = mlflow.MlflowClient(tracking.tracking_uri()).get_model_version(MODEL_NAME, sys.argv[1]);"
        "print(json.dumps({'uri': tracking.tracking_uri(), 'version': v.version, 'aliases': list(v.aliases)}))"
    )
    asked = [BIN / "python", "-c", probe, str(registered["version"])]
    seen = json.loads(run_cmd(asked, second, env=env).stdout.strip().splitlines()[-1])
    assert seen["uri"] == tracking_uri and int(seen["version"]) == int(registered["version"])
    assert registered["alias"] in seen["aliases"]


def test_the_database_password_comes_from_the_environment_a_file_or_is_generated_once(tmp_path, monkeypatch):
    from lmforge.orchestration.team import PASSWORD_ENV, PASSWORD_FILE_ENV, TeamServerError, password

    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_FILE_ENV, raising=False)
    made = password(tmp_path)
    stored = tmp_path / "pg-password"
    assert len(made) >= 32 and stored.read_text().strip() == made and stored.stat().st_mode & 0o777 == 0o600
    assert password(tmp_path) == made  # generated once, then read
    (tmp_path / "team.pw").write_text("from-a-file\n")
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "team.pw"))
    assert password(tmp_path) == "from-a-file"
    monkeypatch.setenv(PASSWORD_ENV, "from-the-env")
    assert password(tmp_path) == "from-the-env"
    monkeypatch.delenv(PASSWORD_ENV)
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "missing.pw"))
    with pytest.raises(TeamServerError, match=r"LMFORGE_PG_PASSWORD_FILE=.*missing.pw: no such file"):
        password(tmp_path)
