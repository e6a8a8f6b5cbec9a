"""Synthetic inputs made in-process, so a benchmark needs no data set and measures JPEG decoding like a server does.

Images look roughly like photos to the codec (smooth gradients, filled shapes, mild sensor noise), so their JPEG
size and decode time are realistic; a pure-noise image would be several times larger than a real photo.
"""

from __future__ import annotations

import re

import cv2
import numpy as np

# COCO-like, the largest size the default test resize keeps (1333x800) and a 12-megapixel phone photo.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1333, 800), (4000, 3000))


def parse_size(text: str) -> tuple[int, int]:
    """"640x480" -> (640, 480), i.e. (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) <= 0 or int(match.group(2)) <= 0:
        raise ValueError(f"expected a size like 640x480 (width x height), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A (height, width, 3) uint8 BGR image: a colour gradient with 6-20 filled shapes and Gaussian noise (sigma 4)."""
    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top_left, top_right, bottom = (rng.uniform(30, 220, 3).astype(np.float32) for _ in range(3))
    image = (1 - ys) * ((1 - xs) * top_left + xs * top_right) + ys * bottom
    image = np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))
    scale = min(width, height)
    for _ in range(int(rng.integers(6, 21))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        size = int(rng.uniform(0.04, 0.3) * scale)
        kind = rng.integers(3)
        if kind == 0:
            cv2.circle(image, centre, size, colour, -1, cv2.LINE_AA)
        elif kind == 1:
            top_left, bottom_right = (centre[0] - size, centre[1] - size // 2), (centre[0] + size, centre[1] + size)
            cv2.rectangle(image, top_left, bottom_right, colour, -1)
        else:
            points = np.array([centre, (centre[0] + size, centre[1] + size), (centre[0] - size, centre[1] + size)])
            cv2.fillPoly(image, [points.astype(np.int32)], colour, cv2.LINE_AA)
    noise = rng.normal(0.0, 4.0, image.shape).astype(np.float32)
    return np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2 could not encode a JPEG")
    return buffer.tobytes()


def synthetic_jpegs(size: tuple[int, int], count: int, seed: int = 0) -> list[bytes]:
    """``count`` different JPEG files of ``size`` (width, height)."""
    return [encode_jpeg(synthetic_image(size[0], size[1], seed + i)) for i in range(count)]


def synthetic_masks(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(count, height, width) uint8 {0, 1} instance-like masks: filled ellipses, rectangles, triangles and rings of
    5-60% of the image side at random places (some touch the borders, some rings have holes)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, height, width), np.uint8)
    scale = min(height, width)
    for mask in masks:
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        rx, ry = (max(1, int(rng.uniform(0.025, 0.3) * scale)) for _ in range(2))
        kind = rng.integers(4)
        if kind == 0:
            cv2.ellipse(mask, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        elif kind == 1:
            cv2.rectangle(mask, (cx - rx, cy - ry), (cx + rx, cy + ry), 1, -1)
        elif kind == 2:
            points = np.array([(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)], np.int32)
            cv2.fillPoly(mask, [points], 1)
        else:
            cv2.circle(mask, (cx, cy), max(rx, ry), 1, -1)
            cv2.circle(mask, (cx, cy), max(rx, ry) // 2, 0, -1)
    return masks
