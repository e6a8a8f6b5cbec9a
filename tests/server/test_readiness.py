"""server/readiness.py: the answer to /ping from the workers' states, what a worker publishes and withdraws, and the
supervisor's board, which counts only live children of the gunicorn master (real child processes here). nginx
answering from the files: test_front.py; the whole server: test_live_server.py, tests/reliability/test_faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from maskrcnn_serving.server import readiness
from maskrcnn_serving.server.readiness import ReadinessBoard, WorkerReadiness, WorkerState

LOADING = WorkerState("loading", "The model is loading.")
WARMING = WorkerState("warming_up", "The model is loaded and running its warm-up inference.")
FAILED = WorkerState("failed", "The model failed to load (ModelLoadError); the server log has the details.")
READY = WorkerState("ready", "ready")


def _error(answer: readiness.PingAnswer) -> dict:
    assert answer.status == 503
    return json.loads(answer.body)["error"]


def test_the_answer_is_200_while_a_worker_is_ready_else_the_most_telling_reason():
    assert readiness.answer_of({7: READY, 9: LOADING, 3: READY}) == readiness.PingAnswer(
        200, json.dumps({"status": "ready", "workers": [3, 7]}).encode())
    assert _error(readiness.answer_of({})) == {"code": "not_ready", "message": readiness.NO_WORKER}
    assert _error(readiness.answer_of({1: LOADING, 2: WARMING}))["message"] == WARMING.message
    assert _error(readiness.answer_of({1: WARMING, 2: FAILED}))["message"] == FAILED.message  # it will not pass
    assert _error(readiness.answer_of({}, readiness.STOPPING))["message"] == readiness.STOPPING


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_only_live_children_of_the_master_count():
    """A worker that is gone, a zombie (killed, not yet reaped by gunicorn) or another process's child counts as no
    worker, and its file is removed."""
    child = _sleeper()
    try:
        assert readiness.live_child(child.pid, os.getpid())
        assert not readiness.live_child(child.pid, os.getppid())  # someone else's child
        child.kill()
        deadline = time.monotonic() + 5
        while readiness.live_child(child.pid, os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not readiness.live_child(child.pid, os.getpid())  # a zombie: killed, not reaped yet
    finally:
        child.wait()
    assert not readiness.live_child(child.pid, os.getpid())  # reaped


def test_the_board_publishes_what_the_live_workers_say(tmp_path, monkeypatch):
    """Workers publish their states in their own files; the board answers from the live ones, rewrites the two files
    only when the answer changes, and says 503 with a reason at every moment (never no file)."""
    board = ReadinessBoard(tmp_path)
    assert readiness.read_answer(tmp_path) == readiness.answer_of({})  # before any worker
    first, second = _sleeper(), _sleeper()
    try:
        for child, state in ((first, WARMING), (second, READY)):
            monkeypatch.setattr(os, "getpid", lambda child=child: child.pid)  # what the worker itself would see
            WorkerReadiness(tmp_path).publish(state)
        monkeypatch.undo()
        (tmp_path / readiness.WORKERS_DIR / "stray.json").write_text("{}")  # not a worker's file: ignored
        assert board.refresh(os.getpid()) == readiness.answer_of({second.pid: READY})
        assert readiness.read_answer(tmp_path) == board.answer
        ready_file = tmp_path / readiness.READY_FILE
        written = ready_file.stat().st_mtime_ns
        time.sleep(0.01)
        board.refresh(os.getpid())
        assert ready_file.stat().st_mtime_ns == written  # unchanged answer, untouched file
        second.kill()
        second.wait()
        answer = board.refresh(os.getpid())
        assert _error(answer)["message"] == WARMING.message and not ready_file.exists()
        assert readiness.read_answer(tmp_path) == answer
        assert not (tmp_path / readiness.WORKERS_DIR / f"{second.pid}.json").exists()  # gone, so forgotten
        assert board.refresh(None) == readiness.answer_of({})  # no master: no worker
        board.stopping()
        assert _error(readiness.read_answer(tmp_path))["message"] == readiness.STOPPING
    finally:
        for child in (first, second):
            child.kill()
            child.wait()


def test_a_worker_withdraws_its_readiness(tmp_path):
    worker = WorkerReadiness(tmp_path)
    worker.publish(READY)
    path = tmp_path / readiness.WORKERS_DIR / f"{os.getpid()}.json"
    assert json.loads(path.read_text()) == {"state": "ready", "message": "ready"}
    worker.withdraw()
    worker.withdraw()  # twice: a signal and the end of the worker's loop
    assert not path.exists()
