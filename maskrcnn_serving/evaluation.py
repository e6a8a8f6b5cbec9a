"""COCO results records from the pipeline's ``coco`` annotations, and COCO evaluation on an annotated image
folder, with pycocotools."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Sequence
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from maskrcnn_serving.model_dir import ModelBundle
from maskrcnn_serving.pipeline import Pipeline, StageTimes
from maskrcnn_serving.request import RequestOptions


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


def results_options(bundle: ModelBundle, score_threshold: float | None = None,
                    max_detections: int | None = None) -> RequestOptions:
    """Options for COCO results of ``bundle``'s model: its own test threshold (``TEST.RESULT_SCORE_THRESH``, low,
    as evaluation needs) unless given, and standard COCO RLE masks (``coco``; ``boxes`` without a mask head)."""
    return RequestOptions(
        score_threshold=bundle.inference.score_threshold if score_threshold is None else score_threshold,
        max_detections=max_detections,
        format="coco" if bundle.architecture.is_mask_rcnn else "boxes",
    )


def to_coco_results(annotations: Sequence[dict], image_id, category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO results records of one image from its ``coco`` (or ``boxes``) annotations: float xywh bbox, score,
    category id (mapped through ``category_ids`` when given) and compressed RLE."""
    records = []
    for annotation in annotations:
        label = annotation["category_id"]
        record = {
            "image_id": image_id,
            "category_id": int(category_ids[label]) if category_ids is not None else label,
            "category_name": annotation["category_name"],
            "bbox": annotation["bbox"],
            "score": annotation["score"],
        }
        if "segmentation" in annotation:
            record["segmentation"] = annotation["segmentation"]
        records.append(record)
    return records


def _summary(coco_eval: COCOeval) -> dict[str, float]:
    return {k: round(float(coco_eval.stats[i]), 4) for i, k in enumerate(("AP", "AP50", "AP75"))}


def evaluate(
    pipeline: Pipeline, annotations: Path, images_dir: Path, limit: int | None = None, progress: bool = True
) -> dict:
    """Run ``pipeline`` on every annotated image (the model's test threshold, COCO RLE masks) and return bbox/segm
    AP, AP50, AP75, the image count, the seconds and the stage seconds."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotations))
    category_ids = category_ids_for(coco, pipeline.backend.class_names)
    image_ids = sorted(coco.getImgIds())[:limit]
    paths = [images_dir / coco.loadImgs(image_id)[0]["file_name"] for image_id in image_ids]
    results: list[dict] = []
    times = StageTimes()
    start = time.perf_counter()
    files = tqdm(paths, desc="eval", unit="img", disable=not progress)
    options = results_options(pipeline.backend.bundle)
    for image_id, result in zip(image_ids, pipeline.run_files(files, options, times), strict=True):
        results.extend(to_coco_results(result.annotations, image_id, category_ids))
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
    report["stages_s"] = {name: round(value, 3) for name, value in times.seconds.items()}
    report["detections"] = len(results)
    return report


