"""Property-based fuzzing (hypothesis) of the pieces that touch client bytes or produce the masks clients decode:

* both RLE codecs: the legacy row-major encoder (``encoding.legacy_rle``) against the seed's own algorithm
  (docs/seed-containers.md#legacy-rle) and the decoder clients use (``visualize.decode_legacy_rle``); the COCO encoder
  (``encoding.coco_rle_of_mask``, ``encoding.coco_rle``) against pycocotools and ``visualize.decode_coco_rle`` --
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
import struct

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
from maskrcnn_serving.encoding import coco_rle, coco_rle_of_mask, legacy_rle
from maskrcnn_serving.errors import ServingError
from maskrcnn_serving.request import FORMATS, RequestOptions
from maskrcnn_serving.settings import Limits
from maskrcnn_serving.structures import MaskRuns
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
    encoded = legacy_rle(MaskRuns.from_patch(y0, x0, patch, image_hw))
    assert encoded["size"] == list(image_hw)
    assert encoded["counts"] == seed_binary_mask_to_rle(mask)["counts"]
    assert all(isinstance(c, int) and c >= 0 for c in encoded["counts"])
    assert np.array_equal(decode_legacy_rle(encoded["counts"], encoded["size"]), mask)


@fuzz(400)
@given(placed_patches())
def test_coco_rle_is_pycocotools_and_round_trips(placed):
    y0, x0, patch, image_hw = placed
    mask = full_mask(y0, x0, patch, image_hw)
    encoded = coco_rle_of_mask(MaskRuns.from_patch(y0, x0, patch, image_hw))
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


def _pil(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _valid_images() -> dict[str, bytes]:
    """Real files of every accepted format and the variants the decoders branch on (and TIFF, always refused)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    pixels[5:15, 8:20] = (30, 200, 90)  # a flat block: real runs for the entropy coders
    rgb = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {ext: cv2.imencode(ext, pixels)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp")}
    files.update({
        "progressive JPEG": _pil(rgb, "JPEG", progressive=True, quality=90),
        "gray JPEG": _pil(rgb.convert("L"), "JPEG"),
        "CMYK JPEG": _pil(rgb.convert("CMYK"), "JPEG"),
        "EXIF JPEG": _pil(rgb, "JPEG", exif=exif.tobytes()),
        "4:4:4 JPEG": _pil(rgb, "JPEG", subsampling=0, quality=95),
        "restart-marker JPEG": cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_RST_INTERVAL, 1])[1].tobytes(),
        "gray PNG": _pil(rgb.convert("L"), "PNG"),
        "RGBA PNG": _pil(rgb.convert("RGBA"), "PNG"),
        "palette PNG": _pil(rgb.convert("P"), "PNG"),
        "palette PNG with tRNS": _pil(rgb.convert("P"), "PNG", transparency=3),
        "16-bit gray PNG": _pil(rgb.convert("I;16"), "PNG"),
        "16-bit RGB PNG": cv2.imencode(".png", pixels.astype(np.uint16) * 257)[1].tobytes(),
        "1-bit PNG": _pil(rgb.convert("1"), "PNG"),
        "EXIF PNG": _pil(rgb, "PNG", exif=exif.tobytes()),
        "lossless WebP": _pil(rgb, "WEBP", lossless=True),
        "lossy WebP": _pil(rgb, "WEBP", quality=80),
        "alpha WebP (VP8X)": _pil(rgb.convert("RGBA").transpose(Image.Transpose.FLIP_LEFT_RIGHT), "WEBP",
                                  quality=80, exif=exif.tobytes()),
        "8-bit BMP": _pil(rgb.convert("P"), "BMP"),
        "1-bit BMP": _pil(rgb.convert("1"), "BMP"),
        "32-bit BMP": _pil(rgb.convert("RGBA"), "BMP"),
    })
    return files


VALID_IMAGES = _valid_images()
MAX_PIXELS = 50_000_000
# Values written over a size field by the mutations.
EXTREME_SIZES = [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x10\x00\x01", b"\x7f\xff\x00\x01",
                 b"\x00\x01\x7f\xff"]


