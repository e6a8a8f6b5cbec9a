"""The seed containers' RLE encoder (the oracle of the legacy format and the baseline of ``bench compare rle``)."""

from __future__ import annotations

import numpy as np
import pytest
from assertions import LEGACY_RLE_EXAMPLES


@pytest.mark.parametrize(("mask", "counts"), LEGACY_RLE_EXAMPLES)
def test_seed_encoder_matches_the_documented_examples(mask, counts):
    from maskrcnn_serving.bench.seed_rle import seed_binary_mask_to_rle

    array = np.array(mask, np.uint8)
    assert seed_binary_mask_to_rle(array) == {"counts": counts, "size": list(array.shape)}


def test_our_legacy_rle_equals_the_seed_groupby_encoder_on_random_masks():
    """Full-size masks (shapes and pure noise) and patches placed anywhere, clipped at the image edges."""
    from maskrcnn_serving.bench.images import synthetic_masks
    from maskrcnn_serving.bench.seed_rle import seed_binary_mask_to_rle
    from maskrcnn_serving.encoding import legacy_rle
    from maskrcnn_serving.structures import MaskRuns

    rng = np.random.default_rng(0)
    for mask in synthetic_masks(20, 48, 64, seed=3):
        assert legacy_rle(MaskRuns.from_patch(0, 0, mask, mask.shape)) == seed_binary_mask_to_rle(mask)
    for _ in range(400):
        height, width = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        patch = (rng.random((int(rng.integers(0, 34)), int(rng.integers(0, 34)))) < rng.random()).astype(np.uint8)
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        full = np.zeros((height, width), np.uint8)
        visible = patch[: height - y0, : width - x0]
        full[y0 : y0 + visible.shape[0], x0 : x0 + visible.shape[1]] = visible
        assert legacy_rle(MaskRuns.from_patch(y0, x0, patch, (height, width))) == seed_binary_mask_to_rle(full)
