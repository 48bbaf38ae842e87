"""Team mode's tracking: one MLflow tracking server on PostgreSQL that a whole team logs to, compares
against and promotes in, instead of each checkout's own SQLite file.

``lmforge team-server`` starts, on this machine:

* PostgreSQL (Debian's ``postgresql``): a cluster of its own in ``<dir>/postgres``, initialised on the
  first start, listening on ``--pg-host`` only, password (scram-sha-256) authentication;
* ``mlflow server`` with that database as its backend store and ``<dir>/artifacts`` as its proxied
  artifact store (clients upload and download artifacts through the server, so they need no access
  to its disk);

and runs until interrupted. Each checkout then sets ``MLFLOW_TRACKING_URI=http://<host>:<port>``:
every stage, the registry, the run summary and the service read it (:mod:`lmforge.tracking`).

Credentials never come from ``params.yaml`` or the repository. The database password is
``$LMFORGE_PG_PASSWORD``, else the file named by ``$LMFORGE_PG_PASSWORD_FILE``, else one generated on
the first start into ``<dir>/pg-password`` (mode 600). It reaches ``mlflow server`` through its
environment (``MLFLOW_BACKEND_STORE_URI``), never on a command line, where ``ps`` would show it.
PostgreSQL refuses to run as root: started as root, its commands run as the ``postgres`` user
(``runuser``), which then owns ``<dir>/postgres``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.orchestration import process_groups

DB_USER = "lmforge"
DB_NAME = "mlflow"
PASSWORD_ENV = "LMFORGE_PG_PASSWORD"
PASSWORD_FILE_ENV = "LMFORGE_PG_PASSWORD_FILE"


class TeamServerError(RuntimeError):
    """A part of the team server did not start; the message says which and where its log is."""


@dataclass(frozen=True)
class TeamConfig:
    folder: Path  # <dir>: postgres/, artifacts/, pg-password, logs
    host: str = "127.0.0.1"  # where mlflow server listens
    port: int = 5000
    pg_host: str = "127.0.0.1"  # where PostgreSQL listens (the MLflow server is its only client)
    pg_port: int = 5432
    workers: int = 2  # mlflow server's gunicorn/uvicorn workers

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.port}"


def password(folder: Path) -> str:
    """The database password: the environment, a file it names, or one generated once (mode 600)."""
    if value := os.environ.get(PASSWORD_ENV):
        return value
    path = Path(os.environ.get(PASSWORD_FILE_ENV) or folder / "pg-password")
    if path.is_file():
        return path.read_text().strip()
    if PASSWORD_FILE_ENV in os.environ:
        raise TeamServerError(f"${PASSWORD_FILE_ENV}={path}: no such file")
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(24)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write(value + "\n")
    return value


def pg_bin(name: str) -> str:
    """A PostgreSQL server program (initdb, pg_ctl): on PATH, or in Debian's versioned folder."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise TeamServerError(f"{name} not found: install PostgreSQL (Debian: apt-get install postgresql)")
    return found


def _as_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL's programs refuse root: as root, run them as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str, **kwargs) -> None:
    done = subprocess.run(_as_owner(cmd), capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise TeamServerError(
            f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}"
        )


def init_cluster(data: Path, secret: str) -> bool:
    """Initialise the cluster in `data` unless it exists; True when it was created now."""
    if (data / "PG_VERSION").is_file():
        return False
    data.mkdir(parents=True, exist_ok=True)
    pwfile = data.parent / ".initdb-pw"
    with os.fdopen(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(secret + "\n")
    try:
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        os.chmod(data, 0o700)
        os.chmod(pwfile, 0o600)
        _run(
            [pg_bin("initdb"), "-D", str(data), "-U", DB_USER, "--auth=scram-sha-256", f"--pwfile={pwfile}"],
            f"initdb -D {data}",
        )
    finally:
        pwfile.unlink(missing_ok=True)
    return True


def start_postgres(cfg: TeamConfig) -> None:
    data, log = cfg.folder / "postgres", cfg.folder / "postgres.log"
    if os.geteuid() == 0 and not log.exists():
        log.touch()
        shutil.chown(log, "postgres", "postgres")
    # The socket goes in the cluster's own folder (Debian's default, /var/run/postgresql, needs root).
    options = f"-p {cfg.pg_port} -c listen_addresses={cfg.pg_host} -k {data}"
    _run(
        [pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
        f"PostgreSQL on {cfg.pg_host}:{cfg.pg_port} (log: {log})",
    )


def stop_postgres(cfg: TeamConfig) -> None:
    data = cfg.folder / "postgres"
    if (data / "postmaster.pid").exists():
        _run([pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], "pg_ctl stop")


def backend_store_uri(cfg: TeamConfig, secret: str) -> str:
    return f"postgresql+psycopg://{DB_USER}:{secret}@{cfg.pg_host}:{cfg.pg_port}/{DB_NAME}"


def ensure_database(cfg: TeamConfig, secret: str) -> None:
    import psycopg

    with psycopg.connect(
        host=cfg.pg_host, port=cfg.pg_port, user=DB_USER, password=secret, dbname="postgres", autocommit=True
    ) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone():
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')


def wait_healthy(uri: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> None:
    """Until `<uri>/health` answers OK (the first start creates MLflow's tables: tens of seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TeamServerError(f"mlflow server exited with code {proc.returncode}; its log: {log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    raise TeamServerError(
        f"mlflow server did not answer {uri}/health within {timeout_s:.0f} s; its log: {log}"
    )


@contextlib.contextmanager
def team_server(cfg: TeamConfig) -> Iterator[TeamConfig]:
    """PostgreSQL and the MLflow server, up for the block; both stopped after it (PostgreSQL's data
    stays in `<dir>/postgres` for the next start)."""
    cfg.folder.mkdir(parents=True, exist_ok=True)
    secret = password(cfg.folder)
    init_cluster(cfg.folder / "postgres", secret)
    start_postgres(cfg)
    proc = None
    try:
        ensure_database(cfg, secret)
        (cfg.folder / "artifacts").mkdir(exist_ok=True)
        log = cfg.folder / "mlflow-server.log"
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_store_uri(cfg, secret)}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", cfg.host, "--port", str(cfg.port)]
        cmd += ["--artifacts-destination", str(cfg.folder / "artifacts"), "--workers", str(cfg.workers)]
        with log.open("ab") as out:
            proc = process_groups.start(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_healthy(cfg.tracking_uri, proc, log)
        yield cfg
    finally:
        if proc is not None:
            process_groups.interrupt(proc)
        stop_postgres(cfg)
