"""Property-based fuzzing (hypothesis) of the pieces that touch client bytes or produce the masks clients decode:

* both RLE codecs: the legacy row-major encoder (``encoding.legacy_rle``) against the seed's own algorithm
  (spec-facts A.7) and the decoder clients use (``visualize.decode_legacy_rle``); the COCO encoder
  (``encoding.coco_rle_of_patch``, ``encoding.coco_rle``) against pycocotools and ``visualize.decode_coco_rle`` --
  random masks including empty, full, single-pixel, odd sizes and patches that run off the image;
* the image decoder (``imaging.decode_image``) on random bytes and on mutated valid images, and the request parser
  (``wire.parse_request``) on random JSON documents: every input is either accepted or refused with a
  :class:`ServingError` (a 4xx), never any other exception (a 500).

The CI run is bounded (``max_examples`` below, a few seconds). The long run is the same tests with more examples:
``MASKRCNN_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/reliability/test_fuzz_codecs.py``.
"""

from __future__ import annotations

import io
import json
import os

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_serving import imaging, wire
from maskrcnn_serving.bench.seed_rle import seed_binary_mask_to_rle
from maskrcnn_serving.encoding import coco_rle, coco_rle_of_patch, legacy_rle
from maskrcnn_serving.errors import ServingError
from maskrcnn_serving.settings import Limits
from maskrcnn_serving.visualize import decode_coco_rle, decode_legacy_rle

# pycocotools 2.0.11 calls np.array(..., copy=False) on its RLE objects under numpy 2 (harmless, once per decode).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

LONG_RUN_EXAMPLES = int(os.environ.get("MASKRCNN_FUZZ_EXAMPLES", "0"))


