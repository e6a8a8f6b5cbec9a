"""From a backend's :class:`Detections` to what a caller gets: the pipeline's postprocess stage and its annotation
records (the encode stage's per-detection work).

* :func:`filter_detections`: the class filter, then ``max_detections``;
* :func:`instance_masks`, :func:`full_masks`: masks pasted from the (N, 28, 28) probabilities into the image frame
  (the math is :mod:`maskrcnn_serving.modeling.paste`); :func:`paste_for_options`: the masks an image's options ask
  for, as runs in box-sized windows (:class:`~maskrcnn_serving.structures.MaskRuns`);
* :func:`encode_annotations`: the annotation records of each format (bbox, class, score, segmentation);
* :func:`add_search_fields`: each instance's embedding and neighbours on its record (:func:`neighbour_records`).

Pure functions of :class:`Detections` and :class:`RequestOptions`: no HTTP, no JSON bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from maskrcnn_serving.encoding import coco_rle_of_mask, legacy_rle, polygons_of_mask
from maskrcnn_serving.modeling.paste import paste_mask, paste_masks
from maskrcnn_serving.request import MASK_FORMATS, RequestOptions
from maskrcnn_serving.structures import Detections, MaskRuns


def filter_detections(dets: Detections, options: RequestOptions, default_max: int) -> Detections:
    """Apply the class filter, then ``max_detections`` (the backend already applied the score threshold)."""
    keep = np.arange(len(dets))
    if options.classes is not None:
        keep = keep[np.isin(dets.labels, sorted(options.classes))]
    limit = options.max_detections or default_max
    keep = keep[:limit]
    return dets if len(keep) == len(dets) else dets.select(keep)


def _require_masks(dets: Detections) -> np.ndarray:
    if dets.mask_probs is None:
        raise ValueError("This model has no mask head (MODE_MASK=False).")
    return dets.mask_probs


def instance_masks(dets: Detections, threshold: float = 0.5) -> Iterator[MaskRuns]:
    """Yield each detection's pasted mask (``dets.accurate_paste`` picks the method)."""
    probs = _require_masks(dets)
    for box, prob in zip(dets.boxes, probs, strict=True):
        yield paste_mask(box, prob, dets.image_hw, threshold, dets.accurate_paste)


def full_masks(dets: Detections, threshold: float = 0.5) -> np.ndarray:
    """(N, H, W) uint8 {0, 1} full-image masks. Prefer :func:`instance_masks` for large images: N full-size masks
    of a 4000x3000 photo take N x 12 MB."""
    return paste_masks(dets.boxes, _require_masks(dets), dets.image_hw, threshold, dets.accurate_paste)


def paste_for_options(dets: Detections, options: RequestOptions) -> list[MaskRuns] | None:
    """The pasted mask of every detection for mask formats (runs in box-sized windows, never a full-size mask), None
    for ``boxes``."""
    if options.format not in MASK_FORMATS or not dets.has_masks:
        return None
    return list(instance_masks(dets, options.mask_threshold))


def encode_annotations(dets: Detections, options: RequestOptions, masks: list[MaskRuns] | None) -> list[dict]:
    """The ``annotations`` list of one image in ``options.format``, in descending score order.

    legacy: seed-compatible (docs/seed-containers.md#response): ``bbox`` [int(x1), int(y1), int(x2-x1), int(y2-y1)]
        (truncated), row-major uncompressed ``segmentation``, contiguous ``category_id``, ``category_name``, plus
        ``score``.
    coco: float xywh ``bbox``, ``segmentation`` compressed column-major COCO RLE with ``counts`` a str.
    polygon: float xywh ``bbox``, ``segmentation`` a list of COCO polygons (outer contours, no holes).
    boxes: float xywh ``bbox`` only.
    """
    fmt = options.format
    annotations = []
    for index in range(len(dets)):
        x1, y1, x2, y2 = (float(v) for v in dets.boxes[index])
        label = int(dets.labels[index])
        if fmt == "legacy":
            bbox: list = [int(x1), int(y1), int(x2 - x1), int(y2 - y1)]
        else:
            bbox = [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]
        record: dict[str, Any] = {
            "bbox": bbox,
            "category_id": label,
            "category_name": dets.class_names[label],
            "score": round(float(dets.scores[index]), 5),
        }
        if masks is not None:
            if fmt == "legacy":
                record["segmentation"] = legacy_rle(masks[index])
            elif fmt == "coco":
                record["segmentation"] = coco_rle_of_mask(masks[index])
            else:
                record["segmentation"] = polygons_of_mask(masks[index])
        annotations.append(record)
    return annotations


def add_search_fields(
    annotations: list[dict], dets: Detections, options: RequestOptions, neighbours: Sequence[Sequence] | None
) -> None:
    """Add ``embedding`` (float32 values, L2-normalised) and ``neighbours`` (each a ``search.index.Neighbour``) to
    each annotation, where the options ask for them."""
    for index, record in enumerate(annotations):
        if options.embeddings:
            record["embedding"] = dets.embeddings[index]
        if neighbours is not None:
            record["neighbours"] = neighbour_records(neighbours[index])


def neighbour_records(neighbours: Sequence) -> list[dict[str, Any]]:
    """The ``neighbours`` field of one annotation: each ``search.index.Neighbour`` as its JSON record."""
    return [neighbour.to_json() for neighbour in neighbours]
