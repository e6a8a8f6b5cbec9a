"""Mask decoders (legacy row-major RLE, COCO RLE, polygons) and drawing."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from assertions import LEGACY_RLE_EXAMPLES

from maskrcnn_serving import encoding, visualize
from maskrcnn_serving.bench.seed_rle import seed_binary_mask_to_rle
from maskrcnn_serving.encoding import coco_rle
from maskrcnn_serving.postprocess import full_masks
from maskrcnn_serving.structures import MaskRuns


def random_masks(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blobby (N, H, W) uint8 masks, including an empty and a full one, with runs crossing row ends."""
    rng = np.random.default_rng(seed)
    noise = rng.random((count, height // 4 + 1, width // 4 + 1)).astype(np.float32)
    masks = np.stack([cv2.resize(n, (width, height), interpolation=cv2.INTER_LINEAR) > 0.55 for n in noise])
    masks = masks.astype(np.uint8)
    masks[0] = 0
    masks[1] = 1
    return masks


@pytest.mark.parametrize(("mask", "counts"), LEGACY_RLE_EXAMPLES)
def test_legacy_rle_examples_from_the_spec(mask, counts):
    mask = np.array(mask, dtype=np.uint8)
    decoded = visualize.decode_legacy_rle(counts, mask.shape)
    assert decoded.dtype == np.uint8 and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)
    assert seed_binary_mask_to_rle(mask)["counts"] == counts


def test_legacy_rle_round_trip_through_the_seed_encoder():
    for mask in random_masks(6, 23, 31):
        rle = seed_binary_mask_to_rle(mask)
        np.testing.assert_array_equal(visualize.decode_legacy_rle(rle["counts"], rle["size"]), mask)


def test_legacy_rle_is_row_major_not_coco():
    mask = np.array([[0, 1, 1], [0, 0, 1]], dtype=np.uint8)
    # Read column-major (as pycocotools would), the same counts give a different mask.
    assert not np.array_equal(visualize.decode_coco_rle({"counts": [1, 2, 2, 1], "size": [2, 3]}), mask)
    np.testing.assert_array_equal(visualize.decode_coco_rle({"counts": [2, 1, 1, 2], "size": [2, 3]}), mask)


@pytest.mark.parametrize("counts", [[1, 2, 2], [1, 2, 2, 2], [-1, 7]])
def test_legacy_rle_rejects_counts_that_do_not_cover_the_image(counts):
    with pytest.raises(ValueError):
        visualize.decode_legacy_rle(counts, [2, 3])


def test_coco_rle_round_trip_with_the_project_encoder_and_pycocotools():
    masks = random_masks(5, 37, 29, seed=1)
    for mask, rle in zip(masks, coco_rle(masks), strict=True):
        assert isinstance(rle["counts"], str)
        np.testing.assert_array_equal(visualize.decode_coco_rle(rle), mask)
        as_bytes = {"counts": rle["counts"].encode("ascii"), "size": rle["size"]}
        np.testing.assert_array_equal(visualize.decode_coco_rle(as_bytes), mask)


def test_uncompressed_coco_counts_decode_column_major():
    mask = random_masks(3, 9, 7, seed=2)[2]
    column_major_counts = seed_binary_mask_to_rle(np.ascontiguousarray(mask.T))["counts"]
    rle = {"counts": column_major_counts, "size": list(mask.shape)}
    np.testing.assert_array_equal(visualize.decode_coco_rle(rle), mask)
    np.testing.assert_array_equal(visualize.segmentation_to_mask(rle, fmt="coco"), mask)


def test_polygons_fill_the_pixels_whose_centres_are_inside():
    # Centres (j + 0.5, i + 0.5) inside x 1.2..4.8, y 1.2..3.8: columns 1-4, rows 1-3.
    expected = np.zeros((6, 7), np.uint8)
    expected[1:4, 1:5] = 1
    rectangle = [[1.2, 1.2, 4.8, 1.2, 4.8, 3.8, 1.2, 3.8]]
    np.testing.assert_array_equal(visualize.decode_polygons(rectangle, (6, 7)), expected)
    # Two rings are united; an overlap is not cut out (even-odd filling would).
    two = [[0.5, 0.5, 3.5, 0.5, 3.5, 3.5, 0.5, 3.5], [2.5, 2.5, 5.5, 2.5, 5.5, 4.5, 2.5, 4.5]]
    union = np.zeros((6, 7), np.uint8)
    union[0:4, 0:4] = 1
    union[2:5, 2:6] = 1
    np.testing.assert_array_equal(visualize.decode_polygons(two, (6, 7)), union)
    assert visualize.decode_polygons([], (6, 7)).sum() == 0
    assert visualize.decode_polygons([[1, 1, 2, 2]], (6, 7)).sum() == 0  # fewer than 3 vertices: no area


def hole_free(masks: np.ndarray) -> np.ndarray:
    """The masks with holes filled and components too thin for a polygon (< 3 contour vertices) removed."""
    out = np.zeros_like(masks)
    for i, mask in enumerate(masks):
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out[i], [c for c in contours if len(c) >= 3], -1, 1, cv2.FILLED)
    return out


