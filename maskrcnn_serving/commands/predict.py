"""``maskrcnn-serving predict``: run a model on image files and folders, write COCO results JSON."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
from tqdm import tqdm

from maskrcnn_serving.commands import add_model_arguments, open_pipeline, settings_from_args
from maskrcnn_serving.errors import ServingError

if TYPE_CHECKING:  # the pipeline (and TensorFlow) load only when a command runs
    from maskrcnn_serving.request import ImageResult

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
    parser.add_argument(
        "--vis-dir",
        type=Path,
        default=None,
        help="Also write each image with its masks, boxes, class names and scores drawn on it, as PNG in this folder "
        "(sub-folders of the inputs are kept).",
    )
    parser.add_argument(
        "--vis-score-threshold",
        type=float,
        default=None,
        help="Draw only detections scoring above this (default: the model's TEST.RESULT_SCORE_THRESH_VIS, 0.5).",
    )
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


def visualization_paths(files: list[Path], vis_dir: Path) -> list[Path]:
    """One PNG path per image under ``vis_dir``, relative to the images' common folder so names cannot collide."""
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    return [vis_dir / f.resolve().relative_to(root).with_suffix(".png") for f in files]


def exit_on_refused(results: Iterator[ImageResult]) -> Iterator[ImageResult]:
    """``results`` (of :meth:`Pipeline.run_files <maskrcnn_serving.pipeline.Pipeline.run_files>`), ending the
    command with ``error: PATH: message`` at the first file the pipeline refuses (not an image, too large...)."""
    try:
        yield from results
    except ServingError as exc:
        raise SystemExit(f"error: {exc.message}") from None


def run(args: argparse.Namespace) -> int:
    from maskrcnn_serving.evaluation import results_options, to_coco_results
    from maskrcnn_serving.visualize import draw_detections

    files = collect_images(args.inputs)
    if not files:
        raise SystemExit("error: no images found in the inputs")
    pipeline = open_pipeline(settings_from_args(args))
    options = results_options(pipeline, args.score_threshold, args.max_detections)
    vis_paths = visualization_paths(files, args.vis_dir) if args.vis_dir is not None else None
    vis_threshold = args.vis_score_threshold
    if vis_threshold is None:
        vis_threshold = pipeline.inference.vis_score_threshold
    results = []
    images = pipeline.run_files(tqdm(files, desc="predict", unit="img"), options)
    for index, result in enumerate(exit_on_refused(images)):
        results.extend(to_coco_results(result.annotations, result.img_id))
        if vis_paths is not None:
            vis_paths[index].parent.mkdir(parents=True, exist_ok=True)
            shown = result.detections.select(result.detections.scores > vis_threshold)
            cv2.imwrite(str(vis_paths[index]), draw_detections(result.image, shown))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results))
    print(f"{len(results)} detections in {len(files)} images written to {args.output}")
    if args.vis_dir is not None:
        print(f"annotated images written to {args.vis_dir}")
    return 0
