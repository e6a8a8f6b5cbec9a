"""Comparisons and reference data shared by several test files."""

from __future__ import annotations

import numpy as np

from maskrcnn_serving.postprocess import full_masks
from maskrcnn_serving.structures import Detections

# The legacy (seed) format's documented examples: a mask and its row-major run lengths, zeros first.
LEGACY_RLE_EXAMPLES = [
    ([[0, 1, 1], [0, 0, 1]], [1, 2, 2, 1]),
    ([[0, 0, 0], [0, 0, 0]], [6]),
    ([[1, 1, 1], [1, 1, 1]], [0, 6]),
    ([[1, 0], [0, 0]], [0, 1, 3]),
]


# Class names of the demo model's shapes, and three detections of them on a 64 x 48 image (two overlapping classes,
# a box at the image's corner, scores with more digits than the answers keep).
SHAPE_NAMES = ("BG", "circle", "rectangle", "triangle", "ring")


def shape_detections(with_masks: bool = True) -> Detections:
    probs = np.zeros((3, 28, 28), dtype=np.float32)
    probs[:, 4:24, 4:24] = 0.9
    return Detections(
        boxes=np.array([[10.7, 5.2, 30.1, 20.9], [0.0, 0.0, 12.5, 9.99], [40.0, 30.0, 63.9, 47.5]], np.float32),
        scores=np.array([0.97, 0.81234567, 0.6], np.float32),
        labels=np.array([4, 1, 4]),
        class_names=SHAPE_NAMES,
        image_hw=(48, 64),
        mask_probs=probs if with_masks else None,
    )


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
        assert mask_iou(full_masks(a), full_masks(b)).min() >= min_mask_iou


def box_iou(box, boxes):
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)
