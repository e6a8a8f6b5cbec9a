"""``maskrcnn-serving serve``: the SageMaker serving entry point (gunicorn + the Flask app of ``server/app.py``).

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
from collections.abc import Mapping

from gunicorn.app.base import BaseApplication

from maskrcnn_serving.commands import add_model_arguments
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


def _serve(args: argparse.Namespace) -> int:
    # Imported once PROMETHEUS_MULTIPROC_DIR is set (prometheus_client picks its storage at import; the workers
    # inherit this module), and not inside gunicorn's child-exit signal handler, where an import can re-enter.
    from prometheus_client import multiprocess

    from maskrcnn_serving.server.logs import configure_logging

    def _mark_worker_dead(server, worker) -> None:
        """Tell the multiprocess metrics that a worker is gone."""
        multiprocess.mark_process_dead(worker.pid)

    try:
        settings = resolve_settings(args, os.environ)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.update(worker_environment(settings, os.environ))
    configure_logging(args.log_level if args.log_level.upper() != "WARNING" else "INFO")

    error = check_model_dir(settings.backend, settings.model_dir)
    if error is not None:
        print(f"error: cannot load the model: {error}", file=sys.stderr)
        return 2

    _GunicornServer(
        {
            "bind": f"{args.host}:{args.port}",
            "workers": settings.workers,
            # gthread + a read timeout for slow clients and JSON for gunicorn's own errors (gunicorn_worker.py)
            "worker_class": "maskrcnn_serving.server.gunicorn_worker.GuardedThreadWorker",
            "threads": settings.threads,
            "timeout": settings.timeout,
            # SIGTERM drains in-flight requests for up to 25 s, so the master exits before SageMaker's 30 s SIGKILL
            "graceful_timeout": 25,
            "keepalive": 75,  # above the 60 s idle timeout of SageMaker's front end / typical load balancers
            "accesslog": None,  # the app logs one structured line per request
            "child_exit": _mark_worker_dead,
        }
    ).run()
    return 0




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
