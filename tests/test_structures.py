"""Detections, the typed per-image result of every backend: shapes, selection, the empty result (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from assertions import SHAPE_NAMES, shape_detections

from maskrcnn_serving.structures import Detections


def empty_detections(with_masks: bool = True) -> Detections:
    masks = np.zeros((0, 28, 28), np.float32) if with_masks else None
    return Detections(boxes=np.zeros((0, 4), np.float32), scores=np.zeros((0,), np.float32),
                      labels=np.zeros((0,), np.int64), class_names=SHAPE_NAMES, image_hw=(48, 64), mask_probs=masks)


def test_shapes_names_and_masks():
    dets = shape_detections()
    assert len(dets) == 3 and dets.boxes.shape == (3, 4) and dets.mask_probs.shape == (3, 28, 28)
    assert dets.names == ["ring", "circle", "ring"] and dets.has_masks
    assert not shape_detections(with_masks=False).has_masks
    assert dets.accurate_paste and dets.embeddings is None and dets.image_embedding is None


@pytest.mark.parametrize("keep", [[2, 0], np.array([2, 0]), (2, 0)])
def test_select_takes_rows_in_the_order_given(keep):
    dets = shape_detections()
    dets.embeddings = np.arange(15, dtype=np.float32).reshape(3, 5)
    dets.image_embedding = np.ones(4, np.float32)
    dets.accurate_paste = False
    rows = [2, 0]
    picked = dets.select(keep)
    np.testing.assert_array_equal(picked.boxes, dets.boxes[rows])
    np.testing.assert_array_equal(picked.scores, dets.scores[rows])
    np.testing.assert_array_equal(picked.labels, dets.labels[rows])
    np.testing.assert_array_equal(picked.mask_probs, dets.mask_probs[rows])
    np.testing.assert_array_equal(picked.embeddings, dets.embeddings[rows])
    assert picked.image_embedding is dets.image_embedding and picked.class_names is dets.class_names
    assert (picked.image_hw, picked.accurate_paste) == ((48, 64), False)
    assert len(dets) == 3  # the original is unchanged


def test_a_boolean_mask_keeps_score_order():
    dets = shape_detections()
    picked = dets.select(dets.scores > 0.7)
    assert picked.scores.tolist() == pytest.approx([0.97, 0.81234567]) and picked.labels.tolist() == [4, 1]
    np.testing.assert_array_equal(dets.select(np.array([True, False, True])).boxes, dets.boxes[[0, 2]])


@pytest.mark.parametrize("keep", [[], np.array([], np.int64), np.zeros(3, bool)])
def test_selecting_nothing_gives_empty_detections_of_the_same_shapes(keep):
    picked = shape_detections().select(keep)
    assert len(picked) == 0 and picked.boxes.shape == (0, 4) and picked.mask_probs.shape == (0, 28, 28)
    assert picked.names == [] and picked.has_masks


def test_empty_detections():
    for with_masks in (True, False):
        dets = empty_detections(with_masks)
        assert len(dets) == 0 and dets.names == [] and dets.has_masks is with_masks
        assert len(dets.select([])) == 0 and dets.select([]).boxes.shape == (0, 4)


def test_structures_import_no_layer_of_the_package():
    """Detections is the bottom of the house: pasting and encoding live above it (postprocess.py)."""
    import ast
    from pathlib import Path

    import maskrcnn_serving.structures as structures

    tree = ast.parse(Path(structures.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.startswith("maskrcnn_serving")}, imported