def fuzz(ci_examples: int):
    """Hypothesis settings: ``ci_examples`` in CI, ``$MASKRCNN_FUZZ_EXAMPLES`` for a long run; no database files."""
    return settings(
        max_examples=LONG_RUN_EXAMPLES or ci_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------------------------- masks


@st.composite
def placed_patches(draw) -> tuple[int, int, np.ndarray, tuple[int, int]]:
    """(y0, x0, patch, (H, W)): a patch placed in an image, possibly running off its bottom/right edge."""
    height = draw(st.integers(1, 37))
    width = draw(st.integers(1, 37))
    y0 = draw(st.integers(0, height - 1))
    x0 = draw(st.integers(0, width - 1))
    ph = draw(st.integers(0, height - y0 + 3))
    pw = draw(st.integers(0, width - x0 + 3))
    kind = draw(st.sampled_from(["random", "empty", "full", "single", "sparse"]))
    if kind == "random":
        patch = draw(hnp.arrays(np.uint8, (ph, pw), elements=st.integers(0, 1)))
    else:
        patch = np.zeros((ph, pw), np.uint8)
        if kind == "full":
            patch[:] = 1
        elif kind == "single" and patch.size:
            patch[draw(st.integers(0, ph - 1)), draw(st.integers(0, pw - 1))] = 1
        elif kind == "sparse" and patch.size:
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            patch = (rng.random((ph, pw)) < 0.05).astype(np.uint8)
    return y0, x0, patch, (height, width)


def full_mask(y0: int, x0: int, patch: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(image_hw, np.uint8)
    visible = patch[: image_hw[0] - y0, : image_hw[1] - x0]
    mask[y0 : y0 + visible.shape[0], x0 : x0 + visible.shape[1]] = visible
    return mask


@fuzz(400)
@given(placed_patches())
def test_legacy_rle_is_the_seed_encoding_and_round_trips(placed):
    y0, x0, patch, image_hw = placed
    mask = full_mask(y0, x0, patch, image_hw)
    encoded = legacy_rle(y0, x0, patch, image_hw)
    assert encoded["size"] == list(image_hw)
    assert encoded["counts"] == seed_binary_mask_to_rle(mask)["counts"]
    assert all(isinstance(c, int) and c >= 0 for c in encoded["counts"])
    assert np.array_equal(decode_legacy_rle(encoded["counts"], encoded["size"]), mask)


@fuzz(400)
@given(placed_patches())
def test_coco_rle_is_pycocotools_and_round_trips(placed):
    y0, x0, patch, image_hw = placed
    mask = full_mask(y0, x0, patch, image_hw)
    encoded = coco_rle_of_patch(y0, x0, patch, image_hw)
    reference = mask_utils.encode(np.asfortranarray(mask))
    assert encoded == {"size": list(image_hw), "counts": reference["counts"].decode("ascii")}
    assert coco_rle(mask[None]) == [encoded]
    assert np.array_equal(decode_coco_rle(encoded), mask)
    assert np.array_equal(mask_utils.decode({"size": encoded["size"], "counts": encoded["counts"]}), mask)


@fuzz(300)
@given(st.lists(st.integers(-3, 50), max_size=12), st.integers(0, 9), st.integers(0, 9))
def test_legacy_decoder_refuses_inconsistent_counts(counts, height, width):
    """Decoding arbitrary counts either gives the mask they describe or raises ValueError (bad sum or sign)."""
    try:
        mask = decode_legacy_rle(counts, [height, width])
    except ValueError:
        assert sum(counts) != height * width or min(counts, default=0) < 0
        return
    assert mask.shape == (height, width) and int(mask.sum()) == sum(counts[1::2])


# ------------------------------------------------------------------------------------------ image decoding


def _valid_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    outputs = [cv2.imencode(ext, pixels)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp")]
    for mode in ("L", "RGBA", "CMYK", "P", "I;16"):
        buffer = io.BytesIO()
        rgb.convert(mode).save(buffer, "PNG" if mode not in ("CMYK",) else "JPEG")
        outputs.append(buffer.getvalue())
    return outputs


VALID_IMAGES = _valid_images()
MAX_PIXELS = 50_000_000


def _check_decode(data: bytes) -> None:
    try:
        image = imaging.decode_image(data, MAX_PIXELS)
    except ServingError as exc:
        assert exc.status in (400, 422)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 1


@fuzz(300)
@given(st.binary(max_size=4096))
def test_decoder_on_random_bytes_refuses_cleanly(data):
    _check_decode(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF blocks we make
@fuzz(600)
@given(st.sampled_from(VALID_IMAGES), st.data())
def test_decoder_on_mutated_images_refuses_cleanly(original, data):
    """Valid files with random byte flips, truncations and insertions: decoded to 8-bit BGR or refused with a 4xx."""
    corrupted = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        operation = data.draw(st.sampled_from(["flip", "truncate", "insert", "overwrite_header"]))
        position = data.draw(st.integers(0, max(0, len(corrupted) - 1)))
        if operation == "flip" and corrupted:
            corrupted[position] ^= 1 << data.draw(st.integers(0, 7))
        elif operation == "truncate":
            del corrupted[position:]
        elif operation == "insert":
            corrupted[position:position] = data.draw(st.binary(min_size=1, max_size=16))
        elif corrupted:
            start = data.draw(st.integers(0, min(64, len(corrupted) - 1)))
            corrupted[start : start + 4] = data.draw(st.binary(min_size=4, max_size=4))
    _check_decode(bytes(corrupted))


# ------------------------------------------------------------------------------------------- request parsing

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
OPTION_VALUES = JSON_VALUES | st.sampled_from(["legacy", "coco", "boxes", "polygon", "circle", "1,2", "0.5", "nan"])
REQUEST_ITEMS = st.fixed_dictionaries(
    {},
    optional={
        "img_id": JSON_VALUES,
        "img_data": st.text(max_size=40) | JSON_VALUES,
        **{name: OPTION_VALUES for name in wire.OPTION_NAMES},
    },
)
CLASS_NAMES = ("BG", "circle", "rectangle", "triangle", "ring")
DEFAULTS = wire.RequestOptions(score_threshold=0.5)


def _check_parse(body: bytes, content_type: str, query: dict, attributes: str | None = None) -> None:
    try:
        parsed = wire.parse_request(body, content_type, query, DEFAULTS, CLASS_NAMES, Limits(), attributes)
    except ServingError as exc:
        assert 400 <= exc.status < 500
        return
    for item in parsed.images:
        options = item.options
        assert 0 <= options.score_threshold <= 1 and 0 < options.mask_threshold <= 1
        assert options.format in wire.FORMATS
        assert options.max_detections is None or 1 <= options.max_detections <= wire.MAX_DETECTIONS_LIMIT
        try:  # base64 errors are 4xx too
            wire.image_bytes(item)
        except ServingError as exc:
            assert exc.status == 400


@fuzz(200)
@given(REQUEST_ITEMS | st.lists(REQUEST_ITEMS, max_size=3) | JSON_VALUES)
def test_parser_on_random_json_documents(document):
    _check_parse(json.dumps(document).encode(), "application/json", {})


@fuzz(200)
@given(st.binary(max_size=256), st.sampled_from(["application/json", "application/x-image", "image/png", "text/plain",
                                                 "", "application/vnd.api+json; charset=utf-8"]),
       st.dictionaries(st.sampled_from(wire.OPTION_NAMES), st.text(max_size=12), max_size=3),
       st.none() | st.text(max_size=40))
def test_parser_on_random_bodies_queries_and_attributes(body, content_type, query, attributes):
    _check_parse(body, content_type, query, attributes)
