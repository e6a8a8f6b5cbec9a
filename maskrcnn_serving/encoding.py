"""Mask encoders to COCO-style segmentations: the seed's row-major RLE, COCO RLE and polygons of the box-sized
mask patches that :mod:`maskrcnn_serving.postprocess` pastes (its ``encode_annotations`` puts them in the records
of every caller), and COCO RLE of full masks."""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def coco_rle(masks: np.ndarray) -> list[dict]:
    """Standard COCO RLE (column-major, compressed, ``counts`` a str) of (N, H, W) uint8 masks, as pycocotools
    writes it."""
    if len(masks) == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in encoded]


# ---------------------------------------------------------------------------------------------------------------
# Per-detection encoders working on mask patches (postprocess.mask_patches): a mask is ``patch`` (h, w) uint8 {0, 1}
# placed at rows y0.., cols x0.. of an (H, W) image and 0 elsewhere, so no full-size mask is ever materialized.


def _scan_run_lengths(patch: np.ndarray, y0: int, x0: int, image_hw: tuple[int, int]) -> np.ndarray:
    """Run lengths of the full (H, W) mask scanned in row-major (C) order, alternating zeros, ones, zeros, ...

    Starts with the count of zeros (0 when the first pixel is set); the last run is the last real run (no trailing
    zero-length run); ``sum == H * W``. Transitions are found in one flat pass over the patch rows padded with a zero
    column on each side (the padding separates the rows, so a flat comparison finds exactly the per-row starts and
    ends); a run that ends at the right image edge and continues at column 0 of the next row is merged, as a flat
    scan of the full mask would do.
    """
    height, width = image_hw
    total = height * width
    patch = patch[: max(0, height - y0), : max(0, width - x0)]
    if patch.size == 0:
        return np.array([total], dtype=np.int64)
    padded_width = patch.shape[1] + 2
    padded = np.zeros((patch.shape[0], padded_width), dtype=np.bool_)
    padded[:, 1:-1] = patch  # nonzero -> True
    flat = padded.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1])  # row-major order: start, end, start, end, ... per row
    if len(changes) == 0:
        return np.array([total], dtype=np.int64)
    rows, cols = np.divmod(changes, padded_width)  # cols: the start column, or one past the end column, in the patch
    bounds = (rows + y0) * width + (cols + x0)
    # An end (odd index) equal to the next start (even index) is a run continuing across a row break: merge.
    joined = np.flatnonzero(bounds[1:-1:2] == bounds[2::2])
    if len(joined):
        drop = np.concatenate([2 * joined + 1, 2 * joined + 2])
        bounds = np.delete(bounds, drop)
    counts = np.diff(np.concatenate([[0], bounds, [total]]))
    return counts[:-1] if counts[-1] == 0 else counts


def legacy_rle(y0: int, x0: int, patch: np.ndarray, image_hw: tuple[int, int]) -> dict:
    """The seed containers' ``segmentation`` (docs/seed-containers.md#legacy-rle): uncompressed, ROW-major run
    lengths as JSON ints, starting with a count of zeros (possibly 0), ``size`` [H, W]. Decode with ``np.repeat`` of
    alternating 0/1 and a C-order reshape to (H, W). NOT pycocotools' format (column-major): pycocotools would decode
    it transposed-wrong.
    """
    counts = _scan_run_lengths(patch, y0, x0, image_hw)
    return {"counts": counts.tolist(), "size": [int(image_hw[0]), int(image_hw[1])]}


def coco_rle_of_patch(y0: int, x0: int, patch: np.ndarray, image_hw: tuple[int, int]) -> dict:
    """Standard COCO RLE of one placed patch, byte-identical to ``coco_rle`` of the full mask: column-major runs
    (the row-major runs of the transposed mask), compressed by pycocotools; ``counts`` is an ASCII str."""
    height, width = image_hw
    # cv2.transpose makes the contiguous transposed copy ~1.3x faster than numpy's strided copy on large patches.
    transposed = cv2.transpose(np.ascontiguousarray(patch, dtype=np.uint8)) if patch.size else patch.T
    counts = _scan_run_lengths(transposed, x0, y0, (width, height))
    encoded = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [height, width]}, height, width)
    return {"size": [int(height), int(width)], "counts": encoded["counts"].decode("ascii")}


def polygons_of_patch(y0: int, x0: int, patch: np.ndarray) -> list[list[float]]:
    """Outer contours of one placed patch as COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` in image pixels.

    Vertices are the centres of the boundary pixels (pixel (i, j) has centre (j + 0.5, i + 0.5), the same frame as
    the boxes). Holes are not represented (COCO polygons cannot express them): use RLE for exact masks.
    """
    if patch.size == 0:
        return []
    contours, _ = cv2.findContours(
        np.ascontiguousarray(patch, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0)
    )
    # pycocotools needs at least 3 vertices; thinner pieces (1-2 pixel lines) have no area as polygons.
    return [(c.reshape(-1).astype(np.float64) + 0.5).tolist() for c in contours if len(c) >= 3]
