"""Where the instance index lives: a Milvus server or cluster (``http://host:19530``), or Milvus Lite, an embedded
database in one local folder (``out/instances.db``), shared by every process that uses it.

Milvus Lite holds a lock on its folder: a second process that opens the same folder directly fails. So a local
database is always served by ONE Milvus Lite process (:mod:`.lite_server`), and every user of the folder -- the
server's workers, ``index build`` running beside it, a notebook -- connects to that process.

**Only this user can reach it.** The process listens on a unix socket, never on a port: ``milvus.sock`` in the
folder's run directory, ``<folder>.run/`` beside it (mode 0700, owned by the user; where that path would be too long
for a socket, a directory named by the folder's hash under ``<tmp>/maskrcnn-serving-<uid>/``, also 0700). A
directory that is not the user's own, or that is a symbolic link, is refused. The run directory also holds
``server.json`` (the process's pid) and ``milvus.log``; the process creates its files private (umask 077): a
database folder it creates is 0700. docs/security.md.

**Who starts it.** :func:`local_uri` starts the process when none answers, and the process that started it owns it:
it stops it on exit (:func:`stop_local_servers`, run at exit), and the process dies with its owner anyway (Linux's
parent-death signal, :func:`maskrcnn_serving.lifetime.die_with_parent`). ``maskrcnn-serving serve`` starts it in its
own process, before any worker, and starts it again if it dies (:func:`keep_local_server`); the server's workers
only connect (``start=False``) and wait for it, so no worker ever owns a database process.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from maskrcnn_serving.errors import DatabaseError, DatabaseUnavailable
from maskrcnn_serving.lifetime import die_with_parent

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("http", "https", "tcp", "grpc")
START_TIMEOUT_SECONDS = 60.0
STOP_SECONDS = 5.0  # for the process to stop after SIGTERM before it is killed
SOCKET_NAME = "milvus.sock"
MAX_SOCKET_PATH = 107  # bytes: sockaddr_un.sun_path holds 108, with its terminating NUL
PRIVATE = 0o700


@dataclass
class LocalServer:
    """The Milvus Lite process of one folder, started by this process."""

    folder: Path
    process: subprocess.Popen
    socket: Path
    owner_pid: int

    @property
    def uri(self) -> str:
        return f"unix:{self.socket}"

    def stop(self) -> None:
        """SIGTERM (and SIGCONT, should it be stopped), then SIGKILL after ``STOP_SECONDS``; forget its pid file."""
        if os.getpid() != self.owner_pid:  # a forked child inherited the record, not the process
            return
        if self.process.poll() is None:
            self.process.terminate()
            self.process.send_signal(signal.SIGCONT)
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        pid_file = self.socket.with_name("server.json")
        if _read_pid(pid_file) == self.process.pid:
            pid_file.unlink(missing_ok=True)


_owned: dict[Path, LocalServer] = {}


def is_remote(db: str) -> bool:
    return urlsplit(db).scheme in REMOTE_SCHEMES


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


def connect(db: str, timeout: float = 10.0, start: bool = True):
    """A ``pymilvus.MilvusClient`` for ``db``: a URL of a Milvus server or cluster, or a local Milvus Lite folder
    (served by one shared process; with ``start``, started here when none runs). A client of its own (not pymilvus's
    shared connection), so that closing it closes its channel. Raises :class:`DatabaseUnavailable` when the database
    does not answer within ``timeout`` seconds, :class:`DatabaseError` for a ``db`` that cannot be used."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    uri = db if is_remote(db) else local_uri(check_local_path(db), start)
    try:
        return MilvusClient(uri=uri, timeout=timeout, dedicated=True)
    except MilvusException as exc:
        raise DatabaseUnavailable(f"cannot reach the Milvus database at {db}: {exc.message}") from None


# ------------------------------------------------------------------------------------------ the local process


def run_directory(folder: Path) -> Path:
    """The private directory of ``folder``'s socket, pid file and log (module docstring)."""
    beside = folder.with_name(folder.name + ".run")
    if len(os.fsencode(beside / SOCKET_NAME)) <= MAX_SOCKET_PATH:
        return beside
    digest = hashlib.sha256(os.fsencode(folder)).hexdigest()[:32]
    return Path(tempfile.gettempdir()) / f"maskrcnn-serving-{os.getuid()}" / digest


