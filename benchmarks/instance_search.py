"""Instance search, measured: retrieval quality, index build throughput, search latency and index size.

On a COCO-format validation set (``../shared/fixtures/val_public`` by default) with a trained model:

* the index holds every detected instance (score above the model's ``TEST.RESULT_SCORE_THRESH_VIS``) of every
  image, in a fresh Milvus Lite database, built with the product's own ``index build`` code path;
* queries are the instances detected in rescaled copies of the first ``--queries`` images (by image id): scaled by
  0.75 (``cv2.INTER_AREA``) and re-encoded as JPEG quality 85;
* **re-id top-1**: the share of query instances whose nearest indexed instance is the same object: same source
  image, and box IoU >= 0.5 with the query's box mapped back to the original's pixels;
* **class P@10**: the share of each query instance's 10 nearest neighbours that have its predicted class (averaged);
* both for the default search (every class) and within the predicted class (``same_class``, a filter in Milvus);
* the cost of the embeddings: the pipeline with and without them, and the whole build step (embeddings,
  thumbnails and database writes) against plain ``predict``, image by image in turn (same images, same moment: the
  machine's load cancels out of the ratios);
* search latency per query instance (p50/p99, one vector per call) with the index padded by random unit vectors to
  1,000 and 100,000 instances, after a flush and a reload (what a server sees once it started; the reload, which
  builds the HNSW graph, is timed too); the database folder's size on disk.

    .venv/bin/python benchmarks/instance_search.py --model-dir ../shared/fixtures/shapes-demo --json out/demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from maskrcnn_serving.backends.base import load_backend
from maskrcnn_serving.pipeline import Pipeline
from maskrcnn_serving.request import RequestOptions
from maskrcnn_serving.search import database
from maskrcnn_serving.search.index import InstanceIndex
from maskrcnn_serving.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SCALE = 0.75
JPEG_QUALITY = 85


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two xywh boxes."""
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0.0, min(ax2, bx2) - max(a[0], b[0])) * max(0.0, min(ay2, by2) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(values, 50)) * 1000, "p99_ms": float(np.percentile(values, 99)) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--backend", default="optimized")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--val", type=Path, default=REPO.parent / "shared" / "fixtures" / "val_public")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--latency-sizes", default="1000,100000", help="Index sizes for the latency figures.")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    annotations = json.loads((args.val / "annotations.json").read_text())
    images = sorted(annotations["images"], key=lambda image: image["id"])
    paths = [args.val / "images" / image["file_name"] for image in images]
    backend = load_backend(args.backend, args.model_dir, Settings(precision=args.precision, max_batch_size=1))
    pipeline = Pipeline(backend)
    options = RequestOptions(score_threshold=pipeline.inference.vis_score_threshold, format="coco", embeddings=True)
    plain = RequestOptions(score_threshold=pipeline.inference.vis_score_threshold, format="coco")
    work = Path(tempfile.mkdtemp(prefix="instance-search-"))
    report: dict = {"model_dir": str(args.model_dir), "backend": args.backend, "precision": args.precision,
                    "embedding_dim": backend.embedding_dim, "images": len(paths), "query_images": args.queries}
    try:
        # warm-up, then the pipeline without and with embeddings, alternating image by image
        list(pipeline.run_files([paths[0]], options))
        list(pipeline.run_files([paths[0]], plain))
        db = work / "instances.db"
        index = InstanceIndex.open(str(db), "instances", dim=backend.embedding_dim,
                                   image_dim=backend.bundle.architecture.fpn_channels, create=True)

        def build(path: Path, data: bytes) -> None:
            (result,) = pipeline.run_files([data], options)
            index.add_image(path.name, result.image, result.annotations, result.detections.embeddings,
                            result.detections.image_embedding)

        steps = {
            "plain": lambda path, data: list(pipeline.run_files([data], plain)),
            "embeddings": lambda path, data: list(pipeline.run_files([data], options)),
            "build": build,
        }
        seconds = dict.fromkeys(steps, 0.0)
        for number, path in enumerate(paths):
            data = path.read_bytes()
            names = list(steps)[number % 3 :] + list(steps)[: number % 3]  # each step first, middle and last in turn
            for name in names:
                started = time.perf_counter()
                steps[name](path, data)
                seconds[name] += time.perf_counter() - started
        predict_seconds, build_seconds = seconds["plain"], seconds["build"]
        report["indexed_instances"] = index.count()
        index.flush()
        report["throughput"] = {
            "predict_img_per_s": len(paths) / predict_seconds,
            "predict_with_embeddings_img_per_s": len(paths) / seconds["embeddings"],
            "embeddings_overhead": seconds["embeddings"] / predict_seconds - 1.0,
            "build_img_per_s": len(paths) / build_seconds,
            "build_overhead": build_seconds / predict_seconds - 1.0,
        }

        queries = []
        for path in paths[: args.queries]:
            original = cv2.imread(str(path), cv2.IMREAD_COLOR)
            small = cv2.resize(original, (round(original.shape[1] * SCALE), round(original.shape[0] * SCALE)),
                               interpolation=cv2.INTER_AREA)
            data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()
            (result,) = pipeline.run_files([data], options)
            for annotation, vector, label in zip(result.annotations, result.detections.embeddings,
                                                 result.detections.labels, strict=True):
                queries.append((path.name, [v / SCALE for v in annotation["bbox"]], vector, int(label)))
        report["query_instances"] = len(queries)
        vectors = np.stack([q[2] for q in queries])
        labels = [q[3] for q in queries]
        for mode, categories in (("all_classes", None), ("same_class", labels)):
            found = index.search(vectors, 10, categories)
            reid = np.mean([bool(n) and n[0].image == q[0] and box_iou(n[0].bbox, q[1]) >= 0.5
                            for q, n in zip(queries, found, strict=True)])
            names = backend.class_names
            precision = np.mean([np.mean([nb.category_name == names[q[3]] for nb in n]) if n else 0.0
                                 for q, n in zip(queries, found, strict=True)])
            report[mode] = {"reid_top1": float(reid), "class_precision_at_10": float(precision)}
        report["index_bytes"] = directory_bytes(db)

        # latency: one query vector per call, index padded with random unit vectors
        rng = np.random.default_rng(0)
        latency = {}
        for size in [int(s) for s in args.latency_sizes.split(",") if s]:
            name = f"pad{size}"
            padded = InstanceIndex.open(str(db), name, dim=backend.embedding_dim, image_dim=1, create=True)
            fill = size - padded.count()
            for start in range(0, fill, 5000):
                rows = min(5000, fill - start)
                random = rng.normal(size=(rows, backend.embedding_dim)).astype(np.float32)
                random /= np.linalg.norm(random, axis=1, keepdims=True)
                padded.insert_rows([
                    {"vector": v.tolist(), "image": "random", "bbox": [0.0, 0.0, 1.0, 1.0], "category": "random",
                     "category_id": 0, "score": 0.0, "height": 1, "width": 1, "mask": "", "thumbnail": ""}
                    for v in random])
            padded.flush()
            started = time.perf_counter()
            padded.reload()
            load_seconds = time.perf_counter() - started
            timings = []
            for row in range(min(args.latency_queries, len(vectors))):
                started = time.perf_counter()
                padded.search(vectors[row : row + 1], 10)
                timings.append(time.perf_counter() - started)
            latency[str(size)] = {**percentiles(timings), "instances": padded.count(), "load_s": load_seconds}
        report["search_latency"] = latency
        report["database_bytes_with_padding"] = directory_bytes(db)
        report["machine"] = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[
            1].splitlines()[0].strip() if sys.platform.startswith("linux") else ""
    finally:
        database.stop_local_servers()
        shutil.rmtree(work, ignore_errors=True)
        pipeline.close()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
