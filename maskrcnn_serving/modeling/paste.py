"""Paste 28x28 mask probabilities into the original image (docs/model-conventions.md#paste).

Frames: ``box`` is (x1, y1, x2, y2) float in original-image pixels, "fpcoor" convention (pixel (i, j) covers
[j, j+1) x [i, i+1), its centre is (j + 0.5, i + 0.5)). Outputs are uint8 {0, 1}.

Two methods, as in tensorpack's ``eval.py``:

* accurate (``MRCNN.ACCURATE_PASTE=True``, the default): pad the M x M mask with one zero pixel on each side, grow
  the box about its centre by (M+2)/M, and evaluate bilinear interpolation between knots at 0.5 .. M+1.5 at every
  pixel centre, 0 outside the knots; keep ``>= threshold``. tensorpack did this with SciPy's ``interp2d`` (removed in
  SciPy 1.14) over the whole image; bilinear interpolation on a grid is separable, so here it is ``Wy @ mask @ Wx.T``
  over the box's pixels only, with the same values.
* fast (``MRCNN.ACCURATE_PASTE=False``): cv2 bilinear resize of the mask to the rounded box, ``> threshold``.

The accurate paste's two small matrix products run on ONE BLAS thread: OpenBLAS would otherwise split each of them
across threads, which costs 5-20x more than the product itself on a busy CPU (measured with ``bench model``: 0.4 s
instead of 0.02 s for 100 masks on 640x480 next to a TensorFlow session). OpenBLAS picks its kernel by thread count,
so a product may differ in the last bit (about 1e-16, as it already did between machines with different core
counts); the thresholded masks are the same (tests/modeling/test_paste.py compares them with the threaded products).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import cv2
import numpy as np
from threadpoolctl import ThreadpoolController

PASTE_CHUNK_VALUES = 1 << 20  # float64 values per band of the accurate paste: 8 MB


def _interp_weights(centres: np.ndarray, lo: float, hi: float, knots: int) -> np.ndarray:
    """Rows of bilinear weights (len(centres), knots) for sample positions in the padded-mask frame.

    Position u = (centre - lo) / (hi - lo) * knots; knots sit at 0.5 .. knots - 0.5; outside them the row is 0.
    """
    u = (centres - lo) / (hi - lo) * knots
    f = u - 0.5
    inside = (f >= 0.0) & (f <= knots - 1)
    f = np.where(inside, f, 0.0)
    i0 = np.minimum(np.floor(f).astype(np.int64), knots - 2)
    t = f - i0
    weights = np.zeros((len(centres), knots), dtype=np.float64)
    rows = np.arange(len(centres))
    weights[rows, i0] = np.where(inside, 1.0 - t, 0.0)
    weights[rows, i0 + 1] = np.where(inside, t, 0.0)
    return weights


@cache
def _blas_controller() -> ThreadpoolController:
    """The BLAS libraries loaded in this process (found once; numpy's is loaded by the imports above)."""
    return ThreadpoolController()


# BLAS's thread count is one setting for the whole process, and several threads paste at once (the pipeline's
# annotation workers, the server's request threads): the first to enter limits it, the last to leave restores it.
# Each entering and leaving by itself would let one thread restore the threads while another is still pasting.
_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """BLAS calls inside it use one thread, in every thread that is inside it (about 5 us to enter and leave)."""
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _blas_controller().limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def paste_mask_patch(
    box: np.ndarray, mask: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.5, accurate: bool = True
) -> tuple[int, int, np.ndarray]:
    """Paste one mask; return ``(y0, x0, patch)`` where ``patch`` (h, w) uint8 covers rows y0.. and cols x0..

    Everything outside the patch is 0. The patch may be empty (h or w == 0) for a degenerate box.
    """
    if accurate:
        return _paste_accurate(box, mask, image_hw, threshold)
    return _paste_fast(box, mask, image_hw, threshold)


def _paste_accurate(box, mask, image_hw, threshold):
    h_img, w_img = image_hw
    m = mask.shape[0]
    knots = m + 2
    x1, y1, x2, y2 = (float(v) for v in box)
    half_w, half_h = (x2 - x1) * 0.5 * knots / m, (y2 - y1) * 0.5 * knots / m
    cx, cy = (x1 + x2) * 0.5, (y1 + y2) * 0.5
    bx0, bx1, by0, by1 = cx - half_w, cx + half_w, cy - half_h, cy + half_h
    if not (bx1 > bx0 and by1 > by0) or not all(map(math.isfinite, (bx0, bx1, by0, by1))):
        return 0, 0, np.zeros((0, 0), np.uint8)
    # Pixel centres whose position falls between the outer knots (0.5 and knots - 0.5), with one pixel of slack.
    def pixel_range(lo: float, hi: float, size: int) -> tuple[int, int]:
        first = lo + (hi - lo) * 0.5 / knots
        last = lo + (hi - lo) * (knots - 0.5) / knots
        return max(0, math.floor(first - 0.5) - 1), min(size, math.ceil(last - 0.5) + 2)

    xa, xb = pixel_range(bx0, bx1, w_img)
    ya, yb = pixel_range(by0, by1, h_img)
    if xb <= xa or yb <= ya:
        return 0, 0, np.zeros((0, 0), np.uint8)
    padded = np.zeros((knots, knots), dtype=np.float64)
    padded[1:-1, 1:-1] = mask
    wx = _interp_weights(np.arange(xa, xb) + 0.5, bx0, bx1, knots)
    wy = _interp_weights(np.arange(ya, yb) + 0.5, by0, by1, knots)
    patch = np.empty((yb - ya, xb - xa), np.uint8)
    # The float64 values are made and thresholded PASTE_CHUNK_VALUES at a time (a band of rows), so that a box the
    # size of a large photo does not hold h x w x 8 bytes at once (400 MB for 8100x6075); each value is the same
    # product as over the whole box.
    step = max(1, PASTE_CHUNK_VALUES // patch.shape[1])
    with _single_threaded_blas():
        rows = wy @ padded
        for top in range(0, patch.shape[0], step):
            np.greater_equal(rows[top : top + step] @ wx.T, threshold, out=patch[top : top + step].view(np.bool_))
    return ya, xa, patch


def _paste_fast(box, mask, image_hw, threshold):
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
        y0, x0, patch = paste_mask_patch(box, mask, image_hw, threshold, accurate)
        out[i, y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch
    return out
