"""One engine process for several web processes (HTTP workers) on one machine.

One event loop per web process runs out of CPU before the engine does: at 16 streaming clients the
engine's own time to first token stays within budget while the single loop that renders every SSE
event does not (docs/benchmarks.md). With ``workers > 1`` every worker builds an
:class:`~lmforge.serving.process.EngineProcess` on the same :class:`EngineShare`:

* **the owner** is the worker that takes the share's file lock first. It starts and supervises the
  engine process as a lone worker does (restarts, stall detection, metrics), talks to it over its own
  pipes, and the engine also listens on a Unix socket that the owner announces in the share;
* **the other workers** connect to that socket: two connections each (:func:`connect`), requests one
  way and events the other, the same messages as the owner's pipes, so the same code reads them. Their
  rows are batched with everyone's in the one engine;
* **a worker that loses the engine** (it died and is being restarted, or the owner worker itself
  died and took it along) fails the rows it had in flight with ``EngineDied``, as a lone worker does,
  and reconnects; if nobody holds the lock any more it takes the lock and starts the engine itself.
  Requests that arrive meanwhile wait, within their timeout.

Only the owner receives the engine's metric observations, so counters summed across workers count
each token once. An engine that is closing refuses other workers' new requests at once
(``EngineClosed``). The socket, lock and key live in a per-user folder only its owner can enter; a
connection must also prove it knows the key (``multiprocessing``'s HMAC handshake) before a single
message is unpickled. :class:`Channels` is the engine's side. Core module: standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
import queue
import secrets
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from lmforge.serving.frames import Frames
from lmforge.serving.messages import Hello, Ready

log = logging.getLogger("lmforge.serving")

HANDSHAKE_S = 10.0  # a connection that does not say who it is within this long is dropped
MAX_BACKLOG = 64 << 20  # events a worker has not read, in bytes, before it is cut off
MAX_HALVES = 64  # connections waiting for their other half


class NoEngine(RuntimeError):
    """No engine listens on the share now (it is starting, restarting, or nobody started it)."""


@dataclass(eq=False)
class EngineShare:
    """Where the web processes of one server meet their engine, in a per-user 0700 folder:
    ``<name>.lock`` (held by the owner) and ``<name>.addr`` (the current engine's socket path and
    connection key, written by the owner for each engine it starts: every engine listens on a socket
    of its own, so an old engine going away never removes a new one's)."""

    folder: Path
    name: str
    _lock_fd: int | None = field(default=None, repr=False)

    @classmethod
    def for_server(cls, model_dir: str | os.PathLike, server: int | None = None) -> EngineShare:
        """The share of the workers of one server (``server``: the process that started them, by
        default this process's parent) serving one model folder."""
        server = os.getppid() if server is None else server
        digest = hashlib.sha256(f"{Path(model_dir).resolve()}\0{server}".encode()).hexdigest()[:16]
        return cls(Path(tempfile.gettempdir()) / f"lmforge-{os.getuid()}", f"engine-{digest}")

    @property
    def owner(self) -> bool:
        return self._lock_fd is not None

    @property
    def _addr(self) -> Path:
        return self.folder / f"{self.name}.addr"

    def _ensure_folder(self) -> None:
        self.folder.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(self.folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"{self.folder}: must be a folder of this user, closed to others (0700)")

    def try_own(self) -> bool:
        """Take the owner's lock if nobody holds it."""
        if self._lock_fd is not None:
            return True
        self._ensure_folder()
        fd = os.open(self.folder / f"{self.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def announce(self) -> tuple[str, bytes]:
        """(owner only) A fresh socket path and key for the engine about to start, published for the
        other workers; the previous engine's socket file, if one is left, is removed."""
        assert self.owner, "only the share's owner announces an engine"
        with contextlib.suppress(NoEngine, FileNotFoundError):
            os.unlink(self.address()[0])  # that engine is gone, or going
        path, key = str(self.folder / f"{self.name}-{secrets.token_hex(4)}.sock"), secrets.token_bytes(32)
        tmp = self._addr.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"socket": path, "key": key.hex()}))
        tmp.chmod(0o600)
        os.replace(tmp, self._addr)
        return path, key

    def address(self) -> tuple[str, bytes]:
        """The current engine's socket path and key; :class:`NoEngine` when none is announced."""
        try:
            record = json.loads(self._addr.read_text())
            return record["socket"], bytes.fromhex(record["key"])
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise NoEngine(f"no engine announced at {self._addr} ({type(exc).__name__})") from None

    def release(self) -> None:
        """(owner) Withdraw the announcement, then let go of the lock."""
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._addr.unlink()
            os.close(self._lock_fd)  # the lock goes with the descriptor
            self._lock_fd = None


class Link:
    """What a worker holds of an engine process it did not start: the two connections, standing in
    for the ``multiprocessing.Process`` of :class:`~lmforge.serving.supervision.ChildHandle`."""

    remote = True
    exitcode = None

    def __init__(self, pid: int, events: Connection) -> None:
        self.pid, self.events, self.closed = pid, events, False

    def is_alive(self) -> bool:
        """Not hung up on: a peek at the events socket (without reading) finds no end of stream.
        The supervisor so notices a lost engine even while this worker has no reader running."""
        if self.closed:
            return False
        try:
            with socket.socket(fileno=os.dup(self.events.fileno())) as sock:
                return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True  # nothing to read: still connected
        except OSError:
            return False

    def kill(self) -> None:
        """Count the engine as gone; the connections are closed with the handle
        (``EngineProcess._release``, after the event loop stops watching them), and the engine then
        cancels this worker's rows."""
        self.closed = True

    def join(self, timeout: float | None = None) -> None:
        pass


