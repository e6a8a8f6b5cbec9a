"""``maskrcnn-serving serve``: the SageMaker serving entry point (gunicorn + the Flask app of ``server/app.py``,
behind nginx when it is installed).

SageMaker runs the container as ``<image> serve``; this listens on port 8080 and honours the seed containers'
variables: ``SM_MODEL_DIR`` (model directory), ``MODEL_SERVER_WORKERS`` (gunicorn workers, each loads its own
model copy), ``MODEL_SERVER_TIMEOUT`` (seconds, gunicorn's worker timeout). The model directory is validated
BEFORE anything starts: a directory that cannot be loaded makes ``serve`` exit non-zero with the loader's message
instead of starting workers that can never become healthy.

Processes: ``serve`` supervises two children. The gunicorn master (``python -m maskrcnn_serving.commands.serve
--run-gunicorn``, started with the environment the decoders and the allocator read when a process starts) and its
workers; and, with a front (``MODEL_SERVER_FRONT``, see :mod:`maskrcnn_serving.server.front`), nginx listening on
the port while gunicorn listens on a unix socket. On SIGTERM nginx stops listening and finishes the requests in
flight, then gunicorn stops; if either child exits on its own, ``serve`` stops the other and exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from gunicorn.app.base import BaseApplication

from maskrcnn_serving.commands import add_model_arguments
from maskrcnn_serving.server.front import FrontError, NginxFront, listen_address
from maskrcnn_serving.settings import Settings, setting_fields

DEFAULT_PORT = 8080


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="Run the SageMaker-compatible HTTP server (/ping, /invocations, /execution-parameters, /metrics).",
        description="Every setting below also comes from its environment variable (the flag wins); see "
        "docs/deployment.md.",
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="0.0.0.0", help="Address to bind (default 0.0.0.0, as in a container).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port (default 8080, SageMaker's).")
    for spec in setting_fields(flags_only=True):
        parser.add_argument(
            "--" + spec.name.replace("_", "-"), dest=spec.name, type=spec.metadata["parse"], default=None,
            help=f"{spec.metadata['help']} (default: ${spec.metadata['env']} or {spec.default})",
        )
    parser.set_defaults(func=run)


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """The server's settings: the environment, overridden by the flags given."""
    flags = {spec.name: getattr(args, spec.name) for spec in setting_fields(flags_only=True)}
    return Settings.from_env(environ, model_dir=args.model_dir, backend=args.backend, **flags)


