"""``maskrcnn-serving index``: every detected object of a collection of images, searchable in Milvus.

    index build  --model-dir M --db DB IMAGES_OR_DIRS... [--label L] [--ray [ADDRESS]]   store every instance
    index search --model-dir M --db DB QUERY... [--k 10] [--same-class] [--json OUT] [--vis-dir DIR]
    index export --db DB --jsonl OUT [--collection NAME]                          one JSON line per instance

DB is a local Milvus Lite folder (e.g. ``out/instances.db``, created on first use) or the URL of a Milvus server or
cluster (``http://host:19530``). Images are stored by name: their path relative to the folder indexed (the inputs'
common folder), under ``--label`` when given; never an absolute path. See docs/instance-search.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maskrcnn_serving.commands import (
    ImageRun,
    add_model_arguments,
    add_ray_arguments,
    exit_on_refused,
    open_pipeline,
    settings_from_args,
)

DB_HELP = "Milvus Lite folder (created on first use, e.g. out/instances.db) or a Milvus URL (http://host:19530)."


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="Instance search: build, search and export an index of every "
                                                 "detected object (Milvus Lite or a Milvus server).")
    commands = parser.add_subparsers(dest="index_command", required=True)

    build = commands.add_parser("build", help="Detect every instance in images and folders and store it (resumable).")
    add_model_arguments(build)
    _add_db_arguments(build)
    build.add_argument("inputs", nargs="+",
                       help="Image files or folders (searched recursively), or their URLs (s3://..., file://...).")
    build.add_argument("--label", default=None,
                       help="Store the images' names under this prefix (LABEL/a.jpg): to index several folders whose "
                            "files have the same names into one collection.")
    build.add_argument("--score-threshold", type=float, default=None,
                       help="Index instances scoring above this (default: the model's TEST.RESULT_SCORE_THRESH_VIS).")
    add_ray_arguments(build)
    build.set_defaults(func=run_build)

    search = commands.add_parser("search", help="The nearest indexed instances of each instance of query images.")
    add_model_arguments(search)
    _add_db_arguments(search)
    search.add_argument("queries", nargs="+", type=Path, help="Query image files or folders.")
    search.add_argument("--k", type=int, default=10, help="Neighbours per query instance (default 10).")
    search.add_argument("--same-class", action="store_true",
                        help="Search only among instances of the query instance's predicted class.")
    search.add_argument("--score-threshold", type=float, default=None,
                        help="Query instances scoring above this (default: the model's TEST.RESULT_SCORE_THRESH_VIS).")
    search.add_argument("--json", type=Path, default=None, help="Write the results as JSON here.")
    search.add_argument("--vis-dir", type=Path, default=None,
                        help="Write one PNG per query image: each instance beside its neighbours, with masks.")
    search.add_argument("--images-root", type=Path, default=None,
                        help="With --vis-dir: the folder the indexed names are relative to, to draw the neighbours "
                             "from their files (default: their stored thumbnails).")
    search.set_defaults(func=run_search)

    export = commands.add_parser("export", help="Write one JSON line per indexed instance (for other engines).")
    _add_db_arguments(export)
    export.add_argument("--jsonl", type=Path, required=True, help="Output file (JSON lines).")
    export.set_defaults(func=run_export)


def _add_db_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help=DB_HELP)
    parser.add_argument("--collection", default="instances", help="Index name in the database (default instances).")


def _request_options(bundle, score_threshold: float | None):
    from maskrcnn_serving.request import RequestOptions

    threshold = bundle.inference.vis_score_threshold if score_threshold is None else score_threshold
    return RequestOptions(score_threshold=threshold, format="coco" if bundle.architecture.is_mask_rcnn else "boxes",
                          embeddings=True)


def _check_db(db: str) -> None:
    """Refuse an unusable --db before loading any model (and without writing anything)."""
    from maskrcnn_serving.search.database import DatabaseError, check_local_path, is_remote

    if not is_remote(db):
        try:
            check_local_path(db)
        except DatabaseError as exc:
            raise SystemExit(f"error: {exc}") from None


def _open_index(args: argparse.Namespace, bundle=None, create: bool = False):
    from maskrcnn_serving.backends.base import Backend
    from maskrcnn_serving.search.database import DatabaseError
    from maskrcnn_serving.search.index import InstanceIndex

    try:
        return InstanceIndex.open(
            args.db, args.collection, dim=None if bundle is None else Backend.embedding_dim_of(bundle),
            image_dim=None if bundle is None else bundle.architecture.fpn_channels, create=create,
        )
    except DatabaseError as exc:
        raise SystemExit(f"error: {exc}") from None


def index_rows(file, result, label: str | None = None) -> dict:
    """What ``index build`` stores of an image (made wherever the model ran): its
    :class:`~maskrcnn_serving.search.index.ImageRows` as JSON, named by its path under the indexed folder (or
    ``label``)."""
    from maskrcnn_serving.search.index import image_rows

    dets = result.detections
    return image_rows(_stored_name(file, label), result.image, result.annotations, dets.embeddings,
                      dets.image_embedding).to_json()


def _stored_name(file, label: str | None) -> str:
    return file.name if label is None else f"{label.rstrip('/')}/{file.name}"


def run_build(args: argparse.Namespace) -> int:
    import functools

    from maskrcnn_serving.search.index import ImageRows, check_name
    from maskrcnn_serving.sources import collect_images

    _check_db(args.db)
    if args.label is not None:
        try:
            check_name(args.label.rstrip("/"))
        except ValueError as exc:
            raise SystemExit(f"error: --label: {exc}") from None
    files = collect_images(args.inputs)
    if not files:
        raise SystemExit("error: no images found in the inputs")
    model = ImageRun.open(args)
    index = _open_index(args, model.bundle, create=True)
    # indexed already: by name, or (an index built before names were relative) by absolute path
    names = [_stored_name(f, args.label) for f in files]
    indexed = index.indexed(names + [f.absolute_path for f in files if f.absolute_path])
    pending = [f for f, name in zip(files, names, strict=True)
               if name not in indexed and f.absolute_path not in indexed]
    options = _request_options(model.bundle, args.score_threshold)
    added = 0
    for outcome in model.run(pending, options, functools.partial(index_rows, label=args.label), "index"):
        added += index.write(ImageRows.from_json(outcome.value))
    index.flush()
    print(f"{added} instances from {len(pending) - model.refused} images added to {args.collection!r} in {args.db} "
          f"({len(files) - len(pending)} images already indexed; {index.count()} instances in all)")
    if model.refused:
        print(f"{model.refused} images refused (listed above), not indexed", file=sys.stderr)
    return 0


def run_search(args: argparse.Namespace) -> int:
    import cv2

    from maskrcnn_serving.commands.predict import visualization_path
    from maskrcnn_serving.sources import collect_images

    if not 1 <= args.k <= 1000:
        raise SystemExit("error: --k must be in 1..1000")
    _check_db(args.db)
    files = collect_images(args.queries)
    if not files:
        raise SystemExit("error: no images found in the queries")
    pipeline = open_pipeline(settings_from_args(args))
    index = _open_index(args, pipeline.backend.bundle)
    options = _request_options(pipeline.backend.bundle, args.score_threshold)
    report = []
    for file, result in zip(files, exit_on_refused(pipeline.run_files(files, options)), strict=False):
        dets = result.detections
        neighbours = index.search(dets.embeddings, args.k, dets.labels if args.same_class else None)
        instances = []
        for annotation, found in zip(result.annotations, neighbours, strict=True):
            instances.append({
                "bbox": annotation["bbox"], "category_name": annotation["category_name"], "score": annotation["score"],
                "neighbours": [{key: value for key, value in n.to_json().items() if key != "id"} for n in found],
            })
        report.append({"image": file.location, "instances": instances})
        print(f"{file.location}: {len(instances)} instances", file=sys.stderr)
        if args.vis_dir is not None:
            path = visualization_path(args.vis_dir, file)
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), _neighbours_figure(index, result, neighbours, args.images_root))
    text = json.dumps(report, indent=1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        print(f"results written to {args.json}")
    else:
        print(text)
    return 0


def _neighbours_figure(index, result, neighbours, images_root: Path | None):
    """Rows of (query instance | its neighbours' crops with their masks); one row per query instance. A neighbour
    is cut from its image file when it is found (under ``images_root``, or at the absolute path an older index
    stored), else its stored thumbnail stands in."""
    import base64

    import cv2
    import numpy as np
    from pycocotools import mask as mask_utils

    from maskrcnn_serving.postprocess import full_masks
    from maskrcnn_serving.visualize import instance_crop, neighbour_strip

    rows = []
    images: dict[str, np.ndarray | None] = {}
    masks = full_masks(result.detections) if result.detections.has_masks else None
    for number, (annotation, found) in enumerate(zip(result.annotations, neighbours, strict=True)):
        query = instance_crop(result.image, annotation["bbox"], None if masks is None else masks[number],
                              annotation["category_id"])
        tiles, captions = [], []
        for record in index.records([n.id for n in found]):
            if record["image"] not in images:
                stored = Path(record["image"])
                path = stored if stored.is_absolute() else None if images_root is None else images_root / stored
                images[record["image"]] = None if path is None else cv2.imread(str(path), cv2.IMREAD_COLOR)
            image = images[record["image"]]
            if image is None:  # not found (moved since it was indexed): its stored thumbnail stands in
                image = cv2.imdecode(np.frombuffer(base64.b64decode(record["thumbnail"]), np.uint8), cv2.IMREAD_COLOR)
                tiles.append(instance_crop(image, (0, 0, image.shape[1], image.shape[0])))
            else:
                mask = None
                if record["mask"]:
                    rle = {"size": [record["height"], record["width"]], "counts": record["mask"].encode()}
                    mask = mask_utils.decode(rle)
                tiles.append(instance_crop(image, record["bbox"], mask, record["category_id"]))
            captions.append(f"{record['category']} {next(n.distance for n in found if n.id == record['id']):.3f}")
        rows.append(neighbour_strip(query, tiles, captions, f"{annotation['category_name']} {annotation['score']:.2f}"))
    if not rows:
        return np.full((40, 200, 3), 255, np.uint8)
    width = max(row.shape[1] for row in rows)
    return np.vstack([np.pad(row, ((0, 4), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows])


def run_export(args: argparse.Namespace) -> int:
    _check_db(args.db)
    index = _open_index(args)
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    count = index.export_jsonl(args.jsonl)
    print(f"{count} instances written to {args.jsonl}")
    return 0
