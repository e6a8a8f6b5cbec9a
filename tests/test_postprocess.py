"""Post-processing: the class filter and max_detections, masks pasted at box size, the annotation records of every
format, the search fields (no model: hand-made detections)."""

from __future__ import annotations

import numpy as np
import pytest
from assertions import shape_detections

from maskrcnn_serving.modeling.paste import paste_masks
from maskrcnn_serving.postprocess import (
    add_search_fields,
    encode_annotations,
    filter_detections,
    full_masks,
    instance_masks,
    paste_for_options,
)
from maskrcnn_serving.request import RequestOptions


def test_legacy_annotations_match_the_seed_layout():
    dets = shape_detections()
    options = RequestOptions(score_threshold=0.5)
    annotations = encode_annotations(dets, options, paste_for_options(dets, options))
    first = annotations[0]
    assert list(first) == ["bbox", "category_id", "category_name", "score", "segmentation"]
    x1, y1, x2, y2 = (float(v) for v in dets.boxes[0])
    assert first["bbox"] == [int(x1), int(y1), int(x2 - x1), int(y2 - y1)]  # docs/seed-containers.md#bbox
    assert first["bbox"] == [10, 5, 19, 15]
    assert (first["category_id"], first["category_name"]) == (4, "ring")
    assert annotations[1]["score"] == 0.81235
    full = full_masks(dets, 0.5)
    for annotation, mask in zip(annotations, full, strict=True):
        counts = annotation["segmentation"]["counts"]
        assert annotation["segmentation"]["size"] == [48, 64]
        decoded = np.repeat(np.arange(len(counts)) % 2, counts).reshape(48, 64)
        assert np.array_equal(decoded, mask)


def test_coco_polygon_and_boxes_annotations():
    dets = shape_detections()
    for fmt in ("coco", "polygon", "boxes"):
        options = RequestOptions(score_threshold=0.5, format=fmt)
        annotations = encode_annotations(dets, options, paste_for_options(dets, options))
        assert annotations[0]["bbox"] == [10.7, 5.2, 19.4, 15.7]
        if fmt == "coco":
            assert isinstance(annotations[0]["segmentation"]["counts"], str)
        elif fmt == "polygon":
            assert all(len(p) >= 6 for p in annotations[0]["segmentation"])
        else:
            assert "segmentation" not in annotations[0]


def test_filter_classes_then_max_detections():
    dets = shape_detections()
    options = RequestOptions(score_threshold=0.5, classes=frozenset({4}), max_detections=1)
    kept = filter_detections(dets, options, default_max=100)
    assert kept.labels.tolist() == [4] and kept.scores.tolist() == pytest.approx([0.97])
    assert len(filter_detections(dets, RequestOptions(score_threshold=0.5), 2)) == 2


def test_filter_keeps_the_same_object_when_nothing_is_dropped_and_can_drop_everything():
    dets = shape_detections()
    assert filter_detections(dets, RequestOptions(score_threshold=0.5), default_max=100) is dets
    none = filter_detections(dets, RequestOptions(score_threshold=0.5, classes=frozenset({2})), default_max=100)
    assert len(none) == 0 and none.boxes.shape == (0, 4) and none.mask_probs.shape == (0, 28, 28)
    options = RequestOptions(score_threshold=0.5)
    assert encode_annotations(none, options, paste_for_options(none, options)) == []


@pytest.mark.parametrize("accurate", [True, False])
def test_pasted_masks_placed_in_the_image_are_the_full_masks(accurate):
    """Each mask's window, put at (y0, x0) of an empty image, is the full mask (both paste methods); the full masks
    are modeling/paste.py's, and a window spans its box (grown by (M + 2) / M for the accurate paste's padding, and a
    few pixels of slack), never the image."""
    dets = shape_detections()
    dets.accurate_paste = accurate
    full = full_masks(dets, 0.4)
    assert full.shape == (3, 48, 64) and full.dtype == np.uint8 and set(np.unique(full)) == {0, 1}
    np.testing.assert_array_equal(full, paste_masks(dets.boxes, dets.mask_probs, (48, 64), 0.4, accurate))
    for runs, mask, box in zip(instance_masks(dets, 0.4), full, dets.boxes, strict=True):
        patch = runs.patch()
        placed = np.zeros((48, 64), np.uint8)
        placed[runs.y0 : runs.y0 + patch.shape[0], runs.x0 : runs.x0 + patch.shape[1]] = patch
        np.testing.assert_array_equal(placed, mask)
        height, width = (box[3] - box[1]) * 30 / 28 + 4, (box[2] - box[0]) * 30 / 28 + 4
        assert patch.shape[0] <= height < 48 and patch.shape[1] <= width < 64


def test_mask_threshold_and_formats_decide_what_is_pasted():
    dets = shape_detections()
    assert paste_for_options(dets, RequestOptions(0.5, format="boxes")) is None
    assert paste_for_options(shape_detections(with_masks=False), RequestOptions(0.5)) is None
    assert len(paste_for_options(dets, RequestOptions(0.5, format="polygon"))) == 3
    above = paste_for_options(dets, RequestOptions(0.5, mask_threshold=0.95))  # every probability is 0.9 or 0
    assert all(mask.area == 0 for mask in above)


def test_masks_of_a_model_without_a_mask_head_are_an_error():
    dets = shape_detections(with_masks=False)
    with pytest.raises(ValueError, match="no mask head"):
        full_masks(dets)
    with pytest.raises(ValueError, match="no mask head"):
        next(instance_masks(dets))


def test_search_fields_are_added_where_asked():
    class Found:
        def __init__(self, number: int) -> None:
            self.number = number

        def to_json(self) -> dict:
            return {"id": self.number}

    dets = shape_detections()
    dets.embeddings = np.eye(3, 5, dtype=np.float32)
    records = encode_annotations(dets, RequestOptions(0.5, format="boxes"), None)
    add_search_fields(records, dets, RequestOptions(0.5, format="boxes"), None)
    assert all(set(r) == {"bbox", "category_id", "category_name", "score"} for r in records)
    add_search_fields(records, dets, RequestOptions(0.5, format="boxes", embeddings=True),
                      [[Found(i), Found(i + 10)] for i in range(3)])
    np.testing.assert_array_equal(records[1]["embedding"], dets.embeddings[1])
    assert records[2]["neighbours"] == [{"id": 2}, {"id": 12}]
