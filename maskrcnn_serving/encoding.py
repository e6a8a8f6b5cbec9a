"""Encoders from :class:`Detections` to COCO-style records (used by ``predict``, ``eval`` and the wire formats)."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def coco_rle(masks: np.ndarray) -> list[dict]:
    """Standard COCO RLE (column-major, compressed, ``counts`` a str) of (N, H, W) uint8 masks, as pycocotools
    writes it."""
    if len(masks) == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in encoded]


def xywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 4) xywh floats."""
    out = np.array(boxes, dtype=np.float64, copy=True)
    out[:, 2:] -= out[:, :2]
    return out
