"""``maskrcnn-serving serve``: the SageMaker serving entry point (gunicorn + the Flask app of ``server.py``).

SageMaker runs the container as ``<image> serve``; this listens on port 8080 and honours the seed containers'
variables: ``SM_MODEL_DIR`` (model directory), ``MODEL_SERVER_WORKERS`` (gunicorn workers, each loads its own
model copy), ``MODEL_SERVER_TIMEOUT`` (seconds, gunicorn's worker timeout). The model directory is validated in the
master BEFORE any worker is forked: a directory that cannot be loaded makes ``serve`` exit non-zero with the
loader's message instead of starting workers that can never become healthy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from gunicorn.app.base import BaseApplication

from maskrcnn_serving.commands import add_model_arguments

DEFAULT_PORT = 8080
DEFAULT_TIMEOUT = 70  # the seed's MODEL_SERVER_TIMEOUT default
DEFAULT_THREADS = 4


def _env_default(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="Run the SageMaker-compatible HTTP server (/ping, /invocations, /execution-parameters, /metrics).",
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="0.0.0.0", help="Address to bind (default 0.0.0.0, as in a container).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port (default 8080, SageMaker's).")
    parser.add_argument(
        "--workers", type=int, default=None,
        help="gunicorn worker processes, each with its own model copy (default: $MODEL_SERVER_WORKERS or 1).",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="Request threads per worker; decoding and encoding overlap, the model runs one call at a time "
        f"(default: $MODEL_SERVER_THREADS or {DEFAULT_THREADS}).",
    )
    parser.add_argument(
        "--timeout", type=int, default=None,
        help=f"gunicorn worker timeout in seconds (default: $MODEL_SERVER_TIMEOUT or {DEFAULT_TIMEOUT}).",
    )
    parser.add_argument("--max-request-bytes", type=int, default=None,
                        help="Request body limit (default: $MODEL_SERVER_MAX_REQUEST_BYTES or 6 MiB).")
    parser.add_argument("--max-response-bytes", type=int, default=None,
                        help="Response body limit (default: $MODEL_SERVER_MAX_RESPONSE_BYTES or 6 MiB).")
    parser.add_argument("--max-image-pixels", type=int, default=None,
                        help="Decompression-bomb guard (default: $MODEL_SERVER_MAX_IMAGE_PIXELS or 50,000,000).")
    parser.add_argument("--ready-wait", type=float, default=None,
                        help="Seconds an /invocations request waits for a worker that is still loading before "
                        "answering 503; /ping never waits (default: $MODEL_SERVER_READY_WAIT or 10).")
    parser.set_defaults(func=run)


def check_model_dir(backend: str, model_dir: str | None) -> str | None:
    """Load and validate the model directory in a child process (TensorFlow must not be imported in the gunicorn
    master before it forks). Returns the loader's error message, or None when the directory is servable."""
    result = subprocess.run(
        [sys.executable, "-m", "maskrcnn_serving.commands.serve", "--check-model-dir", backend, model_dir or ""],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 0:
        return None
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit code {result.returncode}"


def _apply_settings_to_env(args: argparse.Namespace, workers: int) -> None:
    """Workers read their settings from the environment (they build the app after the fork)."""
    pairs = {
        "SM_MODEL_DIR": args.model_dir,
        "MODEL_SERVER_BACKEND": args.backend,
        "MODEL_SERVER_WORKERS": workers,
        "MODEL_SERVER_MAX_REQUEST_BYTES": args.max_request_bytes,
        "MODEL_SERVER_MAX_RESPONSE_BYTES": args.max_response_bytes,
        "MODEL_SERVER_MAX_IMAGE_PIXELS": args.max_image_pixels,
        "MODEL_SERVER_READY_WAIT": args.ready_wait,
    }
    for name, value in pairs.items():
        if value is not None:
            os.environ[name] = str(value)


def run(args: argparse.Namespace) -> int:
    # Metrics from every worker, aggregated by whichever worker answers /metrics (see maskrcnn_serving.metrics).
    # The variable must be set before prometheus_client is first imported (it picks its storage then).
    own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="maskrcnn-metrics-")
    try:
        return _serve(args)
    finally:
        if own_metrics_dir:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)


def _serve(args: argparse.Namespace) -> int:
    from maskrcnn_serving.server import ServerSettings, configure_logging

    workers = args.workers or _env_default("MODEL_SERVER_WORKERS", 1)
    threads = args.threads or _env_default("MODEL_SERVER_THREADS", DEFAULT_THREADS)
    timeout = args.timeout or _env_default("MODEL_SERVER_TIMEOUT", DEFAULT_TIMEOUT)
    _apply_settings_to_env(args, workers)
    os.environ["MODEL_SERVER_TIMEOUT"] = str(timeout)  # workers derive their request deadline from it (guards.py)
    ServerSettings.from_env()  # fail fast on malformed MODEL_SERVER_* values
    configure_logging(args.log_level if args.log_level.upper() != "WARNING" else "INFO")

    error = check_model_dir(args.backend, os.environ.get("SM_MODEL_DIR"))
    if error is not None:
        print(f"error: cannot load the model: {error}", file=sys.stderr)
        return 2

    _GunicornServer(
        {
            "bind": f"{args.host}:{args.port}",
            "workers": workers,
            # gthread + a read timeout for slow clients and JSON for gunicorn's own errors (gunicorn_worker.py)
            "worker_class": "maskrcnn_serving.gunicorn_worker.GuardedThreadWorker",
            "threads": threads,
            "timeout": timeout,
            # SIGTERM drains in-flight requests for up to 25 s, so the master exits before SageMaker's 30 s SIGKILL
            "graceful_timeout": 25,
            "keepalive": 75,  # above the 60 s idle timeout of SageMaker's front end / typical load balancers
            "accesslog": None,  # the app logs one structured line per request
            "child_exit": _child_exit,
        }
    ).run()
    return 0


def _child_exit(server, worker) -> None:
    from maskrcnn_serving.metrics import mark_worker_dead

    mark_worker_dead(worker.pid)


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
        from maskrcnn_serving.server import create_app

        return create_app()


def _check_main(backend: str, model_dir: str) -> int:
    from maskrcnn_serving.backends.base import get_backend_class
    from maskrcnn_serving.errors import ModelLoadError
    from maskrcnn_serving.model_dir import load_model_dir

    try:
        get_backend_class(backend)
        load_model_dir(model_dir or None)
    except (ModelLoadError, ValueError) as exc:
        print(str(exc).replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--check-model-dir":
        sys.exit(_check_main(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m maskrcnn_serving.commands.serve --check-model-dir BACKEND MODEL_DIR")