def worker_environment(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """What the master adds to the workers' environment: the resolved settings (workers build their app after the
    fork and read them back), and on-demand GPU memory so that several workers share one GPU (read by TensorFlow
    when it initializes the GPU, for TF1 sessions and TF2 alike; an explicit TF_FORCE_GPU_ALLOW_GROWTH from the user
    wins)."""
    env = settings.to_env()
    if "TF_FORCE_GPU_ALLOW_GROWTH" not in environ:
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    return env


def check_model_dir() -> str | None:
    """Validate the model directory (and the instance index, if any) of the settings in this process's environment,
    in a child process (neither TensorFlow nor gRPC may be imported in the gunicorn master before it forks).
    Returns the error message, or None when the directory is servable."""
    result = subprocess.run(
        [sys.executable, "-m", "maskrcnn_serving.commands.serve", "--check-model-dir"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 0:
        return None
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit code {result.returncode}"


def run(args: argparse.Namespace) -> int:
    # Metrics from every worker, aggregated by whichever worker answers /metrics (see server/metrics.py).
    # The variable must be set before prometheus_client is first imported (it picks its storage then).
    own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="maskrcnn-metrics-")
    try:
        return _serve(args)
    finally:
        if own_metrics_dir:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)


# glibc malloc arenas per process (glibc's default is 8 per core): fewer arenas keep less freed memory
# (docs/reliability.md has the measurements); an explicit MALLOC_ARENA_MAX from the user wins.
MALLOC_ARENA_MAX = "2"


def process_environment(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """What the gunicorn master must find in its environment when it starts, because libraries read it once when
    they load: OpenCV's own pixel limit (``OPENCV_IO_MAX_IMAGE_PIXELS``; its decoders then refuse a larger image
    from the header they parse themselves, before they allocate) and glibc's arena count (``MALLOC_ARENA_MAX``)."""
    return {"OPENCV_IO_MAX_IMAGE_PIXELS": str(settings.max_image_pixels),
            "MALLOC_ARENA_MAX": environ.get("MALLOC_ARENA_MAX") or MALLOC_ARENA_MAX}


def gunicorn_options(settings: Settings, bind: str, child_exit=None) -> dict:
    """gunicorn's configuration for ``settings`` listening on ``bind``; ``child_exit``: gunicorn's hook."""
    return {
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
        "child_exit": child_exit,
    }


def _serve(args: argparse.Namespace) -> int:
    from maskrcnn_serving.server import front
    from maskrcnn_serving.server.logs import configure_logging

    try:
        settings = resolve_settings(args, os.environ)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.update(worker_environment(settings, os.environ))
    log_level = args.log_level if args.log_level.upper() != "WARNING" else "INFO"
    configure_logging(log_level)

    if settings.index:
        error = _start_index_database(settings.index)
        if error is not None:
            print(f"error: cannot open the index: {error}", file=sys.stderr)
            return 2
    error = check_model_dir()
    if error is not None:
        print(f"error: cannot load the model: {error}", file=sys.stderr)
        return 2
    try:
        nginx = front.choose(settings.front)
    except front.FrontError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _Supervisor(settings, args.host, args.port, nginx, log_level).run()


# SageMaker sends SIGTERM, then SIGKILL after 30 s: nginx finishes the requests in flight within the first part,
# gunicorn gets the rest.
SHUTDOWN_SECONDS = 28.0
GRACEFUL_SECONDS = 25


class _Supervisor:
    """Runs the gunicorn master and, with a front, nginx; stops them in order (module docstring)."""

    def __init__(self, settings: Settings, host: str, port: int, nginx: str | None, log_level: str) -> None:
        self.settings, self.host, self.port, self.nginx, self.log_level = settings, host, port, nginx, log_level
        self.signal: int | None = None
        self.front = None  # the running NginxFront
        self.log = logging.getLogger("maskrcnn_serving.serve")

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        with tempfile.TemporaryDirectory(prefix="maskrcnn-serve-") as runtime:
            runtime_dir = Path(runtime)
            socket_path = runtime_dir / "gunicorn.sock"
            bind = f"unix:{socket_path}" if self.nginx else listen_address(self.host, self.port)
            # The child's stderr is this process's Python stderr: the terminal even while the CLI keeps TensorFlow's
            # native noise out of sight (the child does the same for its own native output, ``quiet``).
            quiet = sys.stderr.fileno() != 2  # the CLI moved native output (fd 2) away from Python's stderr
            gunicorn = subprocess.Popen(
                [sys.executable, "-m", "maskrcnn_serving.commands.serve", "--run-gunicorn", bind, self.log_level,
                 "quiet" if quiet else "verbose"],
                env={**os.environ, **process_environment(self.settings, os.environ)}, stdin=subprocess.DEVNULL,
                stderr=sys.stderr,
            )
            try:
                if self.nginx:
                    if not self._wait_for(socket_path.exists, gunicorn, 60.0):
                        return self._stop(gunicorn)
                    self.front = NginxFront(self.nginx, self.settings, self.host, self.port, socket_path, runtime_dir)
                    self.front.check()
                    self.front.start()
                    self.log.info("serving through nginx", extra={"fields": {
                        "front": "nginx", "nginx_version": ".".join(map(str, self.front.version)),
                        "listen": listen_address(self.host, self.port), "gunicorn": bind,
                        "workers": self.settings.workers}})
                else:
                    self.log.info("serving with gunicorn alone", extra={"fields": {
                        "front": "none", "listen": bind, "workers": self.settings.workers,
                        "why": "MODEL_SERVER_FRONT=none" if self.settings.front == "none" else "nginx is not installed",
                        "note": "slow clients can hold request threads (docs/security.md)"}})
                self._wait_for(lambda: self.front is not None and self.front.poll() is not None, gunicorn, None)
            except FrontError as exc:
                print(f"error: {exc}", file=sys.stderr)
                self._stop(gunicorn)
                return 2
            except BaseException:
                self._stop(gunicorn)
                raise
            return self._stop(gunicorn)

    def _wait_for(self, condition, gunicorn: subprocess.Popen, timeout: float | None) -> bool:
        """Poll until ``condition()``; False when a signal came, gunicorn exited or ``timeout`` passed."""
        stop_at = None if timeout is None else time.monotonic() + timeout
        while self.signal is None and gunicorn.poll() is None:
            if condition():
                return True
            if stop_at is not None and time.monotonic() > stop_at:
                return False
            time.sleep(0.1)
        return False

    def _stop(self, gunicorn: subprocess.Popen) -> int:
        """nginx first (it stops listening and finishes the requests in flight, which gunicorn still serves), then
        gunicorn; the exit status says why ``serve`` stopped."""
        start = time.monotonic()
        # nginx gone while nobody asked the server to stop (a signal to the whole process group, e.g. Ctrl-C or
        # killpg, stops nginx too: that is a stop, not a failure)
        front_died = self.signal is None and self.front is not None and self.front.poll() is not None
        if front_died:
            self.log.error("nginx exited", extra={"fields": {"status": self.front.poll()}})
        if gunicorn.poll() is not None and self.signal is None:
            self.log.error("gunicorn exited", extra={"fields": {"status": gunicorn.poll()}})
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


class _GunicornServer(BaseApplication):
    """gunicorn run in-process with a settings dict; each worker builds its own app (no preload: TF and fork do
    not mix, and every worker must own its model)."""

    def __init__(self, options: dict) -> None:
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self):
        from maskrcnn_serving.server.app import create_app

        return create_app()


def _start_index_database(db: str) -> str | None:
    """For a local Milvus Lite index, start its one database process here, in the master, so that every worker
    connects to it (the master owns it and stops it on exit); nothing to do for a Milvus URL."""
    from maskrcnn_serving.search import database

    if database.is_remote(db):
        return None
    try:
        database.local_uri(database.check_local_path(db))
    except database.DatabaseError as exc:
        return str(exc)
    return None


def _check_main() -> int:
    from maskrcnn_serving.backends.base import get_backend_class
    from maskrcnn_serving.errors import ModelLoadError
    from maskrcnn_serving.model_dir import load_model_dir
    from maskrcnn_serving.modeling.constants import embedding_dim
    from maskrcnn_serving.search.database import DatabaseError

    settings = Settings.from_env(os.environ)
    try:
        get_backend_class(settings.backend).check_settings(settings)
        bundle = load_model_dir(settings.model_dir)
        if settings.index:
            from maskrcnn_serving.search.index import InstanceIndex

            architecture = bundle.architecture
            dim = embedding_dim(architecture.fpn_channels, architecture.num_categories)
            InstanceIndex.open(settings.index, settings.index_collection, dim=dim).close()
    except (ModelLoadError, DatabaseError, ValueError) as exc:
        print(str(exc).replace("\n", " "), file=sys.stderr)
        return 2
    return 0


def _run_gunicorn(bind: str, log_level: str, noise: str) -> int:
    """The gunicorn master (a child of ``serve``): the settings come from the environment ``serve`` gave it.
    ``noise``: ``quiet`` keeps TensorFlow's native start-up messages out of the log, as the CLI does."""
    import contextlib

    # Imported now that PROMETHEUS_MULTIPROC_DIR is set (prometheus_client picks its storage at import; the workers
    # inherit this module), and not inside gunicorn's child-exit signal handler, where an import can re-enter.
    from prometheus_client import multiprocess

    from maskrcnn_serving.cli import native_stderr_captured
    from maskrcnn_serving.server.logs import configure_logging

    def mark_worker_dead(server, worker) -> None:
        """Tell the multiprocess metrics that a worker is gone."""
        multiprocess.mark_process_dead(worker.pid)

    with native_stderr_captured() if noise == "quiet" else contextlib.nullcontext():
        configure_logging(log_level)
        _GunicornServer(gunicorn_options(Settings.from_env(os.environ), bind, mark_worker_dead)).run()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--check-model-dir"]:
        sys.exit(_check_main())
    if len(sys.argv) == 5 and sys.argv[1] == "--run-gunicorn":
        sys.exit(_run_gunicorn(sys.argv[2], sys.argv[3], sys.argv[4]))
    sys.exit("usage: python -m maskrcnn_serving.commands.serve --check-model-dir | "
             "--run-gunicorn BIND LOG_LEVEL quiet|verbose (settings from the environment)")
