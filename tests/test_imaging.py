"""The decoding gate: formats, EXIF orientation, colour conversions, the pixel limit, refusals."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from maskrcnn_serving import imaging
from maskrcnn_serving.errors import NotAnImage, TooManyPixels
from maskrcnn_serving.settings import Limits

LIMITS = Limits()


def encode_image(image: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


@pytest.fixture(scope="module")
def bgr() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.zeros((24, 40, 3), dtype=np.uint8)
    image[:, :20] = (255, 0, 0)
    image[12:, 20:] = rng.integers(0, 255, (12, 20, 3))
    return image


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".tiff", ".webp"])
def test_decode_formats(bgr, ext):
    image = imaging.decode_image(encode_image(bgr, ext), LIMITS.max_image_pixels)
    assert image.shape == bgr.shape and image.dtype == np.uint8
    if ext != ".jpg" and ext != ".webp":
        assert np.array_equal(image, bgr)


def test_exif_orientation_is_applied(bgr):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(bgr[..., ::-1]).save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    image = imaging.decode_image(buffer.getvalue(), LIMITS.max_image_pixels)
    assert image.shape == (40, 24, 3)
    # The blue left half of the stored image is the top half after rotating clockwise.
    assert image[:18, :, 0].mean() > 200 and image[:18, :, 2].mean() < 60


def test_grayscale_alpha_and_16_bit_become_bgr_uint8(bgr):
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    decoded = imaging.decode_image(encode_image(gray, ".png"), LIMITS.max_image_pixels)
    assert decoded.shape == bgr.shape
    assert np.array_equal(decoded[..., 0], gray) and np.array_equal(decoded[..., 2], gray)
    bgra = np.dstack([bgr, np.full(bgr.shape[:2], 7, np.uint8)])
    assert np.array_equal(imaging.decode_image(encode_image(bgra, ".png"), LIMITS.max_image_pixels), bgr)
    deep = bgr.astype(np.uint16) * 257
    decoded = imaging.decode_image(encode_image(deep, ".png"), LIMITS.max_image_pixels)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, bgr)
    buffer = io.BytesIO()
    Image.fromarray(gray).convert("LA").save(buffer, "PNG")
    assert imaging.decode_image(buffer.getvalue(), LIMITS.max_image_pixels).shape == bgr.shape


def test_decompression_bomb_is_refused_from_the_header(monkeypatch):
    buffer = io.BytesIO()
    Image.new("1", (10000, 8000)).save(buffer, "PNG")  # 80 MP declared, ~10 KB of file
    data = buffer.getvalue()
    assert len(data) < 100_000

    def no_full_decode(*args, **kwargs):
        raise AssertionError("the full image must not be decoded")

    monkeypatch.setattr(imaging.cv2, "imdecode", no_full_decode)
    with pytest.raises(TooManyPixels) as info:
        imaging.decode_image(data, 50_000_000)
    assert info.value.status == 422 and "10000x8000" in info.value.message


@pytest.mark.parametrize(
    "data",
    [b"hello", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a" + b"\x00" * 40, b""],
    ids=["text", "bad-png", "gif", "empty"],
)
def test_not_an_image_is_400(data):
    with pytest.raises(NotAnImage) as info:
        imaging.decode_image(data, LIMITS.max_image_pixels)
    assert info.value.code == "not_an_image"


def test_truncated_jpeg_is_400(bgr):
    data = encode_image(bgr, ".jpg")
    with pytest.raises(NotAnImage):
        imaging.decode_image(data[:30], LIMITS.max_image_pixels)
