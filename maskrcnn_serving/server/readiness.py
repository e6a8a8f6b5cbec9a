"""Whether the server can serve, for ``GET /ping``: each worker's state, and the answer made from them.

SageMaker counts a ``/ping`` slower than 2 s as a failure and replaces the instance, so ``/ping`` must never wait
behind inference. It is therefore answered from files, not by a request thread:

* each worker publishes its model's state (:class:`WorkerReadiness`: ``loading``, ``warming_up``, ``ready`` or
  ``failed``, with the message a client gets) as ``DIR/workers/<pid>.json``, and withdraws it when it starts to
  exit;
* ``serve``'s supervisor (:mod:`.process`) gathers them every :data:`REFRESH_SECONDS` (:class:`ReadinessBoard`),
  counting only workers that are live children of the gunicorn master (a killed worker counts as gone at once,
  before gunicorn reaps it), and writes the answer: ``DIR/ready.json`` (the 200 body) while one worker or more is
  ready, and ``DIR/not_ready.json`` (the 503 body, saying why) always;
* nginx answers ``/ping`` from those two files itself (``nginx.conf.template``), so no ping reaches gunicorn; with
  gunicorn alone, each worker answers it on a thread of its own that no other request can take
  (:mod:`.gunicorn_worker`), from the same files (:func:`read_answer`).

``DIR`` is ``Settings.readiness_dir``, made by ``serve`` for its run. An app built without one (tests, in-process
use) answers from its own worker's state (:func:`answer_of`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from maskrcnn_serving.errors import NotReady, error_body

REFRESH_SECONDS = 0.1  # how often the supervisor gathers the workers' states (its supervision loop)
READY_FILE = "ready.json"  # the 200 body, present only while a worker can serve
NOT_READY_FILE = "not_ready.json"  # the 503 body, always present
WORKERS_DIR = "workers"
READY = "ready"
NO_WORKER = "No server worker is running (the server is starting, or its workers are being replaced)."
STOPPING = "The server is stopping."


@dataclass(frozen=True)
class WorkerState:
    """One worker's model: ``state`` (``loading``, ``warming_up``, ``ready``, ``failed``) and the message a client
    gets while it is not ready."""

    state: str
    message: str


@dataclass(frozen=True)
class PingAnswer:
    """The status and JSON body of ``GET /ping``."""

    status: int
    body: bytes


def answer_of(workers: Mapping[int, WorkerState], none_message: str = NO_WORKER) -> PingAnswer:
    """The answer for the live workers' states (by pid): 200 ``{"status": "ready", "workers": [pids]}`` (the ready
    ones) while one or more is ready; else 503 ``not_ready`` with the reason: a failed load first (it will not go
    away by itself), then the most advanced worker's state, or ``none_message`` without any worker."""
    ready = sorted(pid for pid, worker in workers.items() if worker.state == READY)
    if ready:
        return PingAnswer(200, json.dumps({"status": READY, "workers": ready}).encode())
    progress = ("failed", "warming_up", "loading")
    states = sorted(workers.values(), key=lambda w: progress.index(w.state) if w.state in progress else len(progress))
    message = states[0].message if states else none_message
    return PingAnswer(NotReady.status, error_body(NotReady.code, message))


def read_answer(directory: str | os.PathLike) -> PingAnswer:
    """The answer the supervisor last wrote in ``directory`` (what nginx serves)."""
    folder = Path(directory)
    try:
        return PingAnswer(200, (folder / READY_FILE).read_bytes())
    except FileNotFoundError:
        pass
    try:
        return PingAnswer(NotReady.status, (folder / NOT_READY_FILE).read_bytes())
    except FileNotFoundError:  # before the supervisor's first refresh
        return answer_of({})


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step: a reader (nginx) sees the old file or the new one, never part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class WorkerReadiness:
    """What one worker publishes in the readiness directory ``directory`` (module docstring)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.folder = Path(directory) / WORKERS_DIR

    def _path(self) -> Path:
        return self.folder / f"{os.getpid()}.json"  # the worker's own pid (read at each call: it is forked)

    def publish(self, worker: WorkerState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self._path(), json.dumps({"state": worker.state, "message": worker.message}).encode())

    def withdraw(self) -> None:
        """This worker no longer serves (it is exiting)."""
        self._path().unlink(missing_ok=True)


def live_child(pid: int, parent: int) -> bool:
    """Whether ``pid`` is a running (not zombie) child of ``parent``, from Linux's ``/proc/<pid>/stat``; without
    ``/proc`` (not Linux), whether it exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists() and _exists(pid)
    state, parent_pid = stat.rsplit(b")", 1)[1].split()[:2]  # after the command name, which may hold spaces
    return state not in (b"Z", b"X") and int(parent_pid) == parent


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ReadinessBoard:
    """The supervisor's side: gathers the workers' states in ``directory`` and writes the answer to ``/ping``
    (module docstring); :meth:`refresh` rewrites the files only when the answer changes."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        (self.directory / WORKERS_DIR).mkdir(parents=True, exist_ok=True)
        self.answer: PingAnswer | None = None
        self.publish(answer_of({}))

    def workers(self, master: int | None) -> dict[int, WorkerState]:
        """The states of the live children of the gunicorn master ``master`` (none without a master); the files of
        workers that are gone are removed."""
        states = {}
        for path in (self.directory / WORKERS_DIR).glob("*.json"):
            try:
                pid = int(path.stem)
            except ValueError:
                continue
            if master is None or not live_child(pid, master):
                path.unlink(missing_ok=True)
                continue
            try:
                document = json.loads(path.read_bytes())
                states[pid] = WorkerState(str(document["state"]), str(document["message"]))
            except (OSError, ValueError, KeyError, TypeError):  # withdrawn meanwhile
                continue
        return states

    def refresh(self, master: int | None) -> PingAnswer:
        """Gather the workers of ``master`` and publish the answer."""
        return self.publish(answer_of(self.workers(master)))

    def stopping(self) -> None:
        """The server is stopping: 503 from now on, whatever the workers say."""
        self.publish(answer_of({}, STOPPING))

    def publish(self, answer: PingAnswer) -> PingAnswer:
        if answer == self.answer:
            return answer
        ready, not_ready = self.directory / READY_FILE, self.directory / NOT_READY_FILE
        if answer.status == 200:
            _write_atomically(ready, answer.body)
        else:  # the reason first, then the ready file goes: a reader always finds one of the two
            _write_atomically(not_ready, answer.body)
            ready.unlink(missing_ok=True)
        self.answer = answer
        return answer
