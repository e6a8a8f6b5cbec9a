"""``maskrcnn-serving serve``: the SageMaker serving entry point (gunicorn + the Flask app of ``server/app.py``,
behind nginx when it is installed).

SageMaker runs the container as ``<image> serve``; this listens on port 8080 and honours the seed containers'
variables: ``SM_MODEL_DIR`` (model directory), ``MODEL_SERVER_WORKERS`` (gunicorn workers, each loads its own
model copy), ``MODEL_SERVER_TIMEOUT`` (seconds, gunicorn's worker timeout), and every other setting of
:class:`~maskrcnn_serving.settings.Settings` (each also a flag here). This command only turns the flags and the
environment into :class:`Settings` and hands them to :func:`maskrcnn_serving.server.process.serve`, which checks the
model directory BEFORE anything starts (a directory that cannot be loaded makes ``serve`` exit with 2 and the
loader's message instead of starting workers that can never become healthy) and then runs and supervises gunicorn
and nginx.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from maskrcnn_serving.commands import add_model_arguments
from maskrcnn_serving.errors import DatabaseError, FrontError
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


def run(args: argparse.Namespace) -> int:
    from maskrcnn_serving.server import process

    try:
        settings = resolve_settings(args, os.environ)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_level = args.log_level if args.log_level.upper() != "WARNING" else "INFO"  # the CLI's default: INFO here
    try:
        return process.serve(settings, args.host, args.port, log_level)
    except DatabaseError as exc:
        print(f"error: cannot open the index: {exc}", file=sys.stderr)
    except FrontError as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 2
