"""The decoding gate: the one place where client bytes become pixels.

Image file bytes are decoded in memory to (H, W, 3) BGR uint8 by OpenCV, as the seed's ``cv2.imread(IMREAD_COLOR)``
does (EXIF orientation applied, grayscale expanded, alpha dropped, 16-bit scaled to 8 bits). On the way:

1. **Allow-list by magic bytes.** The first bytes name the format: JPEG, PNG, WebP or BMP go on; TIFF is refused
   with 415 ``unsupported_image_format`` (its directory is parsed, and its tag data allocated, before any size
   check, by a decoder whose view of the image can differ from any header reader's: see docs/security.md); anything
   else is 400 ``not_an_image`` and never reaches a parser.
2. **The decoder's own header.** Each accepted format's header is read exactly as its decoder reads it (libjpeg's
   marker walk, libpng's first chunk, libwebp's first chunk, OpenCV's BMP header), to check the request's pixel
   total (``max_pixels``, all images of a request together), a side limit (OpenCV's 2^20), and the decoding work
   (JPEG scans x pixels) BEFORE anything is decoded. What the decoder gets is only what the reader looked at: PNG
   ancillary chunks that cost memory before IHDR is checked (compressed text, ICC profiles, APNG frames) are
   removed; OpenCV decodes the IDAT image as any PNG decoder does. Under ``maskrcnn-serving serve`` the decoder
   also enforces the pixel limit itself (``OPENCV_IO_MAX_IMAGE_PIXELS``, set by ``serve`` for the server's
   processes), and an image that decodes to another size than its header declared is refused.
3. **Refusals are 4xx.** Every decoder failure is 400 ``not_an_image``; too many pixels 422 ``too_many_pixels``;
   too much decoding work 422 ``image_too_complex``; OpenCV's out-of-memory error stays ``cv2.error`` for
   :func:`maskrcnn_serving.errors.to_serving_error` (422 ``insufficient_memory``).
4. **Within the deadline.** With a deadline, each decode runs on a decoder thread and the request waits for it at
   most until its deadline (504); the work of one decode is bounded by 2 and 3, so an abandoned decode ends soon.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import cv2
import numpy as np

from maskrcnn_serving.deadline import NO_DEADLINE, Deadline, exceeded
from maskrcnn_serving.errors import ImageTooComplex, NotAnImage, TooManyPixels, UnsupportedImageFormat

# OpenCV's CV_IO_MAX_IMAGE_WIDTH / _HEIGHT: a longer side is refused by its decoders (with an exception).
MAX_SIDE = 1 << 20
# Progressive JPEGs normally have about 10 scans (libjpeg's default progression: 10 for colour, 6 for gray), and
# every scan passes over the whole image: more than this many is refused before decoding.
MAX_JPEG_SCANS = 64
# Decoding work a request may ask for, as (pixels x passes) per allowed pixel: a JPEG costs one pass per scan, other
# formats one pass. 16 lets an image at the pixel limit have 16 scans, and smaller images proportionally more (up to
# MAX_JPEG_SCANS). On the reference machine a pass costs 2-3 ms per megapixel (docs/reliability.md).
DECODE_PASSES_PER_PIXEL = 16
# Threads that run decodes under a deadline (per process; created on first use).
DECODE_THREADS = 8


@dataclass(frozen=True)
class ImageHeader:
    """What the decoder will see: the format, the size, the passes over the pixels (JPEG scans, else 1), and the
    bytes handed to it (for PNG: the file without the chunks the gate removed)."""

    format: str
    width: int
    height: int
    passes: int
    data: bytes

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def work(self) -> int:
        return self.pixels * self.passes


def identify(data: bytes) -> str | None:
    """The format named by the magic bytes: ``JPEG``, ``PNG``, ``WebP``, ``BMP``, ``TIFF`` or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def read_header(data: bytes, tiff: bool = False) -> ImageHeader:
    """The header of an image file as its decoder reads it; 400 / 415 for anything the gate does not pass."""
    if not data:
        raise NotAnImage("The image is empty.")
    image_format = identify(data)
    if image_format == "TIFF":
        if not tiff:
            raise UnsupportedImageFormat(
                f"TIFF images are not accepted (their decoder allocates before any size check); send {_SERVED_NAMES}."
            )
        return _tiff_header(data)
    if image_format not in SERVED_FORMATS:
        raise NotAnImage(f"The data is not an image in a supported format ({', '.join(SERVED_FORMATS)}).")
    try:
        header = SERVED_FORMATS[image_format](data)
    except (IndexError, struct.error):  # a field beyond the end of the data
        raise NotAnImage(f"The {image_format} image is truncated.") from None
    if header.width <= 0 or header.height <= 0:
        raise NotAnImage(f"The {image_format} image declares no pixels ({header.width}x{header.height}).")
    return header


