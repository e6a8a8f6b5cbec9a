"""Hostile files, built from scratch: the kinds of input the adversarial passes against the server used (issue 16),
with parameters, so that tests, the hostile-input catalogue and ``benchmarks/hostile_memory.py`` can make several
cases of each kind. Every builder returns bytes; none needs more than a few MB of memory to build its file.
"""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from PIL import Image

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
