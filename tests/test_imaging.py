"""The decoding gate: formats, EXIF orientation, colour conversions, the pixel limit, refusals."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from maskrcnn_serving import deadline as deadline_module
from maskrcnn_serving import imaging
from maskrcnn_serving.errors import DeadlineExceeded, ImageTooComplex, NotAnImage, TooManyPixels, UnsupportedImageFormat
from maskrcnn_serving.settings import Limits
from testsupport import hostile

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


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp"])
def test_decode_formats(bgr, ext):
    image = imaging.decode_image(encode_image(bgr, ext), LIMITS.max_image_pixels)
    assert image.shape == bgr.shape and image.dtype == np.uint8
    if ext != ".jpg" and ext != ".webp":
        assert np.array_equal(image, bgr)


def test_tiff_is_refused_from_clients_and_decoded_for_local_files(bgr):
    data = encode_image(bgr, ".tiff")
    with pytest.raises(UnsupportedImageFormat) as info:
        imaging.decode_image(data, LIMITS.max_image_pixels)
    assert info.value.status == 415 and info.value.code == "unsupported_image_format"
    assert np.array_equal(imaging.decode_image(data, LIMITS.max_image_pixels, tiff=True), bgr)


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


# ------------------------------------------------------------------------------------ hostile files (issue 16)



@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return cv2.imread(str(Path(__file__).parent.parent / "examples" / "images" / "1001_00000.jpg"))


def _refused(data: bytes, error: type, max_pixels: int = LIMITS.max_image_pixels) -> str:
    with pytest.raises(error) as info:
        imaging.decode_image(data, max_pixels)
    assert 400 <= info.value.status < 500
    return info.value.message


def test_tiff_bombs_never_reach_a_parser(monkeypatch):
    """Defects 1 and 2: a TIFF listing its size twice (decoded at 12000 x 12000 although a header reader saw 10 x 10)
    and a TIFF whose 1,500 tags point at one 1 MB block (1.5 GB allocated before any check): refused by their magic
    bytes, before any parser."""
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda *a: pytest.fail("must not decode"))
    for data in (hostile.tiff_duplicate_dimensions(), hostile.tiff_tag_amplifier(tags=300),
                 hostile.tiff_declaring(1, 1_100_000), hostile.tiff_declaring(10, 10)):
        _refused(data, UnsupportedImageFormat)


@pytest.mark.parametrize("data", [hostile.dds_without_pixel_format(), hostile.ftex_zeros(), hostile.spider_header(),
                                  b"GIF89a" + bytes(100), b"\x00\x00\x01\x00" + bytes(40), b"RIFF\x00\x00\x00\x00WAVE",
                                  b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"BM"],
                         ids=["dds", "ftex", "spider", "gif", "ico", "riff-wave", "soi-only", "png-signature", "bm"])
def test_formats_outside_the_allow_list_are_400(data):
    """Defect 4: Pillow's DDS, FTEX and SPIDER plugins raised unexpected errors on these (500s). The gate reads magic
    bytes: anything that is not JPEG, PNG, WebP or BMP is 400 not_an_image."""
    _refused(data, NotAnImage)


def test_the_allow_list_is_the_table_the_gate_reads(bgr, monkeypatch):
    """``SERVED_FORMATS`` is what the gate consults: a format taken out of it is no longer an image."""
    bmp = encode_image(bgr, ".bmp")
    assert imaging.read_header(bmp).format == "BMP"
    monkeypatch.delitem(imaging.SERVED_FORMATS, "BMP")
    _refused(bmp, NotAnImage)


@pytest.mark.parametrize(("marker", "kind"), [(0xC1, None), (0xC2, None), (0xC3, "Lossless"), (0xC7, "Hierarchical"),
                                              (0xC9, "Arithmetic-coded"), (0xCF, "Arithmetic-coded")])
def test_jpeg_frame_kinds_outside_the_served_ones_are_415(bgr, marker, kind):
    """The frame header's marker names the JPEG's kind: baseline, extended and progressive Huffman JPEGs are read,
    the others are refused by name before anything is decoded."""
    jpeg = encode_image(bgr, ".jpg")
    start = jpeg.index(b"\xff\xc0")
    patched = jpeg[: start + 1] + bytes([marker]) + jpeg[start + 2 :]
    if kind is None:
        assert (imaging.read_header(patched).width, imaging.read_header(patched).height) == (40, 24)
    else:
        assert _refused(patched, UnsupportedImageFormat).startswith(f"{kind} JPEGs are not accepted")


@pytest.mark.parametrize("size", [(1, 1_100_000), (1_100_000, 1), (2, 1 << 20 | 1)])
def test_a_side_over_the_decoders_limit_is_422(size):
    """Defect 4: a 70-byte BMP declaring 1 x 1,100,000 made OpenCV's CV_IO_MAX_IMAGE_HEIGHT assertion a 500."""
    assert "side" in _refused(hostile.bmp_declaring(*size), TooManyPixels)


@pytest.mark.parametrize("make", [
    lambda: hostile.bmp_declaring(5000, 5000), lambda: hostile.bmp_declaring(-5, 5),
    lambda: hostile.bmp_declaring(5, 0),
    lambda: hostile.bmp_declaring(5, -(1 << 31)), lambda: hostile.bmp_declaring(5, 5, bits=7),
    lambda: b"BM" + bytes(12) + (2**31 + 5).to_bytes(4, "little") + bytes(60),
], ids=["no-data", "negative-width", "zero-height", "int-min-height", "bad-depth", "huge-info-size"])
def test_malformed_bmp_headers_are_400(make):
    _refused(make(), NotAnImage)