# ------------------------------------------------------------------------------------------------------- JPEG

# A marker as libjpeg's next_marker() finds it: 0xFF (fill bytes 0xFF are skipped) followed by a byte that is not
# 0x00 (a stuffed 0xFF in entropy-coded data), nor RSTn / TEM (markers without a segment, which libjpeg passes over
# inside and outside scans). One 0xFF then one byte: linear time on any input.
_JPEG_MARKER = re.compile(rb"\xff([\x02-\xcf\xd8-\xfe])")
# The frame headers (SOFn): the kinds served, and the other kinds, refused by name. Every other marker in C0-CF is
# a table segment (C4 DHT, CC DAC) or reserved (C8).
_SOF_SERVED = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive; Huffman-coded
_SOF_REFUSED = {0xC3: "lossless", 0xC5: "hierarchical", 0xC6: "hierarchical", 0xC7: "hierarchical",
                0xC9: "arithmetic-coded", 0xCA: "arithmetic-coded", 0xCB: "arithmetic-coded",
                0xCD: "arithmetic-coded", 0xCE: "arithmetic-coded", 0xCF: "arithmetic-coded"}
# Segments with a length that libjpeg reads or skips: DHT, DAC, DQT, DRI, DNL, APPn, COM.
_JPEG_SEGMENTS = {0xC4, 0xCC, 0xDB, 0xDD, 0xDC, *range(0xE0, 0xF0), 0xFE}


def _jpeg_header(data: bytes) -> ImageHeader:
    """libjpeg's marker walk: one SOF before the first SOS, every SOS counted up to EOI (which must come: OpenCV
    refuses a JPEG that ends early)."""
    size: tuple[int, int] | None = None
    scans = 0
    pos = 2
    while True:
        match = _JPEG_MARKER.search(data, pos)
        if match is None:
            raise NotAnImage("The JPEG image is truncated (no end-of-image marker).")
        marker, pos = match.group(1)[0], match.end()
        if marker == 0xD9:  # EOI
            break
        if marker == 0xD8:
            raise NotAnImage("The JPEG image has a second start-of-image marker.")
        length = struct.unpack_from(">H", data, pos)[0]
        end = pos + length
        if length < 2 or end > len(data):
            raise NotAnImage("The JPEG image is truncated or has a malformed segment.")
        if marker == 0xDA:  # SOS: the scan's entropy-coded data follows the header
            if size is None:
                raise NotAnImage("The JPEG image has a scan before its frame header.")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageTooComplex(
                    f"The JPEG image has more than {MAX_JPEG_SCANS} scans (progressive JPEGs normally have about 10); "
                    "re-encode it."
                )
        elif marker in _SOF_SERVED or marker in _SOF_REFUSED:  # SOFn
            if size is not None:
                raise NotAnImage("The JPEG image has two frame headers.")
            if marker not in _SOF_SERVED:
                raise UnsupportedImageFormat(f"{_SOF_REFUSED[marker].capitalize()} JPEGs are not accepted; send a "
                                             "baseline or progressive JPEG.")
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 2)
            if precision != 8:
                raise UnsupportedImageFormat(f"{precision}-bit JPEGs are not accepted; send an 8-bit JPEG.")
            if components not in (1, 3, 4) or length != 8 + 3 * components:
                raise NotAnImage(f"The JPEG image has an unsupported frame header ({components} components).")
            if height == 0:
                raise NotAnImage("The JPEG image declares its height later (DNL), which is not supported.")
            size = (width, height)
        elif marker not in _JPEG_SEGMENTS:
            raise NotAnImage(f"The JPEG image has an unknown marker 0x{marker:02X}.")
        pos = end
    if size is None or scans == 0:
        raise NotAnImage("The JPEG image has no frame header or no scan.")
    return ImageHeader("JPEG", size[0], size[1], scans, data)