def _check_decode(data: bytes, max_pixels: int = MAX_PIXELS) -> None:
    """The gate's contract: an 8-bit BGR image of exactly the pixels its header declares, within the limits, or a
    4xx (400 not an image, 415 refused format, 422 over a limit); nothing else, and never a 500."""
    try:
        image = imaging.decode_image(data, max_pixels)
    except ServingError as exc:
        assert exc.status in (400, 415, 422), exc
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 1
    header = imaging.read_header(data)
    assert image.shape[0] * image.shape[1] == header.pixels <= max_pixels
    assert max(image.shape[:2]) <= imaging.MAX_SIDE
    assert header.passes <= imaging.MAX_JPEG_SCANS and header.work <= imaging.DECODE_PASSES_PER_PIXEL * max_pixels


def test_every_valid_file_decodes_as_opencv_decodes_it():
    """The gate changes nothing for real files: the pixels are cv2.imdecode's (TIFF excepted: refused)."""
    for name, data in VALID_IMAGES.items():
        if name == ".tiff":
            with pytest.raises(ServingError) as info:
                imaging.decode_image(data, MAX_PIXELS)
            assert info.value.status == 415
            continue
        expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(imaging.decode_image(data, MAX_PIXELS), expected), name


@fuzz(300)
@given(st.binary(max_size=4096))
def test_decoder_on_random_bytes_refuses_cleanly(data):
    _check_decode(data)


@fuzz(300)
@given(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8", b"BM",
                        b"II*\x00", b"MM\x00*"]), st.binary(max_size=2048))
def test_decoder_on_random_bytes_after_each_magic_refuses_cleanly(magic, rest):
    """Random bodies behind each format's magic bytes go to that format's header reader."""
    _check_decode(magic + rest)


