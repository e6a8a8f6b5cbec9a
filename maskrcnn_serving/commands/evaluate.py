"""``maskrcnn-serving eval``: COCO bbox / segm AP of a model on an annotated image folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maskrcnn_serving.commands import add_model_arguments, open_pipeline, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="COCO evaluation with pycocotools; the last line printed is a JSON summary.",
    )
    add_model_arguments(parser)
    parser.add_argument("--annotations", type=Path, required=True, help="COCO-format annotations JSON.")
    parser.add_argument("--images", type=Path, required=True, help="Folder holding the annotated images.")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate only the first N images (by id).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskrcnn_serving.evaluation import evaluate

    pipeline = open_pipeline(settings_from_args(args))
    report = evaluate(pipeline, args.annotations, args.images, limit=args.limit)
    report.pop("detections", None)
    report.pop("stages_s", None)
    print(json.dumps(report))
    return 0
