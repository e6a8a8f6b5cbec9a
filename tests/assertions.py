"""Comparisons and reference data shared by several test files."""

from __future__ import annotations

import numpy as np

# The legacy (seed) format's documented examples: a mask and its row-major run lengths, zeros first.
LEGACY_RLE_EXAMPLES = [
    ([[0, 1, 1], [0, 0, 1]], [1, 2, 2, 1]),
    ([[0, 0, 0], [0, 0, 0]], [6]),
    ([[1, 1, 1], [1, 1, 1]], [0, 6]),
    ([[1, 0], [0, 0]], [0, 1, 3]),
]


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = np.logical_and(a, b).reshape(len(a), -1).sum(1)
    union = np.logical_or(a, b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def assert_same_detections(a, b, box_atol=0.05, min_mask_iou=0.98):
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=box_atol)
    if a.has_masks:
        np.testing.assert_allclose(a.mask_probs, b.mask_probs, atol=1e-3)
        assert mask_iou(a.masks(), b.masks()).min() >= min_mask_iou


def box_iou(box, boxes):
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)
