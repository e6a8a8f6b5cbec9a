"""Hostile files, built from scratch: the kinds of input the adversarial passes against the server used (issue 16),
with parameters, so that tests, the hostile-input catalogue and ``benchmarks/hostile_memory.py`` can make several
cases of each kind. Every builder returns bytes; none needs more than a few MB of memory to build its file.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from maskrcnn_serving.settings import Limits, MiB, Settings

# ---------------------------------------------------------------------------------------------------------- TIFF


def _tiff(entries: list[tuple[int, int, int, int | bytes]], data: bytes = b"") -> bytes:
    """A little-endian TIFF with one IFD of ``entries`` (tag, type, count, value or absolute offset) in the given
    order (duplicates allowed), followed by ``data``."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        if isinstance(value, bytes):
            out += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")[:4]
        elif kind == 3 and count == 1:
            out += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, kind, count, value)
    out += struct.pack("<I", 0)
    return bytes(out) + data


@functools.lru_cache(maxsize=8)
def _deflate_zeros(count: int) -> bytes:
    compressor = zlib.compressobj(9)
    block = bytes(1 << 20)
    out = []
    while count > 0:
        out.append(compressor.compress(block[: min(count, len(block))]))
        count -= len(block)
    out.append(compressor.flush())
    return b"".join(out)


def tiff_duplicate_dimensions(real: tuple[int, int] = (12000, 12000), listed: tuple[int, int] = (10, 10)) -> bytes:
    """A grayscale deflate TIFF whose IFD lists ImageWidth / ImageLength twice: ``real`` first, ``listed`` second.
    A header parser that keeps the last value sees ``listed``; libtiff decodes ``real`` (144 M pixels by default)."""
    width, height = real
    strip = _deflate_zeros(width * height)
    return _tiff([(256, 4, 1, width), (257, 4, 1, height), (256, 4, 1, listed[0]), (257, 4, 1, listed[1]),
                  (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1), (273, 4, 1, 8 + 2 + 12 * 12 + 4),
                  (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, len(strip)), (284, 3, 1, 1)], strip)


def tiff_tag_amplifier(tags: int = 1500, block_bytes: int = 1 << 20) -> bytes:
    """A 1x1 TIFF with ``tags`` private tags that all point at the same ``block_bytes`` block: the file is about
    ``block_bytes`` long, a decoder that loads every tag's data allocates ``tags`` x ``block_bytes``."""
    entries = [(256, 4, 1, 1), (257, 4, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 0), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, 1, 1)]
    offset = 8 + 2 + 12 * (len(entries) + tags) + 4
    entries[5] = (273, 4, 1, offset)
    entries += [(40000 + i, 7, block_bytes, offset) for i in range(tags)]
    return _tiff(entries, bytes(block_bytes))


