"""CLI subcommands; each module defines ``register(subparsers)``."""

from __future__ import annotations

import argparse
import os

from maskrcnn_serving.backends.base import BACKENDS


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model-dir and --backend, shared by every command that loads a model."""
    parser.add_argument(
        "--model-dir",
        default=None,
        help="Model directory with the checkpoint and optional config.json (default: $SM_MODEL_DIR or /opt/ml/model).",
    )
    parser.add_argument(
        "--backend",
        default=os.environ.get("MODEL_SERVER_BACKEND") or "tensorpack",
        choices=sorted(BACKENDS),
        help="Inference backend (default: $MODEL_SERVER_BACKEND or tensorpack).",
    )