def connect(share: EngineShare, timeout_s: float = HANDSHAKE_S) -> tuple[Link, Connection, Connection, Ready]:
    """Join the engine announced on ``share``: (link, requests connection, events connection, its
    Ready). Raises :class:`NoEngine` when none listens, it refuses (a stale key while a new engine
    starts) or does not answer."""
    token = secrets.token_bytes(16)
    opened: list[Connection] = []
    try:
        address, key = share.address()
        for role in ("events", "requests"):
            conn = Client(address, family="AF_UNIX", authkey=key)
            opened.append(conn)
            conn.send(Hello(role, token))
        events, requests = opened
        if not events.poll(timeout_s):
            raise NoEngine(f"the engine at {address} did not answer within {timeout_s:g} s")
        ready = events.recv()
        if not isinstance(ready, Ready):
            raise NoEngine(f"the engine at {address} answered {type(ready).__name__}")
    except Exception as exc:  # no socket, refused, closed, a stale key (AuthenticationError), ...
        for conn in opened:
            conn.close()
        if isinstance(exc, NoEngine):
            raise
        raise NoEngine(f"no engine on {share.name} ({type(exc).__name__}: {exc})") from None
    return Link(ready.pid, events), requests, events, ready


# ---- the engine's side ------------------------------------------------------------------------


@dataclass(eq=False)
class Channel:
    """A worker joined to the engine: its requests come on ``requests``; its events go out on the
    non-blocking ``fd`` of ``events``, through ``backlog`` when the worker reads slower than the
    engine writes (the engine never waits for one worker)."""

    cid: int
    requests: Connection
    events: Connection
    backlog: bytearray = field(default_factory=bytearray)


class Channels:
    """The engine process's listener for other workers (:func:`connect`): a thread accepts and pairs
    connections; the engine's one thread takes the new channels between steps (``admit``), reads their
    requests and writes their events without ever blocking."""

    def __init__(self, address: str, key: bytes, ready: Ready) -> None:
        self.listener = Listener(address, family="AF_UNIX", authkey=key)
        self.ready, self.by_cid, self.by_conn = ready, {}, {}
        self.dropped: list[int] = []  # channels gone since the engine last looked (their rows to cancel)
        self._joined: queue.SimpleQueue = queue.SimpleQueue()
        self._halves: dict[bytes, Connection] = {}
        self._ids = iter(range(1, 1 << 62))  # 0 is the owner's pipe
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        threading.Thread(target=self._accept, name="lmforge-engine-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()  # the key's challenge is answered here, not on the engine
            except OSError:
                return  # the listener was closed
            except Exception as exc:  # a wrong key or a connection that hung up mid-handshake
                log.warning("engine socket: refused a connection (%s: %s)", type(exc).__name__, exc)
                continue
            try:
                hello = conn.recv() if conn.poll(HANDSHAKE_S) else None
            except (OSError, EOFError, pickle.UnpicklingError):
                hello = None
            if not isinstance(hello, Hello) or hello.role not in ("events", "requests"):
                conn.close()
                continue
            other = self._halves.pop(hello.token, None)
            if other is None:
                while len(self._halves) >= MAX_HALVES:  # halves whose other half never came
                    self._halves.pop(next(iter(self._halves))).close()
                self._halves[hello.token] = conn
                continue
            pair = (conn, other) if hello.role == "requests" else (other, conn)
            self._joined.put(pair)
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    def admit(self) -> None:
        """Take the workers that joined since the last call, each greeted with the engine's Ready."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 4096)
        while True:
            try:
                requests, events = self._joined.get_nowait()
            except queue.Empty:
                return
            channel = Channel(next(self._ids), requests, events)
            os.set_blocking(events.fileno(), False)
            self.by_cid[channel.cid] = channel
            self.by_conn[requests] = channel
            self.send(channel.cid, self.ready)

    @property
    def sources(self) -> list[Any]:
        return [self.wake_r, *self.by_conn]

    @property
    def backlogged(self) -> bool:
        return any(channel.backlog for channel in self.by_cid.values())

    def send(self, cid: int, message: Any) -> None:
        """Frame ``message`` as ``Connection.send`` does (:meth:`Frames.encode`) and write what the
        socket takes now."""
        channel = self.by_cid.get(cid)
        if channel is None:
            return
        channel.backlog += Frames.encode(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        self._write(channel)

    def flush(self) -> None:
        for channel in list(self.by_cid.values()):
            if channel.backlog:
                self._write(channel)

    def _write(self, channel: Channel) -> None:
        try:
            while channel.backlog:
                written = os.write(channel.events.fileno(), channel.backlog)
                del channel.backlog[:written]
        except BlockingIOError:
            if len(channel.backlog) > MAX_BACKLOG:
                log.error(
                    "worker channel %d read no events for %d MB: cutting it off",
                    channel.cid,
                    MAX_BACKLOG >> 20,
                )
                self.drop(channel)
        except OSError:
            self.drop(channel)

    def drop(self, channel: Channel) -> None:
        """Forget a worker (it hung up or was cut off); the caller cancels its rows."""
        if self.by_cid.pop(channel.cid, None) is not None:
            self.dropped.append(channel.cid)
        self.by_conn.pop(channel.requests, None)
        channel.backlog.clear()
        for conn in (channel.requests, channel.events):
            with contextlib.suppress(OSError):
                conn.close()

    def close(self, wait_s: float = 1.0) -> None:
        """Deliver what the workers have not read yet (within ``wait_s``), then hang up."""
        deadline = time.monotonic() + wait_s
        while self.backlogged and time.monotonic() < deadline:
            self.flush()
            time.sleep(0.01)
        for channel in list(self.by_cid.values()):
            self.drop(channel)
        with contextlib.suppress(OSError):
            self.listener.close()  # unlinks the socket