def tiff_declaring(width: int, height: int) -> bytes:
    """A tiny uncompressed grayscale TIFF header declaring ``width`` x ``height`` with one byte of data."""
    return _tiff([(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                  (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 1)], b"\x00")


# ---------------------------------------------------------------------------------------------------------- JPEG


def progressive_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """A progressive JPEG of a BGR image (libjpeg's default progression: 10 scans for colour)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[:, :, ::-1])).save(buffer, "JPEG", quality=quality, progressive=True)
    return buffer.getvalue()


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of every marker segment of a well-formed JPEG, each scan's entropy data included in its
    SOS segment; start is the position of the 0xFF."""
    out, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((marker, pos, pos + 2))
            break
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append((marker, pos, end))
        pos = end
    return out


def jpeg_repeated_scan(jpeg: bytes, repeats: int, which: int = -1) -> bytes:
    """The JPEG with scan ``which`` (default the last; with the table segments right before it) repeated ``repeats``
    more times before EOI: libjpeg decodes every copy (a pass over the whole image each), warning only. The
    smallest scan of a progressive file is tens of bytes: hundreds of passes for a few kB."""
    segments = _segments(jpeg)
    scans = [i for i, (marker, _, _) in enumerate(segments) if marker == 0xDA]
    first = last = scans[which]
    while first > 0 and segments[first - 1][0] in (0xC4, 0xDB, 0xDD):  # DHT, DQT, DRI before the scan
        first -= 1
    start, end = segments[first][1], segments[last][2]
    eoi = jpeg.rindex(b"\xff\xd9")
    return jpeg[:eoi] + jpeg[start:end] * repeats + jpeg[eoi:]


def smallest_scan(jpeg: bytes) -> int:
    """The index of the scan with the fewest bytes."""
    sizes = [end - start for marker, start, end in _segments(jpeg) if marker == 0xDA]
    return sizes.index(min(sizes))


def jpeg_with_sof(jpeg: bytes, width: int, height: int, duplicate: bool = False) -> bytes:
    """The JPEG with its frame header patched to ``width`` x ``height`` (``duplicate``: a second, patched frame
    header inserted after the first instead)."""
    marker, start, end = next(s for s in _segments(jpeg) if 0xC0 <= s[0] <= 0xC2)
    frame = bytearray(jpeg[start:end])
    frame[5:9] = struct.pack(">HH", height, width)
    if duplicate:
        return jpeg[:end] + bytes(frame) + jpeg[end:]
    return jpeg[:start] + bytes(frame) + jpeg[end:]


def jpeg_with_marker(jpeg: bytes, marker: int, payload: bytes = b"\x00\x00") -> bytes:
    """The JPEG with a segment of ``marker`` inserted right after SOI."""
    return jpeg[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


# ----------------------------------------------------------------------------------------------------------- PNG


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_chunks(png: bytes, chunks: list[tuple[bytes, bytes]]) -> bytes:
    """The PNG with ``chunks`` (type, payload) inserted after IHDR."""
    return png[:33] + b"".join(_png_chunk(kind, payload) for kind, payload in chunks) + png[33:]


def png_text_bomb(png: bytes, chunks: int = 600, inflated_bytes: int = 8_000_000) -> bytes:
    """The PNG with ``chunks`` zTXt chunks, each inflating to ``inflated_bytes`` (libpng's per-chunk limit is
    8,000,000): a few kB each in the file, ``chunks`` x ``inflated_bytes`` for a decoder that inflates them all."""
    payload = b"Comment\x00\x00" + _deflate_zeros(inflated_bytes)
    return png_with_chunks(png, [(b"zTXt", payload)] * chunks)


def png_declaring(width: int, height: int) -> bytes:
    """A valid small PNG (1-bit, all black) of ``width`` x ``height``: a few kB for tens of megapixels."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------- WebP


def webp_vp8x(width: int, height: int, flags: int = 0, image: bytes | None = None) -> bytes:
    """An extended WebP (VP8X) declaring a ``width`` x ``height`` canvas with ``flags`` (0x02: animated), followed by
    the image chunk of ``image`` (a simple WebP) if given."""
    payload = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(payload)) + payload + (image[12:] if image else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ----------------------------------------------------------------------------------------------------------- BMP


def bmp_declaring(width: int, height: int, size: int = 70, bits: int = 24) -> bytes:
    """A ``size``-byte BMP (BITMAPINFOHEADER) declaring ``width`` x ``height`` with no pixel data to speak of."""
    header = b"BM" + struct.pack("<IHHI", size, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 2835, 2835, 0, 0)
    return (header + info).ljust(size, b"\x00")


# ------------------------------------------------------------------------------- formats outside the allow-list


def dds_without_pixel_format() -> bytes:
    """A DDS header whose pixel-format flags are 0 (Pillow's DDS plugin raised an unexpected error on it)."""
    header = struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + bytes(44)
    pixel_format = struct.pack("<2I4s5I", 32, 0, b"\x00" * 4, 0, 0, 0, 0, 0)
    return b"DDS " + header + pixel_format + bytes(20) + bytes(64 * 64 * 4)


def ftex_zeros() -> bytes:
    return b"FTEX" + bytes(200)


def spider_header(size: int = 64) -> bytes:
    """A SPIDER header (23 big-endian floats, a plausible geometry) with no image after it."""
    floats = [1.0, float(size), 1.0, float(size), 1.0, 1.0] + [0.0] * 6 + [float(size), 1.0] + [0.0] * 9
    floats[12] = float(size)  # labrec / labbyt as Pillow's reader expects them to be consistent
    floats[21] = float(size * 4)
    floats[22] = float(size * 4)
    return struct.pack(">23f", *floats) + bytes(1024 - 92)


def gif(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[:, :, ::-1])).save(buffer, "GIF")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------- large photos


def large_photo(image: np.ndarray, width: int = 8100, height: int = 6075, quality: int = 85) -> bytes:
    """``image`` enlarged to ``width`` x ``height`` as a baseline JPEG (a few MB): a real photo's size, which the
    model shrinks but the masks are pasted at."""
    big = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


# ===================================================================================================== catalogue
# The hostile-input catalogue (docs/reliability.md): every case with the answer it must get. The tests
# (tests/reliability/test_hostile_inputs.py) send it to the session's servers, behind nginx and gunicorn alone;
# benchmarks/hostile_memory.py sends it to a 1-worker server and measures its memory and the longest request.

JSON_HEADERS = {"Content-Type": "application/json"}


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def pil_bytes(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


class Chunks:
    """A body that ``requests`` sends chunked (it is iterable, not bytes), and that can be sent more than once."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def __iter__(self):
        return iter(self.pieces)


@dataclass
class Case:
    """One hostile input: ``request`` is the keyword arguments of ``requests.post`` to /invocations. The answer is
    ``status`` with error ``code`` (a ``code`` of None: any), or 200 with the annotations of ``same_as`` (a PNG of
    the pixels the server must decode). ``statuses``: other acceptable statuses (answers that depend on the server's
    response limit). ``kind``: the defect kind it belongs to (issues 16 and 23), for the reports."""

    name: str
    request: dict
    status: int = 200
    code: str | None = None
    same_as: bytes | None = None
    options: dict = field(default_factory=dict)
    statuses: tuple[int, ...] = ()
    kind: str = "input"
    message: str | None = None  # a regular expression the error message must match (when the status is ``status``)


def catalogue(
    scene: np.ndarray, photo: np.ndarray | None = None, large_images: bool = True, limits: Limits | None = None
) -> list[Case]:
    """The request-level catalogue for a small BGR crop ``scene`` (every model call on it is cheap) and a larger
    ``photo`` (default ``scene``) for the cases that need a real photo's size (``large_images=False``: empty
    stand-ins for those, which take seconds to encode; enough for the cases' names). ``limits``: those of the server
    the cases go to (default: the server's defaults); the cases about a limit are sized from them."""
    import base64
    import re

    photo = scene if photo is None else photo
    limits = Settings().limits if limits is None else limits
    max_images, max_pixels = limits.max_images, limits.max_image_pixels
    rgb = Image.fromarray(scene[:, :, ::-1])
    gray = cv2.cvtColor(scene, cv2.COLOR_BGR2GRAY)
    gray_as_bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    scene_png = png(scene)
    scene_jpeg = pil_bytes(rgb, "JPEG", quality=95)
    encoded = b64(scene_png)
    small = {"max_detections": 5}

    def raw(data: bytes, content_type: str = "image/png", **extra) -> dict:
        return {"data": data, "headers": {"Content-Type": content_type}, **extra}

    def doc(**fields) -> dict:
        return {"json": {"img_id": "x", "img_data": encoded, **fields}}

    def text(body: str | bytes) -> dict:
        return {"data": body, "headers": JSON_HEADERS}

    def literal(extra: str) -> dict:  # JSON that json.dumps would not write (NaN, huge integers)
        return text('{"img_id": 1, "img_data": "' + encoded + '", ' + extra + "}")

    def attributes(value: str) -> dict:
        return {"data": scene_png, "headers": {"Content-Type": "image/png",
                                               "X-Amzn-SageMaker-Custom-Attributes": value}}

    alpha = np.dstack([scene, np.random.default_rng(0).integers(0, 256, scene.shape[:2], dtype=np.uint8)])
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette_bgr = np.asarray(palette.convert("RGB"))[:, :, ::-1]
    cmyk_jpeg = pil_bytes(rgb.convert("CMYK"), "JPEG", quality=95)
    deep = "[" * 100_000 + "]" * 100_000

    def costly(build, *args) -> bytes:  # files that take a while to build: stand-ins when only names are wanted
        return build(*args) if large_images else b"II*\x00"

    # 70 % of the pixel limit each (7000x5000 at the default 50 M): one is served, all of them are over the total.
    blank_hw = (7000, max_pixels * 7 // 10 // 7000)
    big_blank = b64(costly(png_declaring, *blank_hw))
    bomb_hw = (10000, max_pixels * 6 // 5 // 10000)  # 20 % over the pixel limit (10000x6000 at the default)
    scene_webp = cv2.imencode(".webp", scene)[1].tobytes()

    def enlarged(width: int, height: int, quality: int = 90) -> bytes:
        if not large_images:
            return progressive_jpeg(np.zeros((8, 8, 3), np.uint8))
        return progressive_jpeg(cv2.resize(photo, (width, height), interpolation=cv2.INTER_LINEAR), quality)

    mid_progressive = enlarged(1600, 1200)
    p12 = enlarged(3232, 3713)
    p48 = enlarged(6465, 7425, quality=80)
    large = large_photo(photo) if large_images else b""
    heavy = {"score_threshold": 0, "max_detections": 1000}
    boxes = {**small, "format": "boxes"}  # big images whose masks would not fit a small response limit
    cases = [
        # -------------------------------------------------------------------------------- bodies that are not images
        Case("empty raw body", raw(b"", "image/jpeg"), 400, "not_an_image"),
        Case("empty JSON body", text(b""), 400, "invalid_json"),
        Case("zero-byte image in JSON", doc(img_data=""), 400, "not_an_image"),
        Case("JPEG truncated in its header", raw(scene_jpeg[:300], "image/jpeg"), 400, "not_an_image"),
        Case("JPEG truncated in its data", raw(scene_jpeg[: len(scene_jpeg) // 2], "image/jpeg"), 400,
             "not_an_image"),
        Case("PNG truncated", raw(scene_png[: len(scene_png) // 2]), 400, "not_an_image"),
        Case("text as image/jpeg", raw(b"definitely not a JPEG file", "image/jpeg"), 400, "not_an_image"),
        Case("zeros as image/png", raw(bytes(4096)), 400, "not_an_image"),
        Case("GIF (unsupported format)", raw(gif(scene), "image/gif"), 400, "not_an_image"),
        Case("base64 of text", doc(img_data=b64(b"hello world")), 400, "not_an_image"),
        # -------------------------------------------------------------- formats outside the allow-list (defect 4)
        Case("DDS header with pixel-format flags 0", raw(dds_without_pixel_format(), "image/x-dds"), 400,
             "not_an_image", kind="decoder"),
        Case("FTEX + 200 zeros", raw(ftex_zeros(), "application/octet-stream"), 400, "not_an_image", kind="decoder"),
        Case("SPIDER header", raw(spider_header(), "application/octet-stream"), 400, "not_an_image", kind="decoder"),
        Case("ICO header", raw(b"\x00\x00\x01\x00\x01\x00" + bytes(64), "image/x-icon"), 400, "not_an_image",
             kind="decoder"),
        Case("70-byte BMP declaring 1 x 1,100,000", raw(bmp_declaring(1, 1_100_000), "image/bmp"), 422,
             "too_many_pixels", kind="decoder"),
        Case("70-byte BMP declaring 1,100,000 x 1", raw(bmp_declaring(1_100_000, 1), "image/bmp"), 422,
             "too_many_pixels", kind="decoder"),
        Case("BMP with height -2^31", raw(bmp_declaring(5, -(1 << 31)), "image/bmp"), 400, "not_an_image",
             kind="decoder"),
        Case("BMP with a 2 GB info header", raw(b"BM" + bytes(12) + (2**31 + 5).to_bytes(4, "little") + bytes(60),
                                                "image/bmp"), 400, "not_an_image", kind="decoder"),
        Case("tiny TIFF declaring 1 x 1,100,000", raw(tiff_declaring(1, 1_100_000), "image/tiff"), 415,
             "unsupported_image_format", kind="decoder"),
        # ------------------------------------------------------------------ TIFF: refused on purpose (defects 1, 2)
        Case("TIFF", raw(pil_bytes(rgb, "TIFF"), "image/tiff"), 415, "unsupported_image_format", kind="pixels"),
        Case("float TIFF", raw(cv2.imencode(".tiff", scene.astype(np.float32) / 255)[1].tobytes(), "image/tiff"),
             415, "unsupported_image_format", kind="pixels"),
        Case("TIFF listing 12000x12000 then 10x10", raw(costly(tiff_duplicate_dimensions), "image/tiff"), 415,
             "unsupported_image_format", kind="pixels"),
        Case("TIFF listing 9000x9000 then 100x100, labelled PNG",
             raw(costly(tiff_duplicate_dimensions, (9000, 9000), (100, 100))), 415, "unsupported_image_format",
             kind="pixels"),
        Case("1 MB TIFF with 1,500 tags on one 1 MB block", raw(tiff_tag_amplifier(), "image/tiff"), 415,
             "unsupported_image_format", kind="amplification"),
        Case("TIFF with 600 tags on one 1 MB block, base64", doc(img_data=b64(tiff_tag_amplifier(600))), 415,
             "unsupported_image_format", kind="amplification"),
        # ------------------------------------------------ accepted formats whose headers disagree (defect 1 kind)
        Case("JPEG with a second frame header (10x10)", raw(jpeg_with_sof(scene_jpeg, 10, 10, duplicate=True),
                                                            "image/jpeg"), 400, "not_an_image", kind="pixels"),
        Case("JPEG with a second frame header (60000x60000)",
             raw(jpeg_with_sof(scene_jpeg, 60000, 60000, duplicate=True), "image/jpeg"), 400, "not_an_image",
             kind="pixels"),
        Case("PNG with a second IHDR", raw(scene_png[:33] + costly(png_declaring, 12000, 12000)[8:33]
                                           + scene_png[33:]), 400, "not_an_image", kind="pixels"),
        Case("WebP canvas 10x10 around a larger image", raw(webp_vp8x(10, 10, image=scene_webp), "image/webp"), 400,
             "not_an_image", kind="pixels"),
        Case("WebP canvas 12000x12000", raw(webp_vp8x(12000, 12000, image=scene_webp), "image/webp"), 422,
             "too_many_pixels", kind="pixels"),
        Case("animated WebP", raw(webp_vp8x(scene.shape[1], scene.shape[0], 0x02, image=scene_webp), "image/webp"),
             415, "unsupported_image_format", kind="pixels"),
        # ------------------------------------------------------ memory before the size check (defect 2 kind), PNG
        Case("PNG with 600 zTXt chunks of 8 MB each", raw(png_text_bomb(scene_png)), same_as=scene_png,
             kind="amplification"),
        Case("PNG with 40 iCCP and 40 iTXt chunks", raw(png_with_chunks(scene_png, [
            (b"iCCP", b"icc\x00\x00" + _deflate_zeros(8_000_000))] * 40 + [
            (b"iTXt", b"k\x00\x01\x00\x00\x00" + _deflate_zeros(8_000_000))] * 40)), same_as=scene_png,
             kind="amplification"),
        Case("APNG with 300 frame chunks", raw(png_with_chunks(scene_png, [
            (b"acTL", struct.pack(">II", 300, 0))] + [(b"fdAT", bytes(4096))] * 300)), same_as=scene_png,
             kind="amplification"),
        Case("JPEG with 90 APP1 segments of 64 kB", raw(b"".join([scene_jpeg[:2]] + [
            b"\xff\xe1\xff\xff" + bytes(65533)] * 90 + [scene_jpeg[2:]]), "image/jpeg"),
             same_as=png(cv2.imdecode(np.frombuffer(scene_jpeg, np.uint8), cv2.IMREAD_COLOR)), kind="amplification"),
        # -------------------------------------------------------------- decoding work (defect 3 kind), JPEG scans
        Case("progressive JPEG, smallest scan repeated 300 times (12 MP)",
             raw(jpeg_repeated_scan(p12, 300, smallest_scan(p12)), "image/jpeg"), 422, "image_too_complex",
             kind="decode-time"),
        Case("progressive JPEG, last scan repeated 60 times (2 MP)", raw(jpeg_repeated_scan(mid_progressive, 60),
                                                                         "image/jpeg"), 422, "image_too_complex",
             kind="decode-time"),
        Case("progressive JPEG, 20 scans of 48 MP", raw(jpeg_repeated_scan(p48, 10, smallest_scan(p48)),
                                                        "image/jpeg"), 422, "image_too_complex", kind="decode-time"),
        Case("progressive JPEG, 50 scans of 12 MP (within the budget)",
             raw(jpeg_repeated_scan(p12, 40, smallest_scan(p12)), "image/jpeg", params=boxes), 200,
             kind="decode-time"),
        Case("progressive JPEG of 48 MP (10 scans)", raw(p48, "image/jpeg", params=boxes), 200, kind="decode-time"),
        Case(f"{max_images} progressive JPEGs of 2 MP, 60 scans each (within the count, over the request's work)",
             {"json": [{"img_id": i, "img_data": b64(jpeg_repeated_scan(mid_progressive, 50,
                                                                        smallest_scan(mid_progressive)))}
                       for i in range(max_images)]}, 422, "image_too_complex", kind="decode-time"),
        # -------------------------------------------------------------------------------------- sizes and shapes
        Case("1x1 image", raw(png(scene[:1, :1])), same_as=png(scene[:1, :1])),
        Case("1x3000 image", raw(png(np.tile(scene[:1, :200], (1, 15, 1))))),
        Case("3000x1 image", raw(png(np.tile(scene[:200, :1], (15, 1, 1))))),
        Case("2x5000 image", raw(png(np.zeros((2, 5000, 3), np.uint8)))),
        Case("decompression bomb: PNG declaring {}x{}".format(*bomb_hw), raw(costly(png_declaring, *bomb_hw)), 422,
             "too_many_pixels", kind="pixels"),
        Case("decompression bomb: JPEG declaring 65500x65500", raw(jpeg_with_sof(scene_jpeg, 65500, 65500),
                                                                   "image/jpeg"), 422, "too_many_pixels",
             kind="pixels"),
        Case("decompression bomb: BMP declaring 30000x30000", raw(bmp_declaring(30000, 30000), "image/bmp"), 422,
             "too_many_pixels", kind="pixels"),
        Case(f"{max_images} images of {blank_hw[0] * blank_hw[1] // 10**6} M pixels each in one list (over the total)",
             {"json": [{"img_id": i, "img_data": big_blank} for i in range(max_images)]}, 422, "too_many_pixels",
             kind="pixels"),
        Case("BMP declaring 5000x5000 with no pixel data", raw(bmp_declaring(5000, 5000), "image/bmp"), 400,
             "not_an_image"),
        # ------------------------------------------------------------------------- post-processing (defect 8 kind)
        Case("8100x6075 photo, score 0, 1000 detections, legacy", raw(large, "image/jpeg", params=heavy), 413,
             "response_too_large", statuses=(200,), kind="post-processing"),
        Case("8100x6075 photo, score 0, 1000 detections, polygons", raw(large, "image/jpeg",
                                                                       params={**heavy, "format": "polygon"}), 413,
             "response_too_large", statuses=(200,), kind="post-processing"),
        Case("8100x6075 photo, score 0, 1000 detections, coco", raw(large, "image/jpeg",
                                                                   params={**heavy, "format": "coco"}), 413,
             "response_too_large", statuses=(200,), kind="post-processing"),
        Case("8100x6075 photo, score 0, 1000 detections, boxes", raw(large, "image/jpeg",
                                                                    params={**heavy, "format": "boxes"}), 413,
             "response_too_large", statuses=(200,), kind="post-processing"),
        # ---------------------------------------------------------------------------------- pixel formats, EXIF
        Case("16-bit RGB PNG", raw(png(scene.astype(np.uint16) * 257)), same_as=scene_png),
        Case("16-bit grayscale PNG", raw(png(gray.astype(np.uint16) * 257)), same_as=png(gray_as_bgr)),
        Case("grayscale PNG", raw(png(gray)), same_as=png(gray_as_bgr)),
        Case("RGBA PNG (alpha dropped)", raw(png(alpha)), same_as=scene_png),
        Case("palette PNG", raw(pil_bytes(palette, "PNG")), same_as=png(palette_bgr)),
        Case("CMYK JPEG", raw(cmyk_jpeg, "image/jpeg"), same_as=png(cv2.imdecode(np.frombuffer(cmyk_jpeg, np.uint8),
                                                                                   cv2.IMREAD_COLOR))),
        Case("BMP", raw(pil_bytes(rgb, "BMP"), "image/bmp"), same_as=scene_png),
        Case("lossless WebP", raw(pil_bytes(rgb, "WEBP", lossless=True), "image/webp"), same_as=scene_png),
        Case("image/gif label on a PNG (the bytes decide)", raw(scene_png, "image/gif"), same_as=scene_png),
    ]
    for orientation, transpose in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
                                   (3, Image.Transpose.ROTATE_180)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = pil_bytes(rgb.transpose(transpose), "JPEG", quality=95, exif=exif.tobytes())
        upright = cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_COLOR)
        # The decoder must have applied the orientation: upright shape, pixels close to the scene (JPEG loss only).
        assert upright.shape == scene.shape and np.abs(upright.astype(int) - scene).mean() < 4
        cases.append(Case(f"EXIF orientation {orientation}", raw(stored, "image/jpeg"), same_as=png(upright)))
    cases += [
        # ----------------------------------------------------------------------------------------------- base64
        Case("base64 with bad padding", doc(img_data=encoded[:-2].rstrip("=") + "A"), 400, "invalid_base64"),
        Case("base64, URL-safe alphabet", doc(img_data=base64.urlsafe_b64encode(scene_png).decode()),
             same_as=scene_png),
        Case("base64 with newlines (MIME)", doc(img_data=base64.encodebytes(scene_png).decode()), same_as=scene_png),
        Case("base64 with spaces and tabs", doc(img_data=" \t".join(re.findall(".{1,60}", encoded))),
             same_as=scene_png),
        Case("base64 with non-ASCII characters", doc(img_data="\u00e9" + encoded), 400, "invalid_base64"),
        Case("base64 data: URL", doc(img_data="data:image/png;base64," + encoded), same_as=scene_png),
        # -------------------------------------------------------------------------------------------------- JSON
        Case("invalid JSON", text(b'{"img_id": 1, "img_data": '), 400, "invalid_json"),
        Case("invalid UTF-8", text(b'{"img_id": "\xff\xfe", "img_data": "x"}'), 400, "invalid_json"),
        Case("JSON string", text('"just a string"'), 400, "invalid_request"),
        Case("JSON number", text("42"), 400, "invalid_request"),
        Case("JSON null", text("null"), 400, "invalid_request"),
        Case("JSON list of numbers", text("[1, 2]"), 400, "invalid_request"),
        Case("empty JSON list", text("[]"), 400, "invalid_request"),
        Case("JSON nested 100000 deep", text(deep), 400, "invalid_json"),
        Case("img_id nested 100000 deep", text('{"img_data": "x", "img_id": ' + deep + "}"), 400, "invalid_json"),
        Case("img_id nested 980 deep", text('{"img_id": ' + "[" * 980 + "]" * 980 + ', "img_data": "' + encoded
                                            + '"}'), 400, None, statuses=(200,), kind="options"),
        Case("missing img_data", {"json": {"img_id": 1}}, 400, "missing_field"),
        Case("missing img_id", {"json": {"img_data": encoded}}, 400, "missing_field"),
        Case("img_data a number", doc(img_data=12), 400, "invalid_field"),
        Case("img_data a list", doc(img_data=[encoded]), 400, "invalid_field"),
        Case("img_data null", doc(img_data=None), 400, "invalid_field"),
        Case("extra fields are ignored", doc(extra={"a": [1, 2]}, rpn=True), same_as=scene_png),
        Case("img_id an object (echoed as str)", doc(img_id={"a": [1, 2]}), same_as=scene_png),
        Case("img_id a 40 kB string", doc(img_id="i" * 40_000, max_detections=1), same_as=scene_png,
             options={"max_detections": 1}),
        Case("img_id a lone surrogate (JSON escape)", text('{"img_id": "\\ud800", "img_data": "' + encoded + '"}'),
             400, "invalid_field", kind="options"),
        Case("img_id with a lone low surrogate, in a list",
             text('[{"img_id": "a\\udfffb", "img_data": "' + encoded + '"}]'), 400, "invalid_field", kind="options"),
        Case("img_id an object holding a lone surrogate (echoed escaped)",
             text('{"img_id": {"k": "\\ud800"}, "img_data": "' + encoded + '"}'), same_as=scene_png, kind="options"),
        Case("option a 1 MB string", doc(format="x" * 1_000_000), 400, "invalid_request"),
        Case("NaN threshold", literal('"score_threshold": NaN'), 400, "invalid_request"),
        Case("Infinity max_detections", literal('"max_detections": Infinity'), 400, "invalid_request"),
        Case("400-digit integer option", literal('"score_threshold": ' + "9" * 400), 400, "invalid_request"),
        Case("5000-digit integer", literal('"max_detections": ' + "9" * 5000), 400, "invalid_json"),
        Case("boolean threshold", doc(score_threshold=True), 400, "invalid_request"),
        Case("string threshold", doc(score_threshold="0.5"), 400, "invalid_request"),
        Case("fractional max_detections", doc(max_detections=2.5), 400, "invalid_request"),
        Case("classes an object", doc(classes={"a": 1}), 400, "invalid_request"),
        Case("classes nested list", doc(classes=[[1]]), 400, "invalid_request"),
        Case("format a number", doc(format=3), 400, "invalid_request"),
        Case("too many images in a list", {"json": [{"img_id": i, "img_data": "x"} for i in range(max_images + 1)]},
             413, "too_many_images"),
        # ------------------------------------------------------------------------------- option values in range
        Case("score_threshold -0.1", doc(score_threshold=-0.1), 400, "invalid_request"),
        Case("score_threshold 1.5", doc(score_threshold=1.5), 400, "invalid_request"),
        Case("mask_threshold 0", doc(mask_threshold=0), 400, "invalid_request"),
        Case("mask_threshold 1.1", doc(mask_threshold=1.1), 400, "invalid_request"),
        Case("max_detections 0", doc(max_detections=0), 400, "invalid_request"),
        Case("max_detections 1001", doc(max_detections=1001), 400, "invalid_request"),
        Case("max_detections 10**30", doc(max_detections=10**30), 400, "invalid_request"),
        Case("unknown class name", doc(classes=["unicorn"]), 400, "invalid_request"),
        Case("class id 0 (background)", doc(classes=[0]), 400, "invalid_request"),
        Case("empty classes", doc(classes=[]), 400, "invalid_request"),
        Case("unknown format", doc(format="xml"), 400, "invalid_request"),
        Case("query option NaN", raw(scene_png, params={"score_threshold": "nan"}), 400, "invalid_request"),
        Case("query option 1e400", raw(scene_png, params={"max_detections": "1e400"}), 400, "invalid_request"),
        Case("bad option in custom attributes", attributes("max_detections=abc"), 400, "invalid_request"),
        Case("junk custom attributes are ignored", attributes("%%%;;==&&"), same_as=scene_png),
        # ------------------------------------------------------------ class ids that isdigit() liked (defect 5)
        Case("query classes=\u00b2", raw(scene_png, params={"classes": "\u00b2"}), 400, "invalid_request",
             kind="options"),
        Case("query classes=--1", raw(scene_png, params={"classes": "--1"}), 400, "invalid_request", kind="options"),
        Case("JSON classes \"\u00b2\"", doc(classes="\u00b2"), 400, "invalid_request", kind="options"),
        Case("JSON classes \"--1\"", doc(classes="--1,1"), 400, "invalid_request", kind="options"),
        Case("JSON classes [\"\u0663\"] (Arabic-Indic three)", doc(classes=["\u0663"]), 400, "invalid_request",
             kind="options"),
        Case("custom attributes classes=%C2%B2", attributes("classes=%C2%B2"), 400, "invalid_request",
             kind="options"),
        Case("custom attributes classes=--1", attributes("classes=--1"), 400, "invalid_request", kind="options"),
        Case("query classes of 30 digits", raw(scene_png, params={"classes": "9" * 30}), 400, "invalid_request",
             kind="options"),
        # ------------------------------------------------------------------------------------------ content types
        Case("text/plain", raw(scene_png, "text/plain"), 415, "unsupported_media_type"),
        Case("no content type", {"data": scene_png}, 415, "unsupported_media_type"),
        Case("multipart/form-data", raw(b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x"), 415,
             "unsupported_media_type"),
        Case("form-urlencoded", {"data": {"img_data": encoded}}, 415, "unsupported_media_type"),
        Case("content type of control characters", raw(scene_png, ";;;\x01"), 415, "unsupported_media_type"),
        Case("UTF-16 JSON with a charset", {"data": json.dumps({"img_id": 1, "img_data": encoded}).encode("utf-16"),
                                            "headers": {"Content-Type": "application/json; charset=utf-16"}},
             same_as=scene_png),
        # ------------------------------------------------------------------------------------------- body limits
        Case("declared body over the limit", raw(b"\xff" * (limits.max_request_bytes + 1), "image/jpeg"), 413,
             "request_too_large"),
        Case("chunked body over the limit", raw(Chunks([b"\xff" * MiB] * (limits.max_request_bytes // MiB + 1)),
                                                "image/jpeg"), 413, "request_too_large"),
        Case("chunked body within the limit", raw(Chunks([scene_png[:1000], scene_png[1000:]])), same_as=scene_png),
    ]
    for case in cases:
        case.options = {**small, **case.options}
    return cases


SEARCH_LIMITS = (200_000, 600_000)  # the response limits the search cases are sized for (bytes)
SEARCH_SERVER_MAX_RESPONSE_BYTES = 512 * 1024  # the test servers' with an index (tests/server/conftest.py)


def search_size_cases(photo: np.ndarray, limits: Limits, large_images: bool = True) -> list[Case]:
    """Answers that only the search fields make too large (issue 23, defect 7: such a 413 came after the model,
    every mask and the search), for a server with an instance index of 4 or more instances, the demo model (69 values
    per embedding) and a response limit in :data:`SEARCH_LIMITS`: ``photo`` as an 8100 x 6075 JPEG, every detection
    (score 0: 1000 of them). Without search fields its boxes fit (200); with embeddings it is refused from the
    answer's floor before the search ("at least"), with neighbours once they are found, before any mask is pasted."""
    if not SEARCH_LIMITS[0] <= limits.max_response_bytes <= SEARCH_LIMITS[1]:
        raise ValueError(f"the search cases are sized for a response limit in {SEARCH_LIMITS}")
    large = large_photo(photo) if large_images else b""
    every = {"score_threshold": 0, "max_detections": 1000}

    def photo_with(**options) -> dict:
        return {"data": large, "headers": {"Content-Type": "image/jpeg"}, "params": {**every, **options}}

    floor = "at least"  # the message of a 413 from the floor: nothing was pasted
    return [
        Case("photo, every detection, boxes (no search fields)", photo_with(format="boxes"), 200, kind="search-size"),
        Case("photo, every detection, boxes with embeddings", photo_with(format="boxes", embeddings="true"), 413,
             "response_too_large", kind="search-size", message=floor),
        Case("photo, every detection, COCO RLE with 100 neighbours", photo_with(format="coco", neighbours=100), 413,
             "response_too_large", kind="search-size", message=floor),
        Case("photo, every detection, COCO RLE with 100 neighbours and embeddings (the issue's)",
             photo_with(format="coco", neighbours=100, embeddings="true"), 413, "response_too_large",
             kind="search-size", message=floor),
        Case("photo, every detection, legacy with 100 neighbours", photo_with(format="legacy", neighbours=100), 413,
             "response_too_large", kind="search-size", message=floor),
        Case("photo, 50 detections, boxes with 3 neighbours and embeddings",
             photo_with(format="boxes", max_detections=50, neighbours=3, embeddings="true"), 200, kind="search-size"),
    ]


@dataclass
class RawCase:
    """Raw bytes on a fresh connection (the client half-closes after sending) and the answer: ``status`` with error
    ``code`` from gunicorn alone, ``nginx`` = (status, code) behind nginx when it differs (status None: the
    connection is closed without an answer)."""

    name: str
    payload: bytes
    status: int
    code: str
    nginx: tuple[int | None, str | None] | None = None
    kind: str = "http"

    def expected(self, front: str) -> tuple[int | None, str | None]:
        return self.nginx if front == "nginx" and self.nginx is not None else (self.status, self.code)


_POST = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
_GET = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
_CHUNKED = _POST + b"Transfer-Encoding: chunked\r\n\r\n"


def raw_http_cases() -> list[RawCase]:
    """HTTP-level hostile requests. Behind nginx, malformed trailers and chunk extensions are nginx's to parse: it
    ignores trailers and extensions and passes the one-byte body on (400 not_an_image from the app)."""
    return [
        # (a route nginx passes on: nginx answers /ping itself, and its own line limit is 8 kB)
        RawCase("request line over gunicorn's limit", b"GET /model?" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                400, "bad_http_request"),
        RawCase("request line over nginx's limit", b"GET /ping?" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                400, "bad_http_request"),
        RawCase("header over the limit", b"GET /ping HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 10000 + b"\r\n\r\n", 431,
                "headers_too_large"),
        RawCase("binary garbage", b"\x00\x01\x02 hello\r\n\r\n", 400, "bad_http_request"),
        RawCase("negative Content-Length", b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                400, "bad_http_request"),
        RawCase("Content-Length and chunked", _POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\n\r\n", 400, "bad_http_request"),
        RawCase("Transfer-Encoding gzip, chunked", _POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400,
                "not_an_image", (400, "bad_http_request")),  # gunicorn passes the (empty, compressed) body on
        RawCase("unknown Transfer-Encoding", _POST + b"Transfer-Encoding: bogus\r\n\r\n0\r\n\r\n", 400,
                "bad_http_request"),
        RawCase("malformed chunk size", _CHUNKED + b"zz\r\nabc\r\n0\r\n\r\n", 400, "malformed_body",
                (400, "bad_http_request"), kind="chunked"),
        RawCase("body shorter than its Content-Length", _POST + b"Content-Length: 100000\r\n\r\nabc", 400,
                "not_an_image", (None, None)),  # gunicorn: the body is what arrived; nginx: closed, incomplete
        RawCase("body declared over the limit, not sent", _POST + b"Content-Length: 99999999999\r\n\r\n", 413,
                "request_too_large"),
        RawCase("unknown route", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404,
                "not_found", (400, "bad_http_request")),
        RawCase("HTTP/2.0 request line", b"GET /ping HTTP/2.0\r\nHost: x\r\n\r\n", 400, "bad_http_request"),
        # The web page's routes serve fixed names only; no part of a path reaches the file system.
        RawCase("page file path traversal", _GET % b"/static/../../etc/passwd", 404, "not_found",
                (400, "bad_http_request")),
        RawCase("page file encoded traversal", _GET % b"/static/..%2f..%2fserver%2fapp.py", 404, "not_found",
                (400, "bad_http_request")),  # nginx decodes the path and refuses to leave the root
        RawCase("page file not in the page", _GET % b"/static/web.py", 404, "not_found"),
        RawCase("page file NUL byte", _GET % b"/static/app.js%00.png", 404, "not_found", (400, "bad_http_request")),
        RawCase("thumbnail id not a number", _GET % b"/index/thumbnail/notanumber", 404, "not_found"),
        RawCase("thumbnail by path", _GET % b"/index/thumbnail/..%2f..%2fetc%2fpasswd", 404, "not_found"),
        RawCase("thumbnail id over int64", _GET % b"/index/thumbnail/99999999999999999999999", 404, "not_found"),
        RawCase("POST to the model metadata", b"POST /model HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n", 405, "method_not_allowed"),
        # nginx's internal locations (its error pages, /ping's 503) are not routes (issue 23: every answer with the
        # security headers; the tests check them on every answer)
        RawCase("nginx's error page requested", _GET % b"/__maskrcnn_errors/413", 404, "not_found", kind="headers"),
        RawCase("the not-ready page requested", _GET % b"/__maskrcnn_ping/not_ready", 404, "not_found",
                kind="headers"),
        RawCase("POST to /ping", b"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                405, "method_not_allowed", kind="headers"),
        # ---------------------------------------------------------------- trailers (defect 6) and chunk lines (7)
        RawCase("trailer with an invalid name", _CHUNKED + b"1\r\nX\r\n0\r\nX T: a\r\n\r\n", 400, "malformed_body",
                (400, "not_an_image"), kind="chunked"),
        RawCase("9,000-byte trailer", _CHUNKED + b"1\r\nX\r\n0\r\nX-T: " + b"a" * 9000 + b"\r\n\r\n", 400,
                "malformed_body", (400, "not_an_image"), kind="chunked"),
        RawCase("200 trailer fields", _CHUNKED + b"1\r\nX\r\n0\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200))
                + b"\r\n", 400, "malformed_body", (400, "not_an_image"), kind="chunked"),
        RawCase("trailer with a NUL", _CHUNKED + b"1\r\nX\r\n0\r\nX-T: a\x00b\r\n\r\n", 400, "malformed_body",
                (400, "not_an_image"), kind="chunked"),
        RawCase("trailer with obs-fold", _CHUNKED + b"1\r\nX\r\n0\r\nX-T: a\r\n  b\r\n\r\n", 400, "malformed_body",
                (400, "not_an_image"), kind="chunked"),
        RawCase("chunk size with a 24 MB extension", _CHUNKED + b"1;" + b"e" * 24_000_000 + b"\r\nX\r\n0\r\n\r\n", 400,
                "malformed_body", (400, "not_an_image"), kind="chunked"),
        RawCase("chunk size with a 5 kB extension", _CHUNKED + b"1;" + b"e" * 5000 + b"\r\nX\r\n0\r\n\r\n", 400,
                "malformed_body", (400, "not_an_image"), kind="chunked"),
        RawCase("1.5 MB of chunk framing for 300 kB of data", _CHUNKED + b"1;e\r\nX\r\n" * 300_000 + b"0\r\n\r\n",
                400, "malformed_body", (400, "not_an_image"), kind="chunked"),
    ]


# ============================================================================================ load against /ping
# Issue 23, defect 3: /ping waited in the request threads' queue (p50 2.65 s, max 16.7 s with 16 clients sending
# 7000 x 7000 photos; SageMaker counts a /ping over 2 s as a failure). testsupport/load.py runs each load while it
# times /ping; tests/reliability/test_ping_load.py (a short run) and benchmarks/ping_under_load.py (the measurement
# of docs/reliability.md) use it.

PING_P99_SECONDS = 0.1  # what /ping may take at the 99th percentile under any of these loads


@dataclass
class PingLoad:
    """``clients`` clients sending ``body`` to ``/invocations?query`` back to back while ``/ping`` is timed."""

    name: str
    clients: int
    body: bytes
    content_type: str
    query: str = ""
    kind: str = "ping"


def ping_loads(photo: np.ndarray, scene: np.ndarray, side: int = 7000, limits: Limits | None = None,
               clients: int = 16) -> list[PingLoad]:
    """The loads /ping must be immune to: ``clients`` clients sending ``photo`` enlarged to ``side`` x ``side``
    (seed-schema JSON, as COCO RLE; and every detection the model finds, raw), or lists of as many copies of the
    small ``scene`` as a request may hold (``limits``: the server's; default its defaults)."""
    limits = Settings().limits if limits is None else limits
    huge = large_photo(photo, side, side)
    huge_json = json.dumps({"img_id": "huge", "img_data": b64(huge)}).encode()
    many = json.dumps([{"img_id": i, "img_data": b64(png(scene))} for i in range(limits.max_images)]).encode()
    return [
        PingLoad(f"{clients} clients, {side} x {side} photos as JSON, COCO RLE", clients, huge_json,
                 "application/json", "format=coco"),
        PingLoad(f"{clients} clients, {side} x {side} photos raw, every detection (score 0, up to 1000), boxes",
                 clients, huge, "image/jpeg", "format=boxes&score_threshold=0&max_detections=1000"),
        PingLoad(f"{clients} clients, lists of {limits.max_images} small images", clients, many, "application/json",
                 "format=coco"),
    ]


def raw_exchange(host: str, port: int, payload: bytes, timeout: float = 60.0) -> bytes:
    """Send ``payload`` on a fresh connection, half-close, and read the answer until the server closes."""
    import socket

    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed before reading everything
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


# ====================================================================================== the index's database (23)
# The search path's dependency fails (issue 23, defects 1, 2, 4, 5): its database process killed, stalled, slow or
# restarted, and bytes planted in its thumbnails. tests/search/test_service.py provokes each fault under a
# SearchService, tests/server/test_search_server.py under a real server.


@dataclass(frozen=True)
class DatabaseFault:
    """A fault of the database process: ``signals`` sent to it in order; with ``resume_after`` (a fraction of the
    call timeout) a SIGCONT follows that much later (a slow answer); ``restart``: the process is gone and a new one
    takes its place (its owner starts it: ``serve``, or the test). ``answered``: whether a call made during the fault
    still gets its answer within the call timeout. ``kind``: killed, stalled, slow or restarted."""

    name: str
    kind: str
    signals: tuple[int, ...]
    resume_after: float | None = None
    restart: bool = False
    answered: bool = False


    def begin(self, pid: int, call_timeout: float) -> None:
        """Provoke the fault on the process ``pid`` (a SIGCONT follows on a timer thread when it resumes)."""
        import signal
        import threading

        send_signals(pid, self.signals)
        if self.resume_after is not None:
            threading.Timer(self.resume_after * call_timeout, os.kill, (pid, signal.SIGCONT)).start()


def send_signals(pid: int, signals: Sequence[int]) -> None:
    """Send ``signals`` to ``pid`` in order. A SIGSTOP returns once every thread of the process has stopped: a
    signal takes effect when the kernel next schedules the thread, on a loaded machine a moment later, and a call
    answered meanwhile would not be a call to a stalled database."""
    import signal
    import time
    from pathlib import Path

    def states() -> set[str]:
        found = set()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                found.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                continue
        return found

    for signum in signals:
        os.kill(pid, signum)
        stop_at = time.monotonic() + 10
        while signum == signal.SIGSTOP and not states() <= {"T", "t"}:
            if time.monotonic() > stop_at:
                raise TimeoutError(f"process {pid} did not stop: {states()}")
            time.sleep(0.01)


def database_faults() -> list[DatabaseFault]:
    import signal

    return [
        DatabaseFault("SIGKILL", "killed", (signal.SIGKILL,)),
        DatabaseFault("SIGKILL while stalled", "killed", (signal.SIGSTOP, signal.SIGKILL)),
        DatabaseFault("SIGSTOP (stalled until SIGCONT)", "stalled", (signal.SIGSTOP,)),
        DatabaseFault("SIGSTOP for 30 % of the call timeout", "slow", (signal.SIGSTOP,), resume_after=0.3,
                      answered=True),
        DatabaseFault("SIGSTOP for 3 call timeouts", "slow", (signal.SIGSTOP,), resume_after=3.0),
        DatabaseFault("SIGTERM, then a new process (collections released)", "restarted", (signal.SIGTERM,),
                      restart=True),
        DatabaseFault("SIGKILL, then a new process (collections released)", "restarted", (signal.SIGKILL,),
                      restart=True),
    ]


@dataclass(frozen=True)
class PlantedThumbnail:
    """Bytes written into an instance's ``thumbnail`` field (base64, as the index stores it) by someone with access
    to the database. ``served``: whether the server may serve it -- and then only as pixels it decoded and encoded
    again (a JPEG of at most 96 pixels a side), never the planted bytes; else 404."""

    name: str
    stored: str
    served: bool
    payload: bytes = b""  # bytes that must never reach a client


def planted_thumbnails() -> list[PlantedThumbnail]:
    import base64

    rng = np.random.default_rng(23)
    pixels = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    html = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    progressive = progressive_jpeg(pixels)

    def planted(name: str, data: bytes, served: bool = False, payload: bytes = b"") -> PlantedThumbnail:
        return PlantedThumbnail(name, base64.b64encode(data).decode(), served, payload)

    return [
        planted("a JPEG thumbnail (the control)", jpeg, served=True),
        planted("an HTML page", html, payload=b"<script>"),
        planted("an SVG with a script", svg, payload=b"<script>"),
        planted("HTML after JPEG magic bytes", b"\xff\xd8\xff\xe0" + html, payload=b"<script>"),
        planted("a JPEG with an HTML page after its end", jpeg + html, served=True, payload=b"<script>"),
        planted("a JPEG with an HTML page in a comment segment", jpeg_with_marker(jpeg, 0xFE, html), served=True,
                payload=b"<script>"),
        planted("a PNG", png(pixels)),
        planted("a GIF", gif(pixels)),
        planted("a JPEG cut in its header", jpeg[:120]),
        planted("a 97 x 200 JPEG (over 96 pixels a side)", cv2.imencode(".jpg", np.full((97, 200, 3), 128, np.uint8))[1]
                .tobytes()),
        planted("a JPEG declaring 65500 x 65500", jpeg_with_sof(jpeg, 65500, 65500)),
        planted("a progressive JPEG, smallest scan 300 times", jpeg_repeated_scan(progressive, 300,
                                                                                 smallest_scan(progressive))),
        PlantedThumbnail("not base64", "<script>alert(1)</script>", False, b"<script>"),
        PlantedThumbnail("empty", "", False),
    ]
