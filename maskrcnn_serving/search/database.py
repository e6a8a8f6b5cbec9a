"""Where the instance index lives: a Milvus server or cluster (``http://host:19530``), or Milvus Lite, an embedded
database in one local folder (``out/instances.db``), shared by every process that uses it.

Milvus Lite holds a lock on its folder: a second process that opens the same folder directly fails ("Open local
milvus failed"). So a local database is always served by ONE Milvus Lite process (``python -m milvus_lite server``
on a loopback port), and every user of the folder -- the server's workers, ``index build`` running beside it, a
notebook -- connects to that process. The first user starts it and writes its address next to the folder
(``<folder>.endpoint``); later users find it there. When its owner exits, the process stops; a user whose
connection then fails calls :func:`connect` again and becomes the new owner (the data is on disk).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from maskrcnn_serving.errors import DatabaseError

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("http", "https", "tcp", "grpc")
START_TIMEOUT_SECONDS = 60.0


@dataclass
class LocalServer:
    """The Milvus Lite process of one folder, started by this process."""

    folder: Path
    process: subprocess.Popen
    uri: str
    owner_pid: int

    def stop(self) -> None:
        if os.getpid() != self.owner_pid:  # a forked child (a server worker) inherited the record, not the process
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        endpoint = endpoint_file(self.folder)
        if _read_endpoint(endpoint).get("pid") == self.process.pid:
            endpoint.unlink(missing_ok=True)


_owned: dict[Path, LocalServer] = {}


def is_remote(db: str) -> bool:
    return urlsplit(db).scheme in REMOTE_SCHEMES


def endpoint_file(folder: Path) -> Path:
    return folder.with_name(folder.name + ".endpoint")


def check_local_path(db: str) -> Path:
    """The folder of a Milvus Lite database, validated without writing anything."""
    if not db or "\0" in db:
        raise DatabaseError("--db is empty; give a folder such as out/instances.db or a URL http://host:19530.")
    if "://" in db:
        raise DatabaseError(f"--db {db!r}: unsupported URL scheme; use http://host:19530 for a Milvus server.")
    folder = Path(db).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise DatabaseError(f"--db {db}: exists and is not a Milvus Lite database folder.")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "collections").is_dir():
        raise DatabaseError(f"--db {db}: this folder holds other files, not a Milvus Lite database.")
    if not folder.parent.is_dir():
        raise DatabaseError(f"--db {db}: the folder {folder.parent} does not exist.")
    if not os.access(folder.parent, os.W_OK) and not folder.is_dir():
        raise DatabaseError(f"--db {db}: cannot create a database in {folder.parent} (not writable).")
    return folder


def connect(db: str, timeout: float = 10.0):
    """A ``pymilvus.MilvusClient`` for ``db``: a URL of a Milvus server or cluster, or a local Milvus Lite folder
    (served by one shared process, started here when none runs). Raises :class:`DatabaseError`."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    uri = db if is_remote(db) else local_uri(check_local_path(db))
    try:
        return MilvusClient(uri=uri, timeout=timeout)
    except MilvusException as exc:
        raise DatabaseError(f"cannot reach the Milvus database at {db}: {exc.message}") from None


def local_uri(folder: Path) -> str:
    """The address of the Milvus Lite process serving ``folder``; starts one when none answers."""
    for _ in range(3):  # a race with another process starting the same folder is settled in one round
        running = _read_endpoint(endpoint_file(folder))
        if running and _answers(running["port"]) and _alive(running["pid"]):
            return f"http://127.0.0.1:{running['port']}"
        started = _start(folder)
        if started is not None:
            return started.uri
    raise DatabaseError(f"cannot start or reach the Milvus Lite database in {folder}; another process may hold it.")


def stop_local_servers() -> None:
    """Stop the Milvus Lite processes this process started."""
    for server in list(_owned.values()):
        server.stop()
    _owned.clear()


atexit.register(stop_local_servers)


def _start(folder: Path) -> LocalServer | None:
    """Start Milvus Lite on ``folder`` and publish its address; None when another process holds the folder."""
    port = _free_port()
    log_path = folder.with_name(folder.name + ".log")
    with open(log_path, "ab") as server_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(folder), "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    stop_at = time.monotonic() + START_TIMEOUT_SECONDS
    while not _answers(port):
        if process.poll() is not None:  # the folder is locked by another process (or broken): see its log
            log.info("Milvus Lite on %s exited (%s); see %s", folder, process.returncode, log_path)
            time.sleep(0.5)
            return None
        if time.monotonic() > stop_at:
            process.kill()
            raise DatabaseError(f"Milvus Lite did not start on {folder} within {START_TIMEOUT_SECONDS:.0f} s; "
                                f"see {log_path}.")
        time.sleep(0.1)
    server = LocalServer(folder, process, f"http://127.0.0.1:{port}", os.getpid())
    endpoint = endpoint_file(folder)
    temporary = endpoint.with_name(endpoint.name + f".{os.getpid()}")
    temporary.write_text(json.dumps({"pid": process.pid, "port": port}))
    temporary.replace(endpoint)
    _owned[folder] = server
    log.info("Milvus Lite serving %s on 127.0.0.1:%d (pid %d)", folder, port, process.pid)
    return server


def _read_endpoint(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data.get("port"), int) and isinstance(data.get("pid"), int) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
