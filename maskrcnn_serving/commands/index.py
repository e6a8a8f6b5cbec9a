"""``maskrcnn-serving index``: every detected object of a collection of images, searchable in Milvus.

    index build  --model-dir M --db DB IMAGES_OR_DIRS... [--collection NAME]      detect and store every instance
    index search --model-dir M --db DB QUERY... [--k 10] [--same-class] [--json OUT] [--vis-dir DIR]
    index export --db DB --jsonl OUT [--collection NAME]                          one JSON line per instance

DB is a local Milvus Lite folder (e.g. ``out/instances.db``, created on first use) or the URL of a Milvus server or
cluster (``http://host:19530``). See docs/instance-search.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maskrcnn_serving.commands import add_model_arguments, open_pipeline, settings_from_args

DB_HELP = "Milvus Lite folder (created on first use, e.g. out/instances.db) or a Milvus URL (http://host:19530)."


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="Instance search: build, search and export an index of every "
                                                 "detected object (Milvus Lite or a Milvus server).")
    commands = parser.add_subparsers(dest="index_command", required=True)

    build = commands.add_parser("build", help="Detect every instance in images and folders and store it (resumable).")
    add_model_arguments(build)
    _add_db_arguments(build)
    build.add_argument("inputs", nargs="+", type=Path, help="Image files or folders (searched recursively).")
    build.add_argument("--score-threshold", type=float, default=None,
                       help="Index instances scoring above this (default: the model's TEST.RESULT_SCORE_THRESH_VIS).")
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
    search.set_defaults(func=run_search)

    export = commands.add_parser("export", help="Write one JSON line per indexed instance (for other engines).")
    _add_db_arguments(export)
    export.add_argument("--jsonl", type=Path, required=True, help="Output file (JSON lines).")
    export.set_defaults(func=run_export)


def _add_db_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help=DB_HELP)
    parser.add_argument("--collection", default="instances", help="Index name in the database (default instances).")


def _request_options(pipeline, score_threshold: float | None):
    from maskrcnn_serving.request import RequestOptions

    threshold = pipeline.inference.vis_score_threshold if score_threshold is None else score_threshold
    return RequestOptions(score_threshold=threshold, format="coco" if pipeline.backend.has_masks else "boxes",
                          embeddings=True)


def _check_db(db: str) -> None:
    """Refuse an unusable --db before loading any model (and without writing anything)."""
    from maskrcnn_serving.search.database import DatabaseError, check_local_path, is_remote

    if not is_remote(db):
        try:
            check_local_path(db)
        except DatabaseError as exc:
            raise SystemExit(f"error: {exc}") from None


def _open_index(args: argparse.Namespace, pipeline=None, create: bool = False):
    from maskrcnn_serving.search.database import DatabaseError
    from maskrcnn_serving.search.index import InstanceIndex

    backend = None if pipeline is None else pipeline.backend
    try:
        return InstanceIndex.open(
            args.db, args.collection, dim=None if backend is None else backend.embedding_dim,
            image_dim=None if backend is None else backend.bundle.architecture.fpn_channels, create=create,
        )
    except DatabaseError as exc:
        raise SystemExit(f"error: {exc}") from None


def run_build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from maskrcnn_serving.commands.predict import collect_images, exit_on_refused

    _check_db(args.db)
    files = collect_images(args.inputs)
    if not files:
        raise SystemExit("error: no images found in the inputs")
    pipeline = open_pipeline(settings_from_args(args))
    index = _open_index(args, pipeline, create=True)
    options = _request_options(pipeline, args.score_threshold)
    added = skipped = 0

    def not_indexed():  # read lazily by run_files: each check sees the images added before it
        nonlocal skipped
        for path in tqdm(files, desc="index", unit="img"):
            if index.has_image(str(path.resolve())):
                skipped += 1
            else:
                yield path

    for result in exit_on_refused(pipeline.run_files(not_indexed(), options)):
        added += index.add_image(str(Path(result.img_id).resolve()), result.image, result.annotations,
                                 result.detections.embeddings, result.detections.image_embedding)
    index.flush()
    print(f"{added} instances from {len(files) - skipped} images added to {args.collection!r} in {args.db} "
          f"({skipped} images already indexed; {index.count()} instances in all)")
    return 0


def run_search(args: argparse.Namespace) -> int:
    import cv2

    from maskrcnn_serving.commands.predict import collect_images, exit_on_refused, visualization_paths

    if not 1 <= args.k <= 1000:
        raise SystemExit("error: --k must be in 1..1000")
    _check_db(args.db)
    files = collect_images(args.queries)
    if not files:
        raise SystemExit("error: no images found in the queries")
    pipeline = open_pipeline(settings_from_args(args))
    index = _open_index(args, pipeline)
    options = _request_options(pipeline, args.score_threshold)
    vis_paths = visualization_paths(files, args.vis_dir) if args.vis_dir is not None else None
    report = []
    for number, result in enumerate(exit_on_refused(pipeline.run_files(files, options))):
        path = files[number]
        dets = result.detections
        neighbours = index.search(dets.embeddings, args.k, dets.labels if args.same_class else None)
        instances = []
        for annotation, found in zip(result.annotations, neighbours, strict=True):
            instances.append({
                "bbox": annotation["bbox"], "category_name": annotation["category_name"], "score": annotation["score"],
                "neighbours": [{key: value for key, value in n.to_json().items() if key != "id"} for n in found],
            })
        report.append({"image": str(path), "instances": instances})
        print(f"{path}: {len(instances)} instances", file=sys.stderr)
        if vis_paths is not None:
            vis_paths[number].parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(vis_paths[number]), _neighbours_figure(index, result, neighbours))
    text = json.dumps(report, indent=1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        print(f"results written to {args.json}")
    else:
        print(text)
    return 0


def _neighbours_figure(index, result, neighbours):
    """Rows of (query instance | its neighbours' crops with their masks); one row per query instance."""
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
                images[record["image"]] = cv2.imread(record["image"], cv2.IMREAD_COLOR)  # the indexed file
            image = images[record["image"]]
            if image is None:  # moved since it was indexed: its stored thumbnail stands in
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