def test_round_trip_through_the_server_encoders():
    """legacy and coco are exact for any mask; polygons (which cannot carry holes) for hole-free masks."""
    masks = random_masks(40, 45, 53, seed=6)
    for mask in masks:
        ys, xs = np.nonzero(mask) if mask.any() else (np.array([0]), np.array([0]))
        y0, x0 = int(ys.min()), int(xs.min())
        patch = mask[y0 : ys.max() + 1, x0 : xs.max() + 1]
        legacy = encoding.legacy_rle(MaskRuns.from_patch(y0, x0, patch, mask.shape))
        assert legacy == seed_binary_mask_to_rle(mask)
        np.testing.assert_array_equal(visualize.segmentation_to_mask(legacy), mask)
        coco = encoding.coco_rle_of_mask(MaskRuns.from_patch(y0, x0, patch, mask.shape))
        np.testing.assert_array_equal(visualize.segmentation_to_mask(coco), mask)
    for mask in hole_free(masks):
        polygons = encoding.polygons_of_mask(MaskRuns.from_patch(0, 0, mask, mask.shape))
        np.testing.assert_array_equal(visualize.segmentation_to_mask(polygons, mask.shape), mask)


def test_annotations_in_every_format_give_the_same_masks():
    masks = random_masks(4, 40, 50, seed=3)
    legacy = [{"segmentation": seed_binary_mask_to_rle(m)} for m in masks]
    coco = [{"segmentation": r} for r in coco_rle(masks)]
    np.testing.assert_array_equal(visualize.annotations_to_masks(legacy), masks)
    np.testing.assert_array_equal(visualize.annotations_to_masks(coco), masks)
    np.testing.assert_array_equal(visualize.annotations_to_masks(coco, image_hw=(40, 50), fmt="coco"), masks)
    assert visualize.annotations_to_masks([], image_hw=(40, 50)).shape == (0, 40, 50)
    with pytest.raises(ValueError, match="does not match"):
        visualize.annotations_to_masks(legacy, image_hw=(50, 40))
    with pytest.raises(ValueError, match="no segmentation"):
        visualize.annotations_to_masks([{"bbox": [0, 0, 1, 1]}], image_hw=(40, 50))
    with pytest.raises(ValueError, match="image_hw"):
        visualize.segmentation_to_mask([[0, 0, 2, 0, 2, 2]])


def test_class_colours_are_stable_and_distinct():
    colours = [visualize.class_color(k) for k in range(1, 81)]
    assert colours == [visualize.class_color(k) for k in range(1, 81)]
    assert len(set(colours)) == 80
    assert all(all(0 <= c <= 255 for c in colour) for colour in colours)


def _example_annotations(masks: np.ndarray) -> list[dict]:
    annotations = []
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        annotations.append(
            {
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                "category_id": i + 1,
                "category_name": f"class{i + 1}",
                "score": 0.9 - 0.1 * i,
                "segmentation": seed_binary_mask_to_rle(mask),
            }
        )
    return annotations


def test_drawing_changes_the_image_where_the_masks_are_and_keeps_the_input():
    image = np.full((60, 80, 3), 30, dtype=np.uint8)
    masks = np.zeros((2, 60, 80), dtype=np.uint8)
    masks[0, 30:50, 10:30] = 1
    masks[1, 25:45, 50:75] = 1
    annotations = _example_annotations(masks)
    before = image.copy()
    drawn = visualize.draw_annotations(image, annotations)
    np.testing.assert_array_equal(image, before)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    changed = (drawn != image).any(axis=2)
    interior = np.zeros_like(changed)
    interior[35:48, 14:28] = True  # inside mask 0, away from its outline, box and label
    assert changed[interior].all()
    assert not changed[0:10, 35:45].any()  # far from every instance
    # The fill is a blend of the class colour.
    colour = np.array(visualize.class_color(1), dtype=np.float64)
    expected = np.floor(30 * 0.55 + colour * 0.45)
    np.testing.assert_allclose(drawn[40, 20], expected, atol=1)


def test_every_format_draws_the_same_picture():
    image = np.random.default_rng(4).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    masks = random_masks(4, 40, 50, seed=5)[2:]
    legacy = _example_annotations(masks)
    coco = [dict(a, segmentation=r) for a, r in zip(legacy, coco_rle(masks), strict=True)]
    boxes_only = [{k: v for k, v in a.items() if k != "segmentation"} for a in legacy]
    np.testing.assert_array_equal(visualize.draw_annotations(image, legacy), visualize.draw_annotations(image, coco))
    no_masks = visualize.draw_annotations(image, boxes_only)
    assert not np.array_equal(no_masks, visualize.draw_annotations(image, legacy))
    np.testing.assert_array_equal(visualize.draw_annotations(image, []), image)


def test_draw_detections_of_the_demo_model(tensorpack_backend, example_images):
    image = cv2.imread(str(example_images[0]), cv2.IMREAD_COLOR)
    detections = tensorpack_backend.predict([image])[0]
    detections = detections.select(detections.scores > 0.5)
    assert len(detections) > 0
    drawn = visualize.draw_detections(image, detections)
    assert drawn.shape == image.shape
    changed = (drawn != image).any(axis=2)
    masks = full_masks(detections).astype(bool)
    assert changed[masks.any(axis=0)].mean() > 0.9
    # Drawing from patches and from the full masks gives the same picture.
    full = visualize.draw_instances(
        image, detections.boxes, detections.labels, detections.names, detections.scores, list(full_masks(detections))
    )
    np.testing.assert_array_equal(drawn, full)


def test_plot_annotations_uses_matplotlib_lazily():
    code = "import sys, maskrcnn_serving.visualize; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.zeros((30, 40, 3), dtype=np.uint8)
    masks = np.zeros((1, 30, 40), dtype=np.uint8)
    masks[0, 5:20, 5:25] = 1
    ax = visualize.plot_annotations(image, _example_annotations(masks), title="t")
    shown = ax.get_images()[0].get_array()
    assert shown.shape == (30, 40, 3) and ax.get_title() == "t"
    expected = cv2.cvtColor(visualize.draw_annotations(image, _example_annotations(masks)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(np.asarray(shown), expected)
    plt.close("all")
