"""``maskrcnn-serving export``: write a TensorFlow SavedModel of the model directory for TensorFlow Serving."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from maskrcnn_serving.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="Write a SavedModel (encoded image bytes or an RGB image tensor in; boxes, scores, labels, masks out) "
        "that TensorFlow Serving can load.",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="Model directory with the checkpoint and optional config.json (default: $SM_MODEL_DIR or /opt/ml/model).",
    )
    parser.add_argument(
        "--output", type=Path, required=True,
        help="New directory for the SavedModel. TensorFlow Serving wants <base>/<model name>/<version number>.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskrcnn_serving.model_dir import load_model_dir
    from maskrcnn_serving.modeling.saved_model import export_saved_model

    bundle = load_model_dir(Settings.from_env(os.environ, model_dir=args.model_dir).model_dir)
    try:
        output = export_saved_model(bundle, args.output)
    except FileExistsError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(f"SavedModel written to {output} (signatures: serving_default = encoded images, detect_images = RGB uint8)")
    return 0
