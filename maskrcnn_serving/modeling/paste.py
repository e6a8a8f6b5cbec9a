"""Paste 28x28 mask probabilities into the original image (docs/model-conventions.md#paste).

Frames: ``box`` is (x1, y1, x2, y2) float in original-image pixels, "fpcoor" convention (pixel (i, j) covers
[j, j+1) x [i, i+1), its centre is (j + 0.5, i + 0.5)). A pasted mask is a :class:`MaskRuns`: the runs of set pixels
along the image rows, inside a box-sized window.

Two methods, as in tensorpack's ``eval.py``:

* accurate (``MRCNN.ACCURATE_PASTE=True``, the default): pad the M x M mask with one zero pixel on each side, grow
  the box about its centre by (M+2)/M, and evaluate bilinear interpolation between knots at 0.5 .. M+1.5 at every
  pixel centre, 0 outside the knots; keep ``>= threshold``. tensorpack did this with SciPy's ``interp2d`` (removed in
  SciPy 1.14) over the whole image. Bilinear interpolation on a grid is separable: first each pixel row's values at
  the knot columns (linear between two knot rows), then along the row, linear between two knot columns. So a row's
  set pixels are runs whose ends lie in the knot intervals where the value crosses the threshold. Each end is solved
  from the two knot values, then checked against the pixel values beside it, so no value is made per pixel: on a
  12-megapixel photo's 100 masks this is 4-5x faster than the per-pixel product it replaced, with the same pixels
  (docs/optimized-backend.md, "The mask paste without a value per pixel").
* fast (``MRCNN.ACCURATE_PASTE=False``): cv2 bilinear resize of the mask to the rounded box, ``> threshold``.

A pixel value is the two-knot sum of the formula, in float64, as ``tests/modeling/test_paste.py``'s per-pixel
reference computes it; orders of rounding differ only for a value within about 1e-16 of the threshold.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from maskrcnn_serving.structures import MaskRuns


def _knot_positions(lo: float, hi: float, first: int, stop: int, knots: int) -> np.ndarray:
    """The positions of the centres of pixels first..stop-1 among the knots of the grown box [lo, hi], in knot
    units counted from the first knot: knot l is at l, a pixel at l + t (0 <= t <= 1) lies between knots l and
    l + 1 with weight t on l + 1 (the last interval also holds t = 1). A pixel outside [0, knots - 1] has value 0.

    That is u - 0.5 for u = (centre - lo) / (hi - lo) * knots.
    """
    return (np.arange(first, stop) + 0.5 - lo) / (hi - lo) * knots - 0.5


def _inside(positions: np.ndarray, knots: int) -> tuple[int, int]:
    """The index range of the (increasing) positions inside the knots, [0, knots - 1]."""
    return int(np.searchsorted(positions, 0.0)), int(np.searchsorted(positions, knots - 1, side="right"))


def _segments(positions: np.ndarray, knots: int) -> tuple[np.ndarray, np.ndarray]:
    """Each inside position's knot interval l and its weight t (position - l)."""
    segment = np.minimum(positions.astype(np.int64), knots - 2)  # positions >= 0: truncation is floor
    return segment, positions - segment


def paste_mask(
    box: np.ndarray, mask: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.5, accurate: bool = True
) -> MaskRuns:
    """Paste one (M, M) mask of probabilities for ``box``: the pixels whose pasted value is ``>= threshold``
    (accurate) or ``> threshold`` (fast). ``threshold`` must be > 0 (a pixel outside the knots has value 0)."""
    if not threshold > 0:
        raise ValueError(f"the mask threshold must be > 0, got {threshold}")
    if accurate:
        return _paste_accurate(box, mask, (int(image_hw[0]), int(image_hw[1])), float(threshold))
    y0, x0, patch = _paste_fast(box, mask, image_hw, threshold)
    return MaskRuns.from_patch(y0, x0, patch, image_hw)


def _grown_box(box: np.ndarray, knots: int) -> tuple[float, float, float, float] | None:
    """(bx0, bx1, by0, by1): the box grown about its centre by knots / (knots - 2), or None when it is empty."""
    m = knots - 2
    x1, y1, x2, y2 = (float(v) for v in box)
    half_w, half_h = (x2 - x1) * 0.5 * knots / m, (y2 - y1) * 0.5 * knots / m
    cx, cy = (x1 + x2) * 0.5, (y1 + y2) * 0.5
    grown = cx - half_w, cx + half_w, cy - half_h, cy + half_h
    if not (grown[1] > grown[0] and grown[3] > grown[2]) or not all(map(math.isfinite, grown)):
        return None
    return grown


def _pixel_range(lo: float, hi: float, size: int, knots: int) -> tuple[int, int]:
    """The pixels whose centre falls between the outer knots (0.5 and knots - 0.5), with one pixel of slack."""
    first = lo + (hi - lo) * 0.5 / knots
    last = lo + (hi - lo) * (knots - 0.5) / knots
    return max(0, math.floor(first - 0.5) - 1), min(size, math.ceil(last - 0.5) + 2)


