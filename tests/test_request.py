"""The pipeline's request and result types: options' defaults, the formats, an image's file from bytes, a path or
a deferred source (no model)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from assertions import shape_detections

from maskrcnn_serving.request import FORMATS, MASK_FORMATS, ImageRequest, ImageResult, RequestOptions


def test_options_default_to_the_seed_containers_answer():
    options = RequestOptions(score_threshold=0.3)
    assert (options.mask_threshold, options.max_detections, options.classes, options.format) == (0.5, None, None,
                                                                                                  "legacy")
    assert (options.embeddings, options.neighbours, options.same_class) == (False, None, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.format = "coco"
    assert set(MASK_FORMATS) < set(FORMATS) and set(FORMATS) - set(MASK_FORMATS) == {"boxes"}


def test_an_image_file_is_bytes_a_path_or_any_source_read_on_demand(tmp_path):
    options = RequestOptions(score_threshold=0.5)
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG first")
    from_path = ImageRequest("p", path, options)
    path.write_bytes(b"\x89PNG second")  # read when the pipeline asks, not when the request is made
    assert from_path.file_bytes() == b"\x89PNG second"
    assert ImageRequest(None, b"raw", options).file_bytes() == b"raw"

    class Reversed:
        def __init__(self, data: bytes) -> None:
            self.reads = 0
            self.data = data

        def read_bytes(self) -> bytes:
            self.reads += 1
            return self.data[::-1]

    source = Reversed(b"cba")
    item = ImageRequest("s", source, options)
    assert source.reads == 0 and item.file_bytes() == b"abc" and source.reads == 1
    missing = ImageRequest("m", tmp_path / "missing.png", options)
    with pytest.raises(FileNotFoundError):
        missing.file_bytes()


def test_a_result_holds_the_image_its_detections_and_records():
    dets = shape_detections()
    result = ImageResult("7", np.zeros((48, 64, 3), np.uint8), dets, [{"bbox": [0, 0, 1, 1]}])
    assert result.image.shape[:2] == dets.image_hw and len(result.detections) == 3