def test_the_pixel_limit_uses_the_size_the_decoder_decodes(photo):
    """Defect 1's kind for accepted formats: a second frame header (JPEG), a second IHDR (PNG), a canvas unlike
    its bitstream (WebP). The gate reads what the decoder reads; files whose headers disagree are refused, and an
    image that decodes to another size than its header is refused too."""
    jpeg = cv2.imencode(".jpg", photo)[1].tobytes()
    assert "two frame headers" in _refused(hostile.jpeg_with_sof(jpeg, 10, 10, duplicate=True), NotAnImage)
    assert "65500x65500" in _refused(hostile.jpeg_with_sof(jpeg, 65500, 65500), TooManyPixels)
    png = cv2.imencode(".png", photo)[1].tobytes()
    ihdr = png[8:33]
    assert "two header chunks" in _refused(png[:33] + ihdr + png[33:], NotAnImage)
    webp = cv2.imencode(".webp", photo)[1].tobytes()
    _refused(hostile.webp_vp8x(12000, 12000, image=webp), TooManyPixels)
    _refused(hostile.webp_vp8x(10, 10, image=webp), NotAnImage)  # libwebp: canvas != bitstream
    assert "ANIM" not in _refused(hostile.webp_vp8x(10, 10, flags=0x02, image=webp), UnsupportedImageFormat)


def test_png_chunks_that_cost_memory_before_the_size_check_are_removed(photo, monkeypatch):
    """Defect 2's kind for PNG: 600 zTXt chunks of 8 MB each (4.8 GB of inflating for libpng, 8 s of CPU in one
    test) are dropped before the decoder sees the file; the pixels are those of the plain PNG."""
    png = cv2.imencode(".png", photo)[1].tobytes()
    seen = []
    real = imaging.cv2.imdecode
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda data, flags: seen.append(len(data)) or real(data, flags))
    bombed = hostile.png_text_bomb(png, chunks=200)
    assert np.array_equal(imaging.decode_image(bombed, LIMITS.max_image_pixels), photo)
    assert seen == [len(png)]
    animated = hostile.png_with_chunks(png, [(b"acTL", b"\x00\x00\x00\x02\x00\x00\x00\x00"), (b"iCCP", b"x\x00\x00")])
    assert np.array_equal(imaging.decode_image(animated, LIMITS.max_image_pixels), photo)


def test_exif_orientation_survives_the_png_chunk_filter(bgr):
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(bgr[..., ::-1]).save(buffer, "PNG", exif=exif.tobytes())
    assert imaging.decode_image(buffer.getvalue(), LIMITS.max_image_pixels).shape == (40, 24, 3)


def test_absurd_jpeg_scan_counts_are_refused_before_decoding(photo, monkeypatch):
    """Defect 3: a progressive JPEG whose last scan is repeated hundreds of times cost 74 s of CPU. More than 64
    scans is refused outright; below that the decoding work (scans x pixels) of a request is bounded."""
    big = cv2.resize(photo, (3232, 3713))
    progressive = hostile.progressive_jpeg(big)
    assert imaging.read_header(progressive).passes == 10
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda *a: pytest.fail("must not decode"))
    for repeats, which in ((300, hostile.smallest_scan(progressive)), (60, -1)):
        assert "scans" in _refused(hostile.jpeg_repeated_scan(progressive, repeats, which), ImageTooComplex)
    work = hostile.jpeg_repeated_scan(progressive, 40, hostile.smallest_scan(progressive))  # 50 scans of 12 MP
    assert imaging.read_header(work).passes == 50
    assert "passes" in _refused(work, ImageTooComplex, max_pixels=30_000_000)


def test_decoding_waits_at_most_until_the_deadline(photo, monkeypatch):
    """Defect 3: decoding is inside the request's deadline. A decode that overruns is abandoned at the deadline
    (504); it finishes on its decoder thread, bounded by the checks above."""
    real = imaging._decode

    def slow(header):
        time.sleep(1.0)
        return real(header)

    monkeypatch.setattr(imaging, "_decode", slow)
    data = cv2.imencode(".png", photo)[1].tobytes()
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="decoding"):
        imaging.decode_image(data, LIMITS.max_image_pixels, deadline_module.Deadline.after(0.3))
    assert time.monotonic() - start < 0.8
    assert imaging.decode_image(data, LIMITS.max_image_pixels, deadline_module.Deadline.after(5.0)).shape == photo.shape


def test_the_request_total_is_checked_before_any_image_is_decoded(monkeypatch):
    files = [hostile.png_declaring(7000, 5000)] * 3
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda *a: pytest.fail("must not decode"))
    with pytest.raises(TooManyPixels, match="Image 1 would bring the request over"):
        imaging.decode_images(files, LIMITS.max_image_pixels)


def test_the_decoders_own_pixel_limit_is_a_422(tmp_path):
    """Under serve, OpenCV enforces the pixel limit itself (OPENCV_IO_MAX_IMAGE_PIXELS, read when cv2 loads): its
    refusal is a 422 too_many_pixels, not a 500. Run in a fresh interpreter with a limit below the gate's."""
    script = (
        "import numpy as np, cv2\n"
        "from maskrcnn_serving import imaging\n"
        "from maskrcnn_serving.errors import TooManyPixels\n"
        "data = cv2.imencode('.png', np.zeros((100, 100, 3), np.uint8))[1].tobytes()\n"
        "try:\n"
        "    imaging.decode_image(data, 10**6)\n"
        "except TooManyPixels as exc:\n"
        "    print('refused', exc.status, exc.code)\n"
    )
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "1000"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "refused 422 too_many_pixels", result.stderr[-2000:]