def local_uri(folder: Path, start: bool = True) -> str:
    """The address (``unix:PATH``) of the Milvus Lite process serving ``folder``; with ``start``, starts one when
    none answers, else raises :class:`DatabaseUnavailable`."""
    run = run_directory(folder)
    for directory in ([run] if run.parent == folder.parent else [run.parent, run]):
        _private_directory(directory)
    path = run / SOCKET_NAME
    for _ in range(3):  # a race with another process starting the same folder is settled in one round
        if _answers(path):
            return f"unix:{path}"
        if not start:
            raise DatabaseUnavailable(f"no Milvus Lite process serves {folder} (yet)")
        started = _start(folder, run)
        if started is not None:
            return started.uri
    raise DatabaseError(f"cannot start or reach the Milvus Lite database in {folder}; another process may hold it.")


def keep_local_server(folder: Path) -> LocalServer | None:
    """Make sure ``folder``'s database process runs: reap the one this process owns if it exited, and start one
    when none answers (whoever started the last). Returns the process this process owns now, if any; ``serve``
    calls it every second. Raises :class:`DatabaseError` when none can be started."""
    owned = _owned.get(folder)
    if owned is not None and owned.process.poll() is not None:
        log.warning("the Milvus Lite process of %s (pid %d) exited with status %s; starting it again", folder,
                    owned.process.pid, owned.process.returncode)
        del _owned[folder]
    if not _answers(run_directory(folder) / SOCKET_NAME):
        local_uri(folder)
    return _owned.get(folder)


def stop_local_servers() -> None:
    """Stop the Milvus Lite processes this process started."""
    for server in list(_owned.values()):
        server.stop()
    _owned.clear()


atexit.register(stop_local_servers)


def _start(folder: Path, run: Path) -> LocalServer | None:
    """Start Milvus Lite on ``folder`` (this process owns it); None when another process holds the folder."""
    path = run / SOCKET_NAME
    log_path = run / "milvus.log"
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as server_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "maskrcnn_serving.search.lite_server", "--data-dir", str(folder),
             "--socket", str(path)],
            stdout=server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(),
        )
    stop_at = time.monotonic() + START_TIMEOUT_SECONDS
    while not _answers(path):
        if process.poll() is not None:  # the folder is locked by another process (or broken): see its log
            log.info("Milvus Lite on %s exited (%s); see %s", folder, process.returncode, log_path)
            time.sleep(0.5)
            return None
        if time.monotonic() > stop_at:
            process.kill()
            process.wait()
            raise DatabaseError(f"Milvus Lite did not start on {folder} within {START_TIMEOUT_SECONDS:.0f} s; "
                                f"see {log_path}.")
        time.sleep(0.05)
    server = LocalServer(folder, process, path, os.getpid())
    pid_file = run / "server.json"
    temporary = run / f"server.json.{os.getpid()}"
    temporary.write_text(json.dumps({"pid": process.pid, "owner": os.getpid()}))
    temporary.replace(pid_file)
    _owned[folder] = server
    log.info("Milvus Lite serving %s on unix:%s (pid %d)", folder, path, process.pid)
    return server


def _private_directory(path: Path) -> Path:
    """``path`` as a directory only this user can enter: created with mode 0700, or checked to be a real directory
    owned by this user (mode set to 0700). Raises
    :class:`DatabaseError` for one another user owns or a symbolic link: its socket could be anyone's."""
    try:
        path.mkdir(mode=PRIVATE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DatabaseError(f"cannot create the database's run directory {path}: {exc.strerror}") from None
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise DatabaseError(f"{path} is not a directory of this user; refusing to use a database socket there "
                            "(remove it, or use another --db folder).")
    if stat.S_IMODE(info.st_mode) != PRIVATE:
        os.chmod(path, PRIVATE)
    return path


def _read_pid(path: Path) -> int | None:
    try:
        pid = json.loads(path.read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) else None


def server_pid(folder: Path) -> int | None:
    """The pid of the process serving ``folder``, as its starter recorded it (None when none did)."""
    return _read_pid(run_directory(folder) / "server.json")


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
