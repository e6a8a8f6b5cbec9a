"""The processes of ``serve`` (server/process.py): the children's environment and entry points, gunicorn's options,
the metrics directory, the model check, children that die with their parent, and the supervisor on real servers
(nginx dying stops the server; a ``serve`` killed outright takes every process with it). SIGTERM's orderly stop is
tested in tests/reliability/test_faults.py."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maskrcnn_serving.server import front, process
from maskrcnn_serving.settings import Settings
from testsupport.server import ServerProcess, children, gunicorn_master_pid

needs_nginx = pytest.mark.skipif(front.find_nginx() is None, reason="nginx is not installed (.ci/run installs it)")


def test_serve_gives_the_decoders_and_the_allocator_their_settings_at_start():
    """OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when it loads, and glibc MALLOC_ARENA_MAX when the process
    starts: ``serve`` starts the gunicorn master with them (the user's MALLOC_ARENA_MAX wins)."""
    assert process.process_environment(Settings(max_image_pixels=1234), {}) == {
        "OPENCV_IO_MAX_IMAGE_PIXELS": "1234", "MALLOC_ARENA_MAX": "2"}
    assert process.process_environment(Settings(), {"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "8"


def test_a_child_reads_back_the_settings_it_was_given():
    settings = Settings(workers=3, max_image_pixels=999, metrics_dir="/run/m", model_dir="/models/a")
    env = process.child_environment(settings, {"PATH": "/bin", "MODEL_SERVER_WORKERS": "1"})
    assert Settings.from_env(env) == settings  # the flags' values win over the caller's environment
    assert env["PATH"] == "/bin" and env["PROMETHEUS_MULTIPROC_DIR"] == "/run/m"
    assert env["OPENCV_IO_MAX_IMAGE_PIXELS"] == "999" and env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"


def test_gunicorn_options_follow_the_settings():
    options = process.gunicorn_options(Settings(workers=3, threads=2, timeout=40), "unix:/run/g.sock")
    assert (options["bind"], options["workers"], options["threads"], options["timeout"]) == ("unix:/run/g.sock", 3,
                                                                                             2, 40)
    assert options["worker_class"].endswith("gunicorn_worker.GuardedThreadWorker")
    assert "child_exit" not in options  # gunicorn takes no None for a hook

    def hook(server, worker) -> None:
        pass

    assert process.gunicorn_options(Settings(), "127.0.0.1:80", hook)["child_exit"] is hook
    # the drain fits SageMaker's 30 s between SIGTERM and SIGKILL
    assert options["graceful_timeout"] < process.SHUTDOWN_SECONDS < 30


def test_the_metrics_directory_lives_as_long_as_the_run(tmp_path):
    with process.metrics_directory(Settings()) as settings:
        made = Path(settings.metrics_dir)
        assert made.is_dir() and made.name.startswith("maskrcnn-metrics-")
    assert not made.exists()
    with process.metrics_directory(Settings(metrics_dir=str(tmp_path))) as settings:
        assert settings.metrics_dir == str(tmp_path)
    assert tmp_path.is_dir()  # the user's own directory stays


def test_a_child_gets_sigterm_when_its_parent_is_killed(tmp_path):
    """A parent process starts a child with ``die_with_parent`` and is SIGKILLed: the kernel sends the child SIGTERM
    (it records it), and the child is gone at once."""
    marker = tmp_path / "got"
    child = (f"import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w')"
             ".write('SIGTERM'), sys.exit(0))); print('up', flush=True); time.sleep(60)")
    parent = ("import subprocess, sys, time\n"
              "from maskrcnn_serving.server.process import die_with_parent\n"
              f"child = subprocess.Popen([sys.executable, '-c', {child!r}], preexec_fn=die_with_parent(),\n"
              "                         stdout=subprocess.PIPE, text=True)\n"
              "child.stdout.readline()\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    started = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(started.stdout.readline())
        started.kill()
        started.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _running(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child_pid)
        assert marker.read_text() == "SIGTERM"
    finally:
        started.kill()


def test_the_child_entry_points_refuse_a_wrong_call():
    for argv in ([], ["--run-gunicorn"], ["--check-model", "--run-gunicorn"]):
        result = subprocess.run([sys.executable, "-m", process.MODULE, *argv], capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 2 and "usage:" in result.stderr, argv
    malformed = subprocess.run([sys.executable, "-m", process.MODULE, "--check-model"], capture_output=True,
                               text=True, timeout=120, check=False, env={**os.environ, "MODEL_SERVER_WORKERS": "x"})
    assert malformed.returncode == 2 and "MODEL_SERVER_WORKERS" in malformed.stderr


def test_the_model_check_refuses_an_unknown_backend(demo_model_dir):
    error = process.check_model(Settings(model_dir=str(demo_model_dir), backend="nope"))
    assert error is not None and "Unknown backend 'nope'" in error


def test_the_model_check_opens_the_index_with_the_models_vector_length(tmp_path, demo_model_dir):
    """The check passes on the demo model with an index of its vectors' length (the backend's own definition), and
    refuses an index of another length before anything starts."""
    from maskrcnn_serving.backends.base import Backend
    from maskrcnn_serving.model_dir import load_model_dir
    from maskrcnn_serving.search import database
    from maskrcnn_serving.search.index import InstanceIndex

    db = str(tmp_path / "instances.db")
    dim = Backend.embedding_dim_of(load_model_dir(demo_model_dir, environ={}))
    try:
        InstanceIndex.open(db, "right", dim=dim, image_dim=8, create=True).close()
        InstanceIndex.open(db, "wrong", dim=dim + 1, image_dim=8, create=True).close()
        settings = Settings(model_dir=str(demo_model_dir), index=db)
        assert process.check_model(dataclasses.replace(settings, index_collection="right")) is None
        error = process.check_model(dataclasses.replace(settings, index_collection="wrong"))
        assert error is not None and f"holds vectors of {dim + 1} values; this model's have {dim}" in error
    finally:
        database.stop_local_servers()


# ---------------------------------------------------------------------------------------------- real servers


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited child waiting to be reaped holds nothing: it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *_descendants(child)]
    return found


def _command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


@needs_nginx
def test_serve_stops_when_nginx_dies(tmp_path, demo_model_dir):
    """nginx killed under a running server: ``serve`` stops gunicorn and nginx's orphaned workers and exits 1
    instead of running unreachable."""
    server = ServerProcess(demo_model_dir, tmp_path / "server.log", workers=1, front="nginx").start()
    try:
        deadline = time.monotonic() + 120
        while "serving through nginx" not in server.log():
            assert server.alive() and time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.2)
        master = gunicorn_master_pid(server.process.pid)
        nginx = [pid for pid in children(server.process.pid) if pid != master]
        assert len(nginx) == 1
        nginx_workers = children(nginx[0])
        assert nginx_workers
        os.kill(nginx[0], signal.SIGKILL)
        assert server.process.wait(timeout=60) == 1
        assert '"message": "nginx exited"' in server.log()
        with pytest.raises(ProcessLookupError):
            os.kill(master, 0)
        # a killed master leaves its workers holding the port: serve stops them
        assert not [worker for worker in nginx_workers if _running(worker)]
    finally:
        server.stop(graceful=False)


# nginx goes at once; gunicorn's workers stop within a second and their interpreter's teardown (TensorFlow's) takes
# a few more: 2-5 s in all here. Well below the 25 s a worker stuck in its graceful stop would take.
KILLED_SERVE_SECONDS = 15.0


@needs_nginx
def test_a_killed_serve_takes_every_process_with_it(tmp_path, demo_model_dir):
    """``serve`` (the demo model, 2 workers, nginx in front, an instance index in a Milvus Lite folder) SIGKILLed
    once ready: nothing is left to stop it in order, yet within seconds the nginx master and workers, the gunicorn
    master and workers and the index database are gone and the port is free (the kernel's parent-death signal,
    server/process.py)."""
    from maskrcnn_serving.backends.base import Backend
    from maskrcnn_serving.model_dir import load_model_dir
    from maskrcnn_serving.search import database
    from maskrcnn_serving.search.index import InstanceIndex

    db = str(tmp_path / "instances.db")
    dim = Backend.embedding_dim_of(load_model_dir(demo_model_dir, environ={}))
    InstanceIndex.open(db, dim=dim, image_dim=8, create=True).close()
    database.stop_local_servers()  # serve takes the database over
    server = ServerProcess(demo_model_dir, tmp_path / "server.log", workers=2, front="nginx",
                           flags=["--index", db]).start()
    processes: dict[int, str] = {}
    left_behind: list[Path] = []  # serve's temporary directories, which a killed serve cannot remove
    try:
        server.wait_ready(timeout=240)
        processes.update((pid, _command(pid)) for pid in _descendants(server.process.pid))
        master = gunicorn_master_pid(server.process.pid)
        nginx = [pid for pid, command in processes.items() if command.startswith("nginx")]
        assert len(nginx) == 3 and sum("nginx: worker" in processes[pid] for pid in nginx) == 2, processes
        server_workers = server.worker_pids()
        assert server_workers < set(processes) and len(server_workers) == 2
        index_database = database.server_pid(database.check_local_path(db))
        assert index_database in children(server.process.pid) and "search.lite_server" in processes[index_database]
        assert set(processes) == {master, *nginx, *server_workers, index_database}, processes
        socket_path = processes[master].split("--bind unix:", 1)[1].split()[0]
        metrics_dir = next(entry.split(b"=", 1)[1].decode() for entry in Path(f"/proc/{master}/environ").read_bytes()
                           .split(b"\0") if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
        left_behind += [Path(socket_path).parent, Path(metrics_dir)]
        killed = time.monotonic()
        server.process.kill()  # serve alone: not its process group
        server.process.wait(timeout=10)
        gone: dict[int, float] = {}  # pid -> seconds after the SIGKILL
        while len(gone) < len(processes) and time.monotonic() - killed < 60:
            gone.update((pid, time.monotonic() - killed) for pid in processes if pid not in gone and not _running(pid))
            time.sleep(0.05)
        gone_after = max(gone.values(), default=0.0)
        left = {pid: processes[pid] for pid in processes if pid not in gone}
        assert left == {} and gone_after < KILLED_SERVE_SECONDS, (round(gone_after, 2), left, server.log()[-3000:])
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", server.port)) != 0  # nothing listens
        with socket.socket() as listener:  # and a new server can listen on the port (as nginx does: SO_REUSEADDR)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", server.port))
            listener.listen()
        roles = {"nginx": nginx, "gunicorn workers": server_workers, "gunicorn master": [master],
                 "index database": [index_database]}
        print(f"killed serve: {len(processes)} processes gone after {gone_after:.2f} s;",
              ", ".join(f"{role} {max(gone[pid] for pid in pids):.2f} s" for role, pids in roles.items()))
    finally:
        server.stop(graceful=False)
        for pid in filter(_running, processes):  # whatever a failure left behind
            os.kill(pid, signal.SIGKILL)
        for directory in left_behind:
            shutil.rmtree(directory, ignore_errors=True)
