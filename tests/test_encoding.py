"""Mask encoders of pasted masks (MaskRuns): the seed's row-major RLE, COCO RLE, polygons."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrcnn_serving.bench.seed_rle import seed_binary_mask_to_rle
from maskrcnn_serving.encoding import coco_rle, coco_rle_of_mask, legacy_rle, polygons_of_mask
from maskrcnn_serving.structures import MaskRuns

# pycocotools 2.0.11 under numpy 2 warns on every decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def placed(full_hw, y0, x0, patch):
    full = np.zeros(full_hw, dtype=np.uint8)
    full[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch[: full_hw[0] - y0, : full_hw[1] - x0]
    return full


@pytest.mark.parametrize(
    ("mask", "counts"),
    [
        ([[0, 1, 1], [0, 0, 1]], [1, 2, 2, 1]),  # the examples of docs/seed-containers.md#legacy-rle
        ([[0, 0, 0], [0, 0, 0]], [6]),
        ([[1, 1, 1], [1, 1, 1]], [0, 6]),
        ([[1, 0], [0, 0]], [0, 1, 3]),
    ],
)
def test_legacy_rle_spec_examples(mask, counts):
    mask = np.array(mask, dtype=np.uint8)
    assert legacy_rle(MaskRuns.from_patch(0, 0, mask, mask.shape)) == {"counts": counts, "size": list(mask.shape)}


def test_legacy_rle_merges_runs_across_row_breaks():
    # Ones touching the right edge of row 0 and the left edge of row 1 are one run in a flat scan.
    full = np.array([[0, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=np.uint8)
    assert legacy_rle(MaskRuns.from_patch(0, 0, full, full.shape))["counts"] == [2, 2, 5]
    # The same from a patch that spans the whole width.
    assert legacy_rle(MaskRuns.from_patch(0, 0, full[:2], full.shape))["counts"] == [2, 2, 5]


def test_encoders_match_references_on_random_patches():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        height, width = (int(v) for v in rng.integers(1, 13, 2))
        ph, pw = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        y0, x0 = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
        patch = (rng.random((ph, pw)) < rng.random()).astype(np.uint8)
        full = placed((height, width), y0, x0, patch)
        legacy = legacy_rle(MaskRuns.from_patch(y0, x0, patch, (height, width)))
        assert legacy["counts"] == seed_binary_mask_to_rle(full)["counts"]
        assert sum(legacy["counts"]) == height * width
        assert coco_rle_of_mask(MaskRuns.from_patch(y0, x0, patch, (height, width))) == coco_rle(full[None])[0]


def test_patch_overhanging_the_image_is_clipped():
    patch = np.ones((4, 4), dtype=np.uint8)
    full = placed((5, 5), 3, 3, patch)
    assert legacy_rle(MaskRuns.from_patch(3, 3, patch, (5, 5)))["counts"] == seed_binary_mask_to_rle(full)["counts"]
    assert coco_rle_of_mask(MaskRuns.from_patch(3, 3, patch, (5, 5))) == coco_rle(full[None])[0]


def test_legacy_rle_is_row_major_not_pycocotools():
    full = np.array([[0, 1, 1], [0, 0, 1]], dtype=np.uint8)
    rle = legacy_rle(MaskRuns.from_patch(0, 0, full, full.shape))
    # pycocotools reads uncompressed counts column-major: it would decode these counts into a different mask.
    wrong = mask_utils.decode(mask_utils.frPyObjects(rle, 2, 3))
    assert not np.array_equal(wrong, full)


def test_large_mask_is_fast_and_exact():
    rng = np.random.default_rng(1)
    full = np.zeros((2000, 3000), dtype=np.uint8)
    cv2.circle(full, (1500, 1000), 700, 1, -1)
    full[900:1100, 1400:1600] = rng.random((200, 200)) < 0.5  # many short runs
    ys, xs = np.nonzero(full)
    y0, x0 = int(ys.min()), int(xs.min())
    patch = full[y0 : ys.max() + 1, x0 : xs.max() + 1]
    counts = np.array(legacy_rle(MaskRuns.from_patch(y0, x0, patch, full.shape))["counts"])
    values = np.arange(len(counts)) % 2
    assert np.array_equal(np.repeat(values, counts).reshape(full.shape).astype(np.uint8), full)
    assert coco_rle_of_mask(MaskRuns.from_patch(y0, x0, patch, full.shape)) == coco_rle(full[None])[0]


def test_polygons_cover_the_mask():
    full = np.zeros((120, 160), dtype=np.uint8)
    cv2.ellipse(full, (80, 60), (50, 30), 20, 0, 360, 1, -1)
    cv2.rectangle(full, (5, 5), (20, 30), 1, -1)
    ys, xs = np.nonzero(full)
    y0, x0 = int(ys.min()), int(xs.min())
    polygons = polygons_of_mask(MaskRuns.from_patch(y0, x0, full[y0 : ys.max() + 1, x0 : xs.max() + 1], full.shape))
    assert len(polygons) == 2
    assert all(len(p) % 2 == 0 and len(p) >= 6 for p in polygons)
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, *full.shape))
    iou = mask_utils.iou([rle], [mask_utils.encode(np.asfortranarray(full))], [0])[0][0]
    assert iou > 0.95


def test_empty_patch_encodings():
    empty = np.zeros((0, 0), dtype=np.uint8)
    assert legacy_rle(MaskRuns.from_patch(0, 0, empty, (3, 4)))["counts"] == [12]
    assert mask_utils.decode(coco_rle_of_mask(MaskRuns.from_patch(0, 0, empty, (3, 4)))).sum() == 0
    assert polygons_of_mask(MaskRuns.from_patch(0, 0, empty, (3, 4))) == []
