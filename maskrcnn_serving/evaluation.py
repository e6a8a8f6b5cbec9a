"""COCO evaluation of a backend on an annotated image folder, with pycocotools."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from maskrcnn_serving.backends.base import Backend
from maskrcnn_serving.encoding import coco_rle, xywh
from maskrcnn_serving.structures import Detections


def category_ids_for(coco: COCO, class_names: Sequence[str]) -> list[int]:
    """COCO category id of each contiguous label (index 0 unused): matched by name, else by sorted id order."""
    categories = coco.loadCats(coco.getCatIds())
    by_name = {c["name"]: c["id"] for c in categories}
    names = list(class_names[1:])
    if all(n in by_name for n in names):
        return [0] + [by_name[n] for n in names]
    ids = sorted(c["id"] for c in categories)
    if len(ids) != len(names):
        raise ValueError(
            f"The annotations have {len(ids)} categories but the model has {len(names)} classes, and their names "
            "do not match; cannot map labels to category ids."
        )
    return [0, *ids]


def to_coco_results(dets: Detections, image_id, category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO results records of one image: float xywh bbox, score, category id and compressed RLE."""
    boxes = xywh(dets.boxes)
    segmentations = coco_rle(dets.masks()) if dets.has_masks else [None] * len(dets)
    records = []
    for box, score, label, name, segm in zip(boxes, dets.scores, dets.labels, dets.names, segmentations, strict=True):
        record = {
            "image_id": image_id,
            "category_id": int(category_ids[label]) if category_ids is not None else int(label),
            "category_name": name,
            "bbox": [round(float(v), 3) for v in box],
            "score": round(float(score), 5),
        }
        if segm is not None:
            record["segmentation"] = segm
        records.append(record)
    return records


def _summary(coco_eval: COCOeval) -> dict[str, float]:
    return {k: round(float(coco_eval.stats[i]), 4) for i, k in enumerate(("AP", "AP50", "AP75"))}


def evaluate(
    backend: Backend, annotations: Path, images_dir: Path, limit: int | None = None, progress: bool = True
) -> dict:
    """Run ``backend`` on every annotated image and return bbox/segm AP, AP50, AP75, image count and seconds."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotations))
    category_ids = category_ids_for(coco, backend.class_names)
    image_ids = sorted(coco.getImgIds())[:limit]
    results: list[dict] = []
    start = time.perf_counter()
    for image_id in tqdm(image_ids, desc="eval", unit="img", disable=not progress):
        info = coco.loadImgs(image_id)[0]
        path = images_dir / info["file_name"]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"Cannot read image {path}")
        results.extend(to_coco_results(backend.predict([image])[0], image_id, category_ids))
    seconds = time.perf_counter() - start
    report: dict = {}
    iou_types = ["bbox", "segm"] if all("segmentation" in r for r in results) else ["bbox"]
    for iou_type in iou_types:
        if not results:
            report[iou_type] = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            detections = coco.loadRes(results)
            coco_eval = COCOeval(coco, detections, iou_type)
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        report[iou_type] = _summary(coco_eval)
    report["images"] = len(image_ids)
    report["seconds"] = round(seconds, 2)
    report["detections"] = len(results)
    return report