def _segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the JPEG marker segments / PNG chunks of a well-formed file (best effort)."""
    from testsupport import hostile

    if data[:2] == b"\xff\xd8":
        try:
            return [(start, end) for _, start, end in hostile._segments(data)]
        except (IndexError, struct.error):  # no longer well-formed: one segment
            return [(0, len(data))]
    if data[:4] == b"\x89PNG":
        out, pos = [], 8
        while pos + 12 <= len(data):
            end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
            out.append((pos, end))
            pos = end
        return out
    return [(0, len(data))]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF blocks we make
@fuzz(800)
@given(st.sampled_from(sorted(VALID_IMAGES)), st.data())
def test_decoder_on_mutated_images_refuses_cleanly(name, data):
    """Real files of every accepted format with random byte flips, truncations, insertions, header overwrites, and
    structural mutations (segments or chunks repeated, moved or dropped; sizes rewritten; a JPEG scan repeated):
    decoded to 8-bit BGR of the declared size within the limits, or refused with a 4xx."""
    corrupted = bytearray(VALID_IMAGES[name])
    for _ in range(data.draw(st.integers(1, 6))):
        operation = data.draw(st.sampled_from(["flip", "truncate", "insert", "overwrite_header", "repeat_segment",
                                               "drop_segment", "swap_segments", "write_size", "repeat_scan"]))
        position = data.draw(st.integers(0, max(0, len(corrupted) - 1)))
        segments = _segments(bytes(corrupted))
        if operation == "flip" and corrupted:
            corrupted[position] ^= 1 << data.draw(st.integers(0, 7))
        elif operation == "truncate":
            del corrupted[position:]
        elif operation == "insert":
            corrupted[position:position] = data.draw(st.binary(min_size=1, max_size=16))
        elif operation == "overwrite_header" and corrupted:
            start = data.draw(st.integers(0, min(64, len(corrupted) - 1)))
            corrupted[start : start + 4] = data.draw(st.binary(min_size=4, max_size=4))
        elif operation in ("repeat_segment", "drop_segment", "swap_segments") and len(segments) > 1:
            i, j = (data.draw(st.integers(0, len(segments) - 1)) for _ in range(2))
            a, b = segments[i], segments[j]
            piece = bytes(corrupted[a[0] : a[1]])
            if operation == "repeat_segment":
                corrupted[b[0] : b[0]] = piece * data.draw(st.integers(1, 3))
            elif operation == "drop_segment":
                del corrupted[a[0] : a[1]]
            elif a[1] <= b[0]:
                other = bytes(corrupted[b[0] : b[1]])
                corrupted[b[0] : b[1]] = piece
                corrupted[a[0] : a[1]] = other
        elif operation == "write_size" and len(corrupted) > 30:  # a plausible size field, set to an extreme
            offset = {b"\xff\xd8": 0, b"\x89P": 16, b"RI": 24, b"BM": 18}.get(bytes(corrupted[:2]), 0)
            if offset == 0 and corrupted[:2] == b"\xff\xd8":
                frames = [i for i in range(len(corrupted) - 9) if corrupted[i] == 0xFF and corrupted[i + 1] in
                          (0xC0, 0xC1, 0xC2)]
                offset = frames[0] + 5 if frames else 2
            corrupted[offset : offset + 4] = data.draw(st.sampled_from(EXTREME_SIZES))
        elif operation == "repeat_scan" and corrupted[:2] == b"\xff\xd8":
            from testsupport import hostile

            try:
                corrupted = bytearray(hostile.jpeg_repeated_scan(bytes(corrupted), data.draw(st.integers(1, 80))))
            except (IndexError, ValueError, struct.error):  # the builder needs a well-formed file
                pass
    _check_decode(bytes(corrupted), data.draw(st.sampled_from([MAX_PIXELS, 2000, 700])))


# ------------------------------------------------------------------------------------------- request parsing

# Text the option parsers meet in the wild and in attacks: digits of other scripts and superscripts (str.isdigit()
# accepts them, int() does not always), signs, separators, and lone surrogates (valid in JSON text as escapes).
NUMERIC_TEXT = st.text(st.sampled_from(list("0123456789-+.,;= eE_xn\u00b2\u00b3\u00b9\u0663\u06f3\u0967\uff11")),
                       max_size=12)
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
# (st.text never yields surrogates, whatever its alphabet: join characters instead)
ANY_TEXT = st.lists(st.characters() | SURROGATES, max_size=20).map("".join) | NUMERIC_TEXT
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | ANY_TEXT,
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
DEFAULTS = RequestOptions(score_threshold=0.5)


def _check_parse(body: bytes, content_type: str, query: dict, attributes: str | None = None) -> None:
    try:
        parsed = wire.parse_request(body, content_type, query, DEFAULTS, CLASS_NAMES, Limits(), attributes)
    except ServingError as exc:
        assert 400 <= exc.status < 500
        return
    for item in parsed.images:
        options = item.options
        assert 0 <= options.score_threshold <= 1 and 0 < options.mask_threshold <= 1
        assert options.format in FORMATS
        assert options.classes is None or options.classes <= set(range(1, len(CLASS_NAMES)))
        # what is echoed must be encodable: a lone surrogate in img_id failed in the response encoder (a 500)
        wire.encode_response([wire.image_response(item.img_id, [])], False, Limits())
        assert options.max_detections is None or 1 <= options.max_detections <= wire.MAX_DETECTIONS_LIMIT
        try:  # base64 errors are 4xx too
            item.file_bytes()
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


@fuzz(300)
@given(st.sampled_from(wire.OPTION_NAMES), NUMERIC_TEXT | ANY_TEXT, st.sampled_from(["query", "attributes", "json"]))
def test_option_text_from_every_source_is_validated_or_refused(name, value, source):
    """Each option as text from the query, the custom attributes (query syntax, percent-encoded) and JSON strings:
    a valid option or a 4xx, never another exception."""
    from urllib.parse import quote

    if source == "query":
        _check_parse(b"\x89PNG", "image/png", {name: value})
    elif source == "attributes":  # a header: Latin-1 text, percent-encoded UTF-8 inside
        _check_parse(b"\x89PNG", "image/png", {}, f"{name}={quote(value, safe='', errors='surrogatepass')}")
    else:
        _check_parse(json.dumps({"img_id": value, "img_data": "", name: value}).encode(), "application/json", {})


@fuzz(200)
@given(ANY_TEXT | JSON_VALUES)
def test_any_img_id_is_echoed_or_refused(img_id):
    """Any JSON value as img_id (lone surrogates included, as JSON escapes): parsed into text the response encoder
    can write, or a 400."""
    _check_parse(json.dumps({"img_id": img_id, "img_data": ""}).encode(), "application/json", {})


@fuzz(300)
@given(st.lists(NUMERIC_TEXT, min_size=1, max_size=3).map(",".join), st.sampled_from(["query", "attributes", "json"]))
def test_class_lists_of_digit_like_text_are_ids_names_or_400(classes, source):
    """classes as text made of digits of every script, signs and separators (isdigit() then int() made 500s of
    "\u00b2" and "--1")."""
    from urllib.parse import quote

    if source == "query":
        _check_parse(b"\x89PNG", "image/png", {"classes": classes})
    elif source == "attributes":
        _check_parse(b"\x89PNG", "image/png", {}, f"classes={quote(classes, safe='')}")
    else:
        _check_parse(json.dumps({"img_id": 1, "img_data": "", "classes": classes}).encode(), "application/json", {})