# -------------------------------------------------------------------------------------------------------- PNG

# The chunks the decoder gets: the critical ones, transparency, and eXIf (OpenCV applies its orientation). The rest
# (text, compressed text, ICC profiles, APNG animation, private chunks) does not change the pixels OpenCV returns,
# and some of it is decompressed into memory before any size check (8 MB per zTXt chunk, hundreds of chunks).
_PNG_KEPT = {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"eXIf"}


def _png_header(data: bytes) -> ImageHeader:
    """IHDR, which libpng requires to be the first chunk; the file rebuilt from the kept chunks, up to IEND (which
    must come: OpenCV refuses a PNG that ends early)."""
    kept = [data[:8]]
    pos, width, height, idat = 8, 0, 0, False
    while True:
        if pos + 12 > len(data):
            raise NotAnImage("The PNG image is truncated (no IEND chunk).")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > len(data):
            raise NotAnImage("The PNG image is truncated or has a malformed chunk.")
        if pos == 8:
            if kind != b"IHDR" or length != 13:
                raise NotAnImage("The PNG image does not start with its header chunk (IHDR).")
            width, height = struct.unpack_from(">II", data, pos + 8)
        elif kind == b"IHDR":
            raise NotAnImage("The PNG image has two header chunks.")
        idat |= kind == b"IDAT"
        if kind in _PNG_KEPT:
            kept.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    if not idat:
        raise NotAnImage("The PNG image has no image data (IDAT).")
    return ImageHeader("PNG", width, height, 1, b"".join(kept))


# ------------------------------------------------------------------------------------------------------- WebP


def _webp_header(data: bytes) -> ImageHeader:
    """The first chunk, as libwebp reads it: the canvas of VP8X (extended), or the VP8 / VP8L bitstream's size."""
    chunk = data[12:16]
    if len(data) < 30:
        raise NotAnImage("The WebP image is truncated.")
    if chunk == b"VP8X":
        if data[20] & 0x02:
            raise UnsupportedImageFormat("Animated WebP images are not accepted; send a still image.")
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise NotAnImage("The WebP image has a malformed VP8 frame header.")
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", data, 26))
    elif chunk == b"VP8L":
        if data[20] != 0x2F:
            raise NotAnImage("The WebP image has a malformed VP8L header.")
        bits = struct.unpack_from("<I", data, 21)[0]
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        raise NotAnImage("The WebP image has no image chunk (VP8, VP8L or VP8X) first.")
    return ImageHeader("WebP", width, height, 1, data)


# -------------------------------------------------------------------------------------------------------- BMP


def _bmp_header(data: bytes) -> ImageHeader:
    """OpenCV's BmpDecoder::readHeader: the info header's size at 14; signed 32-bit width and height (a negative
    height is a top-down image) for headers of 36 bytes or more, unsigned 16-bit for the 12-byte OS/2 header."""
    info_size = struct.unpack_from("<i", data, 14)[0]
    if info_size >= 36:
        width, height = struct.unpack_from("<ii", data, 18)
        if height == -(1 << 31):  # abs() overflows in the decoder
            raise NotAnImage("The BMP image declares an invalid height.")
        height = abs(height)
    elif info_size == 12:
        width, height = struct.unpack_from("<HH", data, 18)
    else:
        raise NotAnImage(f"The BMP image has an unsupported header ({info_size} bytes).")
    return ImageHeader("BMP", width, height, 1, data)


def _tiff_header(data: bytes) -> ImageHeader:
    """Trusted local files only: the size is whatever the decoder finds (no limit applies to them)."""
    return ImageHeader("TIFF", 1, 1, 1, data)


# The allow-list: the formats served to clients (as :func:`identify` names them) and the reader of each one's header.
# TIFF is identified too, but decoded only for trusted local files (``tiff=True``); anything else is not an image.
SERVED_FORMATS: dict[str, Callable[[bytes], ImageHeader]] = {
    "JPEG": _jpeg_header, "PNG": _png_header, "WebP": _webp_header, "BMP": _bmp_header,
}
_SERVED_NAMES = ", ".join(list(SERVED_FORMATS)[:-1]) + " or " + list(SERVED_FORMATS)[-1]  # "JPEG, PNG, WebP or BMP"


# ----------------------------------------------------------------------------------------------------- decode


