"""FPN anchors in tensorpack's unquantized convention (docs/model-conventions.md#anchors).

Anchor (i, j, a) of a level with stride s is ``cell[a] + (j*s, i*s, j*s, i*s)``: centred on (j*s, i*s), no +1.
Cell anchors for one size S and ratio r = h/w: ``w = sqrt(S*S / r)``, ``h = r * w``, box ``[-w/2, -h/2, w/2, h/2]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def cell_anchors(size: float, ratios: Sequence[float]) -> np.ndarray:
    """(A, 4) float64 xyxy anchors centred on the origin, one per ratio, in the order given."""
    rows = []
    for ratio in ratios:
        w = math.sqrt(size * size / ratio)
        h = ratio * w
        rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return np.asarray(rows, dtype=np.float64)


def grid_anchors(stride: int, size: float, ratios: Sequence[float], field_h: int, field_w: int) -> np.ndarray:
    """(field_h, field_w, A, 4) float32 anchors of one level, in network-input pixels."""
    ys = np.arange(field_h, dtype=np.float64) * stride
    xs = np.arange(field_w, dtype=np.float64) * stride
    shift_y, shift_x = np.meshgrid(ys, xs, indexing="ij")
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1)  # (fh, fw, 4)
    anchors = shifts[:, :, None, :] + cell_anchors(size, ratios)[None, None, :, :]
    return anchors.astype(np.float32)


def fpn_anchors(
    strides: Sequence[int], sizes: Sequence[float], ratios: Sequence[float], max_size: float
) -> list[np.ndarray]:
    """Anchors for every level over the largest input the resize can produce (``ceil(max_size / stride)``
    cells per side); a graph slices them to its feature-map size."""
    out = []
    for stride, size in zip(strides, sizes, strict=True):
        field = int(math.ceil(max_size / stride))
        out.append(grid_anchors(stride, size, ratios, field, field))
    return out
