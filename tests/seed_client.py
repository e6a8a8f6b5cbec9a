"""The seed notebook's client (its request and its decoding of the legacy answer), and the check that its masks
equal pycocotools' decoding of the ``format=coco`` answer: used in-process (tests/server/test_app.py) and against
the built images (tests/images/)."""

from __future__ import annotations

import base64
import json

import numpy as np
from pycocotools import mask as mask_utils


def seed_notebook_request(img_id, file_bytes: bytes) -> str:
    """The request body exactly as the seed notebook builds it (docs/seed-containers.md#request)."""
    return json.dumps({"img_id": img_id, "img_data": base64.b64encode(file_bytes).decode("utf-8")})


def seed_notebook_rle_to_binary_mask(rle: dict) -> np.ndarray:
    """The seed notebook's decoding logic (docs/seed-containers.md#legacy-rle), rewritten from its description:
    alternating runs of zeros and ones, starting with zeros, laid out flat and reshaped in C order to ``size``."""
    height, width = rle["size"]
    flat = np.zeros(height * width, dtype=np.uint8)
    position, value = 0, 0
    for count in rle["counts"]:
        if value:
            flat[position : position + count] = 1
        position += count
        value = 1 - value
    assert position == height * width
    return flat.reshape((height, width))


def assert_legacy_equals_coco(legacy: dict, coco: dict, img_id: str) -> int:
    """Every detection's mask from the seed-format answer equals pycocotools' decoding of the coco answer."""
    assert legacy["img_id"] == coco["img_id"] == img_id
    assert len(legacy["annotations"]) == len(coco["annotations"])
    for old, new in zip(legacy["annotations"], coco["annotations"], strict=True):
        assert (old["category_id"], old["category_name"], old["score"]) == (
            new["category_id"], new["category_name"], new["score"]
        )
        assert isinstance(new["segmentation"]["counts"], str)
        assert old["segmentation"]["size"] == new["segmentation"]["size"]
        seed_mask = seed_notebook_rle_to_binary_mask(old["segmentation"])
        coco_mask = mask_utils.decode({"size": new["segmentation"]["size"], "counts": new["segmentation"]["counts"]})
        assert np.array_equal(seed_mask, coco_mask)
        assert all(isinstance(v, int) for v in old["bbox"])
    return len(legacy["annotations"])
