"""The processes of ``maskrcnn-serving serve``: the model check, gunicorn and nginx, and their supervisor.

The process tree::

    serve                        serve(): the CLI's process, the supervisor (Supervisor)
    |-- index database           with a local --index folder: python -m maskrcnn_serving.search.lite_server ...
    |-- model check              python -m maskrcnn_serving.server.process --check-model   (exits before the rest)
    |-- gunicorn master          python -m maskrcnn_serving.server.process --run-gunicorn --bind ADDRESS ...
    |   `-- workers              forked by the master; each builds its Flask app (server/app.py) and loads its model
    `-- nginx master             with a front (server/front.py): nginx on the port, gunicorn on a unix socket
        `-- nginx workers

What :func:`serve` does, in order:

1. **Metrics directory.** ``Settings.metrics_dir`` (``PROMETHEUS_MULTIPROC_DIR``), or a fresh directory made for
   this run and removed after it: every worker writes its samples there and ``/metrics`` sums them
   (:mod:`.metrics`).
2. **Index database.** With a local Milvus Lite ``--index``, its one database process is started here, in the
   process that outlives every worker, on a unix socket only this user can reach
   (:mod:`maskrcnn_serving.search.database`). ``serve`` owns it: it checks every second that it answers and starts
   it again when it does not (killed, crashed), and stops it after the workers. The workers never start one: they
   wait for this one (their search is unavailable meanwhile: :mod:`maskrcnn_serving.search.service`).
3. **Model check**, in a child process, before anything listens: the model directory must load and the index (if
   any) must hold vectors of the model's length; otherwise :func:`serve` raises :class:`ModelLoadError` and nothing
   starts. A child, because TensorFlow must not be imported here (this process forks its children) nor in the
   gunicorn master (which forks the workers).
4. **gunicorn**, then **nginx** once gunicorn's socket exists; both are supervised until a signal or until one of
   them exits. SIGTERM / SIGINT: nginx first (it stops listening and finishes the requests in flight, which gunicorn
   still serves), then gunicorn (its workers finish theirs), then the index database, and ``serve`` exits 0 within
   SageMaker's 30 s. A child that exits on its own stops the other, and ``serve`` exits non-zero (the container is
   restarted); the index database is not such a child: it is started again.
5. **Readiness.** While they run, the supervisor gathers the workers' states every 0.1 s and writes the answer to
   ``/ping`` in the run's readiness directory, which nginx (or, with gunicorn alone, each worker's ping thread)
   answers from (:mod:`.readiness`); from the first signal on, ``/ping`` says 503.

**Children die with serve.** Every child is started with Linux's parent-death signal (``PR_SET_PDEATHSIG``, kept
across ``exec``; :func:`maskrcnn_serving.lifetime.die_with_parent`): when ``serve`` ends in any way, SIGKILL
included, the kernel sends the index database, the model check, the gunicorn master and the nginx master SIGTERM.
nginx's master then stops its workers at once; gunicorn's master stops its workers as on any SIGTERM (its workers
also leave by themselves when their master is gone). So the port and the sockets are free again within seconds
(tests/server/test_process.py measures it).

**The children's interface** is this module's command line (``python -m maskrcnn_serving.server.process --help``).
Settings travel as environment variables (:meth:`Settings.to_env`, with :func:`worker_environment` and
:func:`process_environment`); each child reads them once with :meth:`Settings.from_env`, and gunicorn's workers
inherit the master's :class:`Settings` object when it forks them (they read no environment):

* ``--check-model``: load the model directory and open the index the settings name; exit status 0, or 2 with the
  reason as the last line of stderr (:func:`run_model_check`);
* ``--run-gunicorn --bind ADDRESS [--log-level LEVEL] [--quiet]``: the gunicorn master (:func:`run_gunicorn`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from gunicorn.app.base import BaseApplication

from maskrcnn_serving.errors import ModelLoadError
from maskrcnn_serving.lifetime import die_with_parent
from maskrcnn_serving.server import front
from maskrcnn_serving.server.logs import configure_logging
from maskrcnn_serving.server.readiness import REFRESH_SECONDS, ReadinessBoard
from maskrcnn_serving.settings import Settings

MODULE = "maskrcnn_serving.server.process"  # the children's entry point: python -m MODULE

# SageMaker sends SIGTERM, then SIGKILL after 30 s: nginx finishes the requests in flight within the first part,
# gunicorn gets the rest.
SHUTDOWN_SECONDS = 28.0
GRACEFUL_SECONDS = 25
SOCKET_WAIT_SECONDS = 60.0  # for gunicorn's unix socket to appear before nginx starts
DATABASE_CHECK_SECONDS = 1.0  # how often serve checks that the local index database answers
# glibc malloc arenas per process (glibc's default is 8 per core): fewer arenas keep less freed memory
# (docs/reliability.md has the measurements); an explicit MALLOC_ARENA_MAX from the user wins.
MALLOC_ARENA_MAX = "2"

log = logging.getLogger("maskrcnn_serving.serve")


# ------------------------------------------------------------------------------------------- the environment


def worker_environment(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """What the children add to their environment: the resolved settings (each child reads them back once), and
    on-demand GPU memory so that several workers share one GPU (read by TensorFlow when it initializes the GPU, for
    TF1 sessions and TF2 alike; an explicit TF_FORCE_GPU_ALLOW_GROWTH from the user wins)."""
    env = settings.to_env()
    if "TF_FORCE_GPU_ALLOW_GROWTH" not in environ:
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    return env


def process_environment(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """What the gunicorn master must find in its environment when it starts, because libraries read it once when
    they load: OpenCV's own pixel limit (``OPENCV_IO_MAX_IMAGE_PIXELS``; its decoders then refuse a larger image
    from the header they parse themselves, before they allocate) and glibc's arena count (``MALLOC_ARENA_MAX``)."""
    return {"OPENCV_IO_MAX_IMAGE_PIXELS": str(settings.max_image_pixels),
            "MALLOC_ARENA_MAX": environ.get("MALLOC_ARENA_MAX") or MALLOC_ARENA_MAX}