def _paste_accurate(box: np.ndarray, mask: np.ndarray, image_hw: tuple[int, int], threshold: float) -> MaskRuns:
    knots = mask.shape[0] + 2
    grown = _grown_box(box, knots)
    if grown is None:
        return MaskRuns.empty(image_hw)
    bx0, bx1, by0, by1 = grown
    xa, xb = _pixel_range(bx0, bx1, image_hw[1], knots)
    ya, yb = _pixel_range(by0, by1, image_hw[0], knots)
    if xb <= xa or yb <= ya:
        return MaskRuns.empty(image_hw)
    padded = np.zeros((knots, knots), dtype=np.float64)
    padded[1:-1, 1:-1] = mask

    # (rows, knots): the values of each pixel row inside the knots at the knot columns (rows outside are 0).
    row_positions = _knot_positions(by0, by1, ya, yb, knots)
    row_first, row_stop = _inside(row_positions, knots)
    row_segment, row_t = _segments(row_positions[row_first:row_stop], knots)
    row_t = row_t[:, None]
    knot_values = padded[row_segment] * (1.0 - row_t) + padded[row_segment + 1] * row_t

    # Along a row the value is linear in each segment, so set pixels begin or end only in segments whose two knots
    # lie on either side of the threshold. Every row starts and ends below it (the padding's knots are 0), so a
    # row's crossings alternate up, down, up, ...; np.nonzero lists them row by row, left to right.
    above = knot_values >= threshold
    rows, segment = np.nonzero(above[:, 1:] != above[:, :-1])
    left, right = knot_values[rows, segment], knot_values[rows, segment + 1]
    rising = right >= threshold

    # Segment l holds the window's columns [segment_start[l], segment_start[l + 1]): those at positions >= l.
    column_positions = _knot_positions(bx0, bx1, xa, xb, knots)
    column_first, column_stop = _inside(column_positions, knots)
    segment_start = np.empty(knots, np.int64)
    segment_start[:-1] = np.searchsorted(column_positions, np.arange(knots - 1))  # [0] is column_first
    segment_start[-1] = column_stop
    lo, hi = segment_start[segment], segment_start[segment + 1]
    # The weight of each inside column (column hi may be one past the window: read, never used for a decision).
    weight = np.zeros(xb - xa + 1)
    weight[column_first:column_stop] = _segments(column_positions[column_first:column_stop], knots)[1]

    def beyond(column: np.ndarray) -> np.ndarray:
        """Whether the pixel in ``column`` is on the far side of its crossing (set after a rise, unset after a
        fall), by the pixel's own value."""
        t = weight[column]
        return ((left * (1.0 - t) + right * t) >= threshold) == rising

    # Each run end is the first column of its segment beyond the crossing: the line solved for it, rounded up to a
    # pixel centre, then stepped (at most one column in practice) until the pixel values beside it agree.
    crossing = segment + (threshold - left) / (right - left)
    column = np.ceil((crossing + 0.5) / knots * (bx1 - bx0) + bx0 - 0.5) - xa
    column = np.fmax(np.fmin(column, hi), lo).astype(np.int64)  # fmin/fmax: a NaN probability's column is hi or lo
    for _ in range(knots):
        step = (column < hi) & ~beyond(column)
        if not step.any():
            break
        column += step
    for _ in range(knots):
        step = (column > lo) & beyond(column - 1)
        if not step.any():
            break
        column -= step
    starts, ends = column[0::2], column[1::2]
    keep = ends > starts
    return MaskRuns(ya, xa, yb - ya, xb - xa, image_hw, rows[0::2][keep] + row_first, starts[keep], ends[keep])


def _paste_fast(
    box: np.ndarray, mask: np.ndarray, image_hw: tuple[int, int], threshold: float
) -> tuple[int, int, np.ndarray]:
    h_img, w_img = image_hw
    x0, y0 = int(box[0] + 0.5), int(box[1] + 0.5)
    x1, y1 = int(box[2] - 0.5), int(box[3] - 0.5)
    x1, y1 = max(x0, x1), max(y0, y1)
    w, h = x1 + 1 - x0, y1 + 1 - y0
    patch = (cv2.resize(mask.astype(np.float32), (w, h)) > threshold).astype(np.uint8)
    # Boxes are clipped to [0, W] x [0, H], so only the far edge can overhang by one pixel.
    return y0, x0, patch[: max(0, h_img - y0), : max(0, w_img - x0)]


def paste_masks(
    boxes: np.ndarray,
    masks: np.ndarray,
    image_hw: tuple[int, int],
    threshold: float = 0.5,
    accurate: bool = True,
) -> np.ndarray:
    """Paste (N, M, M) mask probabilities for (N, 4) boxes into (N, H, W) uint8 full-image masks."""
    out = np.zeros((len(boxes), *image_hw), dtype=np.uint8)
    for i, (box, mask) in enumerate(zip(boxes, masks, strict=True)):
        runs = paste_mask(box, mask, image_hw, threshold, accurate)
        out[i, runs.y0 : runs.y0 + runs.height, runs.x0 : runs.x0 + runs.width] = runs.patch()
    return out
