"""``maskrcnn-serving predict``: run a model on image files and folders, write COCO results JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
from tqdm import tqdm

from maskrcnn_serving.commands import add_model_arguments

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="Detect objects in image files and folders; write COCO results JSON (compressed RLE masks).",
    )
    add_model_arguments(parser)
    parser.add_argument("inputs", nargs="+", type=Path, help="Image files or folders (searched recursively).")
    parser.add_argument("--output", "-o", type=Path, required=True, help="Where to write the results JSON.")
    parser.add_argument("--score-threshold", type=float, default=None, help="Override TEST.RESULT_SCORE_THRESH.")
    parser.add_argument("--max-detections", type=int, default=None, help="Override TEST.RESULTS_PER_IM.")
    parser.set_defaults(func=run)


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files named directly or found under folders, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif item.is_file():
            files.append(item)
        else:
            raise SystemExit(f"error: {item} does not exist")
    return files


def run(args: argparse.Namespace) -> int:
    from maskrcnn_serving.backends.base import PredictOptions, load_backend
    from maskrcnn_serving.evaluation import to_coco_results

    files = collect_images(args.inputs)
    if not files:
        raise SystemExit("error: no images found in the inputs")
    backend = load_backend(args.backend, args.model_dir)
    options = PredictOptions(score_threshold=args.score_threshold, max_detections=args.max_detections)
    results = []
    for path in tqdm(files, desc="predict", unit="img"):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"error: cannot decode image {path}")
        results.extend(to_coco_results(backend.predict([image], options)[0], str(path)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results))
    print(f"{len(results)} detections in {len(files)} images written to {args.output}")
    return 0
