"""The seed containers' RLE encoder (docs/seed-containers.md#legacy-rle), the baseline of ``bench compare rle``.

It walks every pixel of every full-size mask with ``itertools.groupby`` in Python: seconds per request at 100
detections. Never use it to serve; the project's encoder must produce exactly the same ``counts``.
"""

from __future__ import annotations

from itertools import groupby

import numpy as np


def seed_binary_mask_to_rle(binary_mask: np.ndarray) -> dict:
    """Row-major (C order) uncompressed RLE of an (H, W) {0, 1} mask: counts alternate zeros, ones, ...; the first
    count is of zeros (0 when the first pixel is 1); ``size`` is [H, W]."""
    counts: list[int] = []
    for index, (value, run) in enumerate(groupby(binary_mask.ravel(order="C"))):
        if index == 0 and value == 1:
            counts.append(0)
        counts.append(len(list(run)))
    return {"counts": counts, "size": list(binary_mask.shape)}
