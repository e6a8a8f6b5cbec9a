"""``maskrcnn-serving predict``: run a model on image files and folders (or their URLs), here or on Ray; write COCO
results JSON and/or JSON-lines shards."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from maskrcnn_serving.commands import ImageRun, add_model_arguments, add_ray_arguments
from maskrcnn_serving.sources import ImageFile, collect_images

if TYPE_CHECKING:  # the pipeline (and TensorFlow) load only when a command runs
    from maskrcnn_serving.request import ImageResult

DEFAULT_SHARD_SIZE = 1000


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="Detect objects in image files and folders; write COCO results JSON (compressed RLE masks).",
    )
    add_model_arguments(parser)
    parser.add_argument("inputs", nargs="+",
                        help="Image files or folders (searched recursively), or their URLs (s3://..., file://...).")
    parser.add_argument("--output", "-o", type=Path, default=None, help="Where to write the results JSON.")
    parser.add_argument(
        "--shards", type=Path, default=None,
        help="Also (or instead of --output) write the results as they come, as JSON-lines files in this folder, one "
             "line per image ({\"image_id\", \"results\"}); a run given the same folder again skips the images "
             "already there (resumes).")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"Images per shard file (default {DEFAULT_SHARD_SIZE}); a stopped run redoes at most "
                             "the images of the shard it was writing.")
    parser.add_argument("--score-threshold", type=float, default=None, help="Override TEST.RESULT_SCORE_THRESH.")
    parser.add_argument("--max-detections", type=int, default=None, help="Override TEST.RESULTS_PER_IM.")
    parser.add_argument(
        "--vis-dir",
        type=Path,
        default=None,
        help="Also write each image with its masks, boxes, class names and scores drawn on it, as PNG in this folder "
        "(sub-folders of the inputs are kept; on a Ray cluster, a folder every node writes to).",
    )
    parser.add_argument(
        "--vis-score-threshold",
        type=float,
        default=None,
        help="Draw only detections scoring above this (default: the model's TEST.RESULT_SCORE_THRESH_VIS, 0.5).",
    )
    add_ray_arguments(parser)
    parser.set_defaults(func=run)


def visualization_path(vis_dir: Path, file: ImageFile) -> Path:
    """Where ``--vis-dir`` draws ``file``: its name (its path under the inputs' common folder) as a PNG."""
    return vis_dir / Path(file.name).with_suffix(".png")


@dataclass(frozen=True)
class Drawing:
    """``--vis-dir``: where to draw, and the lowest score drawn."""

    vis_dir: Path
    score_threshold: float


def coco_records(file: ImageFile, result: ImageResult, drawing: Drawing | None = None) -> list[dict]:
    """What ``predict`` keeps of an image (run wherever the model ran): its COCO results records; with a
    ``drawing``, the image drawn with its detections as well."""
    import cv2

    from maskrcnn_serving.evaluation import to_coco_results
    from maskrcnn_serving.visualize import draw_detections

    if drawing is not None:
        path = visualization_path(drawing.vis_dir, file)
        path.parent.mkdir(parents=True, exist_ok=True)
        shown = result.detections.select(result.detections.scores > drawing.score_threshold)
        cv2.imwrite(str(path), draw_detections(result.image, shown))
    return to_coco_results(result.annotations, result.img_id)


class ResultShards:
    """COCO results in JSON-lines files, ``part-00000.jsonl``, ``part-00001.jsonl``, ...: one line per image,
    ``{"image_id": ..., "results": [records]}``. A shard is written under a temporary name and renamed once it
    holds ``shard_size`` images (or the run ends), so every shard on disk is complete and a stopped run loses only
    the shard it was writing: a run given the folder again skips the images of its shards (:meth:`done`)."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        if shard_size < 1:
            raise SystemExit("error: --shard-size must be at least 1")
        self.folder = folder
        self.shard_size = shard_size
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".part-*.jsonl.tmp"):  # the shard a stopped run was writing
            stale.unlink()
        numbers = [int(p.stem.split("-")[1]) for p in self.shards()]
        self._next = max(numbers, default=-1) + 1
        self._open = None
        self._lines = 0

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.jsonl"))

    def read(self) -> Iterator[tuple[str, list[dict]]]:
        """(image id, records) of every image in the complete shards."""
        for shard in self.shards():
            with open(shard) as lines:
                for line in lines:
                    entry = json.loads(line)
                    yield entry["image_id"], entry["results"]

    def done(self) -> set[str]:
        return {image_id for image_id, _ in self.read()}

    def add(self, image_id: str, records: list[dict]) -> None:
        if self._open is None:
            self._open = open(self._temporary(), "w")  # noqa: SIM115 - closed when the shard is full
        self._open.write(json.dumps({"image_id": image_id, "results": records}) + "\n")
        self._lines += 1
        if self._lines >= self.shard_size:
            self.close()

    def close(self) -> None:
        """Complete the shard being written (if any)."""
        if self._open is None:
            return
        self._open.close()
        self._temporary().rename(self.folder / f"part-{self._next:05d}.jsonl")
        self._open, self._lines, self._next = None, 0, self._next + 1

    def _temporary(self) -> Path:
        return self.folder / f".part-{self._next:05d}.jsonl.tmp"


def run(args: argparse.Namespace) -> int:
    if args.output is None and args.shards is None:
        raise SystemExit("error: give --output (one JSON file) and/or --shards (a folder of JSON-lines files)")
    files = collect_images(args.inputs)
    if not files:
        raise SystemExit("error: no images found in the inputs")
    shards = ResultShards(args.shards, args.shard_size) if args.shards is not None else None
    kept: dict[str, list[dict]] = dict(shards.read()) if shards is not None else {}
    pending = [f for f in files if f.location not in kept]
    if len(pending) < len(files):
        print(f"{len(files) - len(pending)} images already in {args.shards}", file=sys.stderr)
    refused = _run(args, pending, shards, kept) if pending else 0
    if shards is not None:
        kept = dict(shards.read())
    results = [record for file in files for record in kept.get(file.location, [])]
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results))
    written = sum(file.location in kept for file in files)
    where = " and ".join(str(p) for p in (args.output, args.shards) if p is not None)
    print(f"{len(results)} detections in {written} images written to {where}")
    if refused:
        print(f"{refused} images refused (listed above), not in the results", file=sys.stderr)
    if args.vis_dir is not None:
        print(f"annotated images written to {args.vis_dir}")
    return 0


def _run(args: argparse.Namespace, files: list[ImageFile], shards: ResultShards | None,
         kept: dict[str, list[dict]]) -> int:
    """Run the model over ``files``: each image's records into the shards (or ``kept``) as they come; the count of
    images refused (on Ray; a local run stops at the first)."""
    import functools

    from maskrcnn_serving.evaluation import results_options

    model = ImageRun.open(args)
    options = results_options(model.bundle, args.score_threshold, args.max_detections)
    drawing = None
    if args.vis_dir is not None:
        threshold = args.vis_score_threshold
        drawing = Drawing(args.vis_dir.resolve(),
                          model.bundle.inference.vis_score_threshold if threshold is None else threshold)
    try:
        for outcome in model.run(files, options, functools.partial(coco_records, drawing=drawing), "predict"):
            if shards is not None:
                shards.add(outcome.file.location, outcome.value)
            else:
                kept[outcome.file.location] = outcome.value
    finally:
        if shards is not None:
            shards.close()
    return model.refused