def _check_sizes(headers: Sequence[ImageHeader], max_pixels: int) -> None:
    """The side limit, the pixels of the request together, and its decoding work, before anything is decoded."""
    used = work = 0
    for index, header in enumerate(headers):
        if max(header.width, header.height) > MAX_SIDE:
            raise TooManyPixels(
                f"The image is {header.width}x{header.height}: a side is over {MAX_SIDE} pixels, more than the "
                "decoder accepts. Downscale it before sending."
            )
        if used + header.pixels > max_pixels:
            if used == 0:
                raise TooManyPixels(
                    f"The image is {header.width}x{header.height} = {header.pixels} pixels; the limit is "
                    f"{max_pixels} (MODEL_SERVER_MAX_IMAGE_PIXELS). Downscale it before sending."
                )
            raise TooManyPixels(
                f"Image {index} would bring the request over {max_pixels} pixels in total "
                "(MODEL_SERVER_MAX_IMAGE_PIXELS applies to all images of a request together). Send fewer or "
                "smaller images per request."
            )
        used += header.pixels
        work += header.work
        if work > DECODE_PASSES_PER_PIXEL * max_pixels:
            raise ImageTooComplex(
                f"Decoding the request's images would take {work // max(1, used)} passes over each pixel "
                f"(image {index} has {header.passes} scans of {header.pixels} pixels); at most "
                f"{DECODE_PASSES_PER_PIXEL} passes over the pixel limit are allowed. Re-encode the images as "
                "baseline JPEGs or send smaller ones."
            )


def _decode(header: ImageHeader) -> np.ndarray:
    try:
        image = cv2.imdecode(np.frombuffer(header.data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        if exc.code == cv2.Error.StsNoMem:  # out of memory: errors.to_serving_error answers 422
            raise
        if "CV_IO_MAX_IMAGE" in str(exc):  # the decoder's own size limit (OPENCV_IO_MAX_IMAGE_PIXELS, ...)
            raise TooManyPixels(
                f"The {header.format} image declares more pixels than the decoder allows "
                "(MODEL_SERVER_MAX_IMAGE_PIXELS)."
            ) from None
        raise NotAnImage(f"The {header.format} image cannot be decoded (corrupt).") from None
    if image is None or image.size == 0:
        raise NotAnImage(f"The {header.format} image cannot be decoded (truncated or corrupt).")
    if header.format != "TIFF" and image.shape[0] * image.shape[1] != header.pixels:
        raise NotAnImage(
            f"The {header.format} image decodes to {image.shape[1]}x{image.shape[0]} pixels, not the "
            f"{header.width}x{header.height} its header declares."
        )
    return image


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _decoder_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="image-decoder")
        return _pool


def _decode_within(header: ImageHeader, deadline: Deadline) -> np.ndarray:
    """Decode on a decoder thread and wait at most until the deadline (a running decode cannot be interrupted; its
    work is bounded by the checks above)."""
    remaining = deadline.remaining()
    if remaining is None:
        return _decode(header)
    deadline.check("it was still decoding its images")
    future = _decoder_pool().submit(_decode, header)
    try:
        return future.result(timeout=max(0.0, remaining))
    except FutureTimeout:
        future.cancel()
        raise exceeded("it was still decoding its images") from None


def decode_image(data: bytes, max_pixels: int, deadline: Deadline = NO_DEADLINE, tiff: bool = False) -> np.ndarray:
    """Decode one image file to (H, W, 3) BGR uint8 through the gate (see the module docstring)."""
    return decode_images([data], max_pixels, deadline, tiff)[0]


def decode_images(
    files: Sequence[bytes], max_pixels: int, deadline: Deadline = NO_DEADLINE, tiff: bool = False
) -> list[np.ndarray]:
    """Decode the image files of one request. Every header is read and checked first, so a request over its limits
    is refused before any image is decoded: ``max_pixels`` bounds each image AND their total (all of them are in
    memory at once), and the decoding work is bounded by ``DECODE_PASSES_PER_PIXEL`` x ``max_pixels``. ``tiff``:
    also decode TIFF (trusted local files only)."""
    headers = []
    for data in files:
        deadline.check("it was still decoding its images")
        headers.append(read_header(data, tiff))
    _check_sizes([h for h in headers if h.format != "TIFF"], max_pixels)
    images = []
    for header in headers:
        images.append(_decode_within(header, deadline))
    return images