def child_environment(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a Python child of ``serve``: ``environ`` with the two above."""
    return {**environ, **worker_environment(settings, environ), **process_environment(settings, environ)}


# ---------------------------------------------------------------------------------------- the metrics, the index


@contextlib.contextmanager
def metrics_directory(settings: Settings) -> Iterator[Settings]:
    """``settings`` with a metrics directory: their own (kept), or a fresh one for this run (removed after it)."""
    if settings.metrics_dir:
        yield settings
        return
    directory = tempfile.mkdtemp(prefix="maskrcnn-metrics-")
    try:
        yield dataclasses.replace(settings, metrics_dir=directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class IndexDatabase:
    """The local Milvus Lite process of ``--index FOLDER``, owned by ``serve`` (module docstring, step 2); nothing
    to do for a Milvus URL or without an index. :meth:`keep` is called by the supervisor's loop, on the main thread
    (the database's parent-death signal is tied to the thread that starts it)."""

    def __init__(self, db: str | None) -> None:
        from maskrcnn_serving.search import database

        self.folder = None if not db or database.is_remote(db) else database.check_local_path(db)
        self._next_check = 0.0
        self._failures = 0

    def start(self) -> None:
        """Start it (or find it running). Raises :class:`~maskrcnn_serving.errors.DatabaseError`."""
        from maskrcnn_serving.search import database

        if self.folder is not None:
            database.keep_local_server(self.folder)

    def keep(self) -> None:
        """Every ``DATABASE_CHECK_SECONDS``: start it again if it does not answer (backing off while it cannot be
        started, and saying so in the log)."""
        from maskrcnn_serving.errors import DatabaseError
        from maskrcnn_serving.search import database

        if self.folder is None or time.monotonic() < self._next_check:
            return
        try:
            database.keep_local_server(self.folder)
            self._failures = 0
        except DatabaseError as exc:
            self._failures += 1
            log.error("the index database cannot be started", extra={"fields": {
                "folder": str(self.folder), "attempt": self._failures, "reason": str(exc)}})
        self._next_check = time.monotonic() + min(DATABASE_CHECK_SECONDS * 2 ** self._failures, 30.0)

    def stop(self) -> None:
        from maskrcnn_serving.search import database

        database.stop_local_servers()


@contextlib.contextmanager
def index_database(db: str | None) -> Iterator[IndexDatabase]:
    """The index database of ``db`` started for the block (:class:`IndexDatabase`) and stopped after it."""
    keeper = IndexDatabase(db)
    try:
        keeper.start()
        yield keeper
    finally:
        keeper.stop()


# ------------------------------------------------------------------------------------------- the model check


def check_model(settings: Settings) -> str | None:
    """Run the model check (``--check-model``) for ``settings`` in a child process; its error message, or None when
    the model directory (and the index) can be served."""
    result = subprocess.run(
        [sys.executable, "-m", MODULE, "--check-model"], env=child_environment(settings, os.environ),
        capture_output=True, text=True, check=False, preexec_fn=die_with_parent(),
    )
    if result.returncode == 0:
        return None
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit code {result.returncode}"


def run_model_check(settings: Settings) -> int:
    """The model check's child: load the bundle of ``settings`` (the checkpoint, strictly checked, without building
    the network) and open the index with the backend's vector length; 0, or 2 with the reason on stderr."""
    from maskrcnn_serving.backends.base import get_backend_class
    from maskrcnn_serving.errors import DatabaseError
    from maskrcnn_serving.model_dir import load_model_dir

    try:
        backend_class = get_backend_class(settings.backend)
        backend_class.check_settings(settings)
        bundle = load_model_dir(settings.model_dir)
        if settings.index:
            from maskrcnn_serving.search.index import InstanceIndex

            dim = backend_class.embedding_dim_of(bundle)
            InstanceIndex.open(settings.index, settings.index_collection, dim=dim, timeout=settings.index_timeout,
                               start_database=False).close()
    except (ModelLoadError, DatabaseError, ValueError) as exc:
        print(str(exc).replace("\n", " "), file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------------- gunicorn


def gunicorn_options(settings: Settings, bind: str, child_exit=None) -> dict:
    """gunicorn's configuration for ``settings`` listening on ``bind``; ``child_exit``: gunicorn's hook, if any."""
    options = {
        "bind": bind,
        "workers": settings.workers,
        # gthread + a read timeout for slow clients and JSON for gunicorn's own errors (gunicorn_worker.py)
        "worker_class": "maskrcnn_serving.server.gunicorn_worker.GuardedThreadWorker",
        "threads": settings.threads,
        "timeout": settings.timeout,
        # SIGTERM drains in-flight requests for up to 25 s, so the master exits before SageMaker's 30 s SIGKILL
        "graceful_timeout": GRACEFUL_SECONDS,
        "keepalive": 75,  # above the 60 s idle timeout of SageMaker's front end / typical load balancers
        "accesslog": None,  # the app logs one structured line per request
    }
    return options if child_exit is None else {**options, "child_exit": child_exit}


class GunicornApplication(BaseApplication):
    """gunicorn run in-process with the server's ``settings``; each worker builds its own app (no preload: TF and
    fork do not mix, and every worker must own its model). The worker class reads ``settings`` too."""

    def __init__(self, settings: Settings, options: dict) -> None:
        self.settings = settings
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self):
        from maskrcnn_serving.server.app import create_app

        return create_app(self.settings)


def run_gunicorn(settings: Settings, bind: str, log_level: str, quiet: bool) -> int:
    """The gunicorn master's child: gunicorn with ``settings`` on ``bind``. ``quiet`` keeps TensorFlow's native
    start-up messages out of the log, as the CLI does."""
    # Imported before gunicorn runs, with the metrics directory in the environment (prometheus_client picks its
    # storage at import; the workers inherit it), not inside gunicorn's child-exit signal handler, where an import
    # can re-enter.
    from maskrcnn_serving.native_stderr import native_stderr_captured
    from maskrcnn_serving.server import metrics

    def forget_worker(server, worker) -> None:
        metrics.forget_process(worker.pid, settings.metrics_dir)

    with native_stderr_captured() if quiet else contextlib.nullcontext():
        configure_logging(log_level)
        options = gunicorn_options(settings, bind, forget_worker if settings.metrics_dir else None)
        GunicornApplication(settings, options).run()
    return 0


# ----------------------------------------------------------------------------------------------- supervision


class Supervisor:
    """Runs the gunicorn master and, with ``nginx`` (its binary), nginx in front of it; stops them in order (module
    docstring). :meth:`run` returns ``serve``'s exit status."""

    def __init__(self, settings: Settings, host: str, port: int, nginx: str | None, log_level: str,
                 database: IndexDatabase | None = None) -> None:
        self.settings, self.host, self.port, self.nginx, self.log_level = settings, host, port, nginx, log_level
        self.database = database
        self.signal: int | None = None
        self.front: front.NginxFront | None = None
        self.readiness: ReadinessBoard | None = None

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            with tempfile.TemporaryDirectory(prefix="maskrcnn-serve-") as runtime:
                return self._run(Path(runtime))
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run(self, runtime_dir: Path) -> int:
        socket_path = runtime_dir / "gunicorn.sock"
        listen = front.listen_address(self.host, self.port)
        bind = f"unix:{socket_path}" if self.nginx else listen
        self.readiness = ReadinessBoard(runtime_dir / "readiness")
        self.settings = dataclasses.replace(self.settings, readiness_dir=str(self.readiness.directory))
        gunicorn = self._start_gunicorn(bind)
        try:
            if self.nginx:
                if not self._wait_for(socket_path.exists, gunicorn, SOCKET_WAIT_SECONDS):
                    return self._stop(gunicorn)
                self.front = front.NginxFront(self.nginx, self.settings, self.host, self.port, socket_path,
                                              runtime_dir, self.readiness.directory)
                self.front.check()
                self.front.start(preexec_fn=die_with_parent())
                log.info("serving through nginx", extra={"fields": {
                    "front": "nginx", "nginx_version": ".".join(map(str, self.front.version)), "listen": listen,
                    "gunicorn": bind, "workers": self.settings.workers}})
            else:
                log.info("serving with gunicorn alone", extra={"fields": {
                    "front": "none", "listen": bind, "workers": self.settings.workers,
                    "why": "MODEL_SERVER_FRONT=none" if self.settings.front == "none" else "nginx is not installed",
                    "note": "slow clients can hold request threads (docs/security.md)"}})
            self._wait_for(lambda: self.front is not None and self.front.poll() is not None, gunicorn, None)
        except BaseException:
            self._stop(gunicorn)
            raise
        return self._stop(gunicorn)

    def _start_gunicorn(self, bind: str) -> subprocess.Popen:
        # The child's stderr is this process's Python stderr: the terminal even while the CLI keeps TensorFlow's
        # native noise out of sight (the child does the same for its own native output, --quiet).
        quiet = sys.stderr.fileno() != 2  # the CLI moved native output (fd 2) away from Python's stderr
        command = [sys.executable, "-m", MODULE, "--run-gunicorn", "--bind", bind, "--log-level", self.log_level,
                   *(["--quiet"] if quiet else [])]
        return subprocess.Popen(command, env=child_environment(self.settings, os.environ), stdin=subprocess.DEVNULL,
                                stderr=sys.stderr, preexec_fn=die_with_parent())

    def _wait_for(self, condition: Callable[[], bool], gunicorn: subprocess.Popen, timeout: float | None) -> bool:
        """Poll until ``condition()``, publishing the workers' readiness at each turn; False when a signal came,
        gunicorn exited or ``timeout`` passed."""
        stop_at = None if timeout is None else time.monotonic() + timeout
        while self.signal is None and gunicorn.poll() is None:
            self.readiness.refresh(gunicorn.pid)
            if condition():
                return True
            if self.database is not None:
                self.database.keep()
            if stop_at is not None and time.monotonic() > stop_at:
                return False
            time.sleep(REFRESH_SECONDS)
        return False

    def _stop(self, gunicorn: subprocess.Popen) -> int:
        """nginx first (it stops listening and finishes the requests in flight, which gunicorn still serves), then
        gunicorn; the exit status says why ``serve`` stopped."""
        start = time.monotonic()
        self.readiness.stopping()  # /ping says 503 while nginx finishes the requests in flight
        # nginx gone while nobody asked the server to stop (it runs in a process group of its own, so a Ctrl-C or a
        # killpg of serve's group reaches serve, which stops it: that is a stop, not a failure)
        front_died = self.signal is None and self.front is not None and self.front.poll() is not None
        if front_died:
            log.error("nginx exited", extra={"fields": {"status": self.front.poll()}})
        if gunicorn.poll() is not None and self.signal is None:
            log.error("gunicorn exited", extra={"fields": {"status": gunicorn.poll()}})
        if self.front is not None:
            self.front.stop(timeout=GRACEFUL_SECONDS - 5)
        if gunicorn.poll() is None:
            gunicorn.send_signal(signal.SIGTERM)
            try:
                gunicorn.wait(timeout=max(1.0, SHUTDOWN_SECONDS - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                gunicorn.kill()
                gunicorn.wait()
        if front_died:
            return 1
        return gunicorn.returncode if gunicorn.returncode >= 0 else 1  # 0 after a graceful stop


def serve(settings: Settings, host: str, port: int, log_level: str = "INFO") -> int:
    """Run the server of ``settings`` on ``host:port`` until it is stopped; returns the exit status (0 after
    SIGTERM). Before anything listens, raises :class:`~maskrcnn_serving.errors.DatabaseError` (the index cannot be
    opened), :class:`ModelLoadError` (the model check failed) or
    :class:`~maskrcnn_serving.errors.FrontError` (the front cannot run)."""
    configure_logging(log_level)
    with metrics_directory(settings) as settings, index_database(settings.index) as database:
        error = check_model(settings)
        if error is not None:
            raise ModelLoadError(error)
        return Supervisor(settings, host, port, front.choose(settings.front), log_level, database).run()


# ------------------------------------------------------------------------------------- the children's entry point


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point of ``serve``'s Python children (module docstring); settings from the environment."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="The child processes of `maskrcnn-serving serve`, which starts them with the settings in the "
        "environment (the variables of `maskrcnn-serving serve --help`).")
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--check-model", action="store_true",
                      help="Load the model directory and open the index of the settings; exit status 0, or 2 with "
                      "the reason on the last line of stderr.")
    role.add_argument("--run-gunicorn", action="store_true", help="Run the gunicorn master and its workers.")
    parser.add_argument("--bind", help="With --run-gunicorn: gunicorn's address, unix:PATH or HOST:PORT.")
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default INFO).")
    parser.add_argument("--quiet", action="store_true",
                        help="Keep TensorFlow's native start-up messages out of the log, as the CLI does.")
    args = parser.parse_args(argv)
    if args.run_gunicorn and not args.bind:
        parser.error("--run-gunicorn needs --bind")
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.check_model:
        return run_model_check(settings)
    return run_gunicorn(settings, args.bind, args.log_level, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
