"""CLI subcommands; each module defines ``register(subparsers)``. Helpers shared by the commands that load a model."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from maskrcnn_serving.backends.base import BACKENDS
from maskrcnn_serving.settings import Limits, Settings

# Files named on the command line are the user's own: no decompression-bomb guard, no request-size limits, TIFF too.
LOCAL_FILE_LIMITS = Limits(max_request_bytes=1 << 62, max_response_bytes=1 << 62, max_image_pixels=1 << 62,
                           max_images=1 << 30, tiff=True)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model-dir and --backend, shared by every command that loads a model."""
    parser.add_argument(
        "--model-dir",
        default=None,
        help="Model directory with the checkpoint and optional config.json (default: $SM_MODEL_DIR or /opt/ml/model).",
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=sorted(BACKENDS),
        help="Inference backend (default: $MODEL_SERVER_BACKEND or tensorpack).",
    )


def settings_from_args(args: argparse.Namespace, **overrides) -> Settings:
    """The process's settings (environment) with ``--model-dir`` / ``--backend`` and ``overrides`` applied."""
    return Settings.from_env(os.environ, model_dir=args.model_dir, backend=args.backend, **overrides)


def open_pipeline(settings: Settings, limits: Limits = LOCAL_FILE_LIMITS, environ: Mapping[str, str] | None = None):
    """Load the settings' model and backend and return its :class:`~maskrcnn_serving.pipeline.Pipeline`
    (``environ``: where the model config's ``CONFIG__*`` overrides are read; default the process's)."""
    from maskrcnn_serving.backends.base import load_backend
    from maskrcnn_serving.pipeline import Pipeline

    backend = load_backend(settings.backend, settings.model_dir, settings, environ)
    return Pipeline(backend, limits=limits)
