"""Mask encoders to COCO-style segmentations: the seed's row-major RLE, COCO RLE and polygons of the pasted masks
(:class:`~maskrcnn_serving.structures.MaskRuns`) that :mod:`maskrcnn_serving.postprocess` makes (its
``encode_annotations`` puts them in the records of every caller), and COCO RLE of full masks."""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from maskrcnn_serving.structures import MaskRuns


def coco_rle(masks: np.ndarray) -> list[dict]:
    """Standard COCO RLE (column-major, compressed, ``counts`` a str) of (N, H, W) uint8 masks, as pycocotools
    writes it."""
    if len(masks) == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in encoded]


# ---------------------------------------------------------------------------------------------------------------
# Per-detection encoders of pasted masks (structures.MaskRuns, what postprocess.instance_masks makes): no full-size
# mask is ever materialized.


def run_lengths(mask: MaskRuns) -> np.ndarray:
    """Run lengths of the full (H, W) mask scanned in row-major (C) order, alternating zeros, ones, zeros, ...

    Starts with the count of zeros (0 when the first pixel is set); the last run is the last real run (no trailing
    zero-length run); ``sum == H * W``. Runs that touch are one run: two in a row, and one that ends at the right
    image edge with one that starts at column 0 of the next row, as a flat scan of the full mask would see them.
    """
    height, width = mask.image_hw
    total = height * width
    if len(mask.rows) == 0:
        return np.array([total], dtype=np.int64)
    row_offsets = (mask.rows + mask.y0) * width + mask.x0
    bounds = np.empty(2 * len(mask.rows), np.int64)
    bounds[0::2] = row_offsets + mask.starts
    bounds[1::2] = row_offsets + mask.ends
    # An end (odd index) equal to the next start (even index) is one run continuing: merge.
    joined = np.flatnonzero(bounds[1:-1:2] == bounds[2::2])
    if len(joined):
        bounds = np.delete(bounds, np.concatenate([2 * joined + 1, 2 * joined + 2]))
    counts = np.diff(np.concatenate([[0], bounds, [total]]))
    return counts[:-1] if counts[-1] == 0 else counts


def legacy_rle(mask: MaskRuns) -> dict:
    """The seed containers' ``segmentation`` (docs/seed-containers.md#legacy-rle): uncompressed, ROW-major run
    lengths as JSON ints, starting with a count of zeros (possibly 0), ``size`` [H, W]. Decode with ``np.repeat`` of
    alternating 0/1 and a C-order reshape to (H, W). NOT pycocotools' format (column-major): pycocotools would decode
    it transposed-wrong. Read from the runs alone: no pixel is touched.
    """
    return {"counts": run_lengths(mask).tolist(), "size": [int(mask.image_hw[0]), int(mask.image_hw[1])]}


def coco_rle_of_mask(mask: MaskRuns) -> dict:
    """Standard COCO RLE of one pasted mask, byte-identical to ``coco_rle`` of the full mask: column-major runs
    (the row-major runs of the transposed mask), compressed by pycocotools; ``counts`` is an ASCII str."""
    height, width = mask.image_hw
    counts = run_lengths(mask.transposed())
    encoded = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [height, width]}, height, width)
    return {"size": [int(height), int(width)], "counts": encoded["counts"].decode("ascii")}


def polygons_of_mask(mask: MaskRuns) -> list[list[float]]:
    """Outer contours of one pasted mask as COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` in image pixels.

    Vertices are the centres of the boundary pixels (pixel (i, j) has centre (j + 0.5, i + 0.5), the same frame as
    the boxes). Holes are not represented (COCO polygons cannot express them): use RLE for exact masks.
    """
    if len(mask.rows) == 0:
        return []
    contours, _ = cv2.findContours(mask.patch(), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(mask.x0, mask.y0))
    # pycocotools needs at least 3 vertices; thinner pieces (1-2 pixel lines) have no area as polygons.
    return [(c.reshape(-1).astype(np.float64) + 0.5).tolist() for c in contours if len(c) >= 3]
