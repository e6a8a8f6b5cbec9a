"""The decoding gate: the one place where client bytes become pixels.

Image file bytes are decoded in memory to (H, W, 3) BGR uint8, as the seed's ``cv2.imread(IMREAD_COLOR)`` does.
Only the formats in :data:`IMAGE_FORMATS` pass, and the pixel count is checked before anything is decoded.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from maskrcnn_serving.deadline import NO_DEADLINE, Deadline
from maskrcnn_serving.errors import NotAnImage, TooManyPixels

# Formats identified from the header (by Pillow) that are then decoded by cv2; anything else is refused.
IMAGE_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "BMP": "BMP", "TIFF": "TIFF", "WEBP": "WebP"}


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image file bytes in memory to (H, W, 3) BGR uint8, as the seed's ``cv2.imread(IMREAD_COLOR)`` does:
    EXIF orientation applied, grayscale expanded, alpha dropped, 16-bit scaled to 8 bits.

    The pixel count is checked from the header (Pillow reads only the header) BEFORE the full decode, so a small
    file declaring a huge image (a decompression bomb) costs nothing.
    """
    if not data:
        raise NotAnImage("The image is empty.")
    try:
        with Image.open(io.BytesIO(data)) as header:
            image_format, (width, height) = header.format, header.size
    except Image.DecompressionBombError:
        raise TooManyPixels("The image declares more pixels than the decoder allows.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise NotAnImage("The data is not an image in a supported format (JPEG, PNG, BMP, TIFF, WebP).") from None
    if image_format not in IMAGE_FORMATS:
        raise NotAnImage(f"Image format {image_format} is not supported; send JPEG, PNG, BMP, TIFF or WebP.")
    if width * height > max_pixels:
        raise TooManyPixels(
            f"The image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "(MODEL_SERVER_MAX_IMAGE_PIXELS). Downscale it before sending."
        )
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise NotAnImage(f"The {IMAGE_FORMATS[image_format]} image cannot be decoded (truncated or corrupt).")
    return image


def decode_images(
    files: Sequence[bytes], max_pixels: int, deadline: Deadline = NO_DEADLINE
) -> list[np.ndarray]:
    """Decode the image files of one request; ``max_pixels`` bounds each image AND their total, since all of them
    are in memory at once (16 images at the per-image limit would otherwise need 16 x 150 MB for one request)."""
    images: list[np.ndarray] = []
    used = 0
    for index, data in enumerate(files):
        deadline.check("it was still decoding its images")
        try:
            image = decode_image(data, max_pixels - used)
        except TooManyPixels:
            if used == 0:
                raise
            raise TooManyPixels(
                f"Image {index} would bring the request over {max_pixels} pixels in total "
                "(MODEL_SERVER_MAX_IMAGE_PIXELS applies to all images of a request together). Send fewer or "
                "smaller images per request."
            ) from None
        used += image.shape[0] * image.shape[1]
        images.append(image)
    return images
