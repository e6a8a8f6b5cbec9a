"""Test-time resize (tensorpack ``CustomResize``; docs/model-conventions.md#preprocessing) and the inverse box scale."""

from __future__ import annotations

import cv2
import numpy as np


def resized_shape(height: int, width: int, short_edge: int, max_size: float) -> tuple[int, int]:
    """(new_h, new_w): short edge to ``short_edge``, long edge at most ``max_size``, rounded half up."""
    scale = short_edge / min(height, width)
    if height < width:
        new_h, new_w = float(short_edge), scale * width
    else:
        new_h, new_w = scale * height, float(short_edge)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    # At least one pixel: an extreme aspect ratio (e.g. 2 x 3000) would otherwise round a side to 0.
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def resize_image(image: np.ndarray, short_edge: int, max_size: float) -> tuple[np.ndarray, float]:
    """Resize a uint8 HxWx3 image; return it with the isotropic factor that maps its boxes back.

    The factor is ``sqrt(new_h / h * new_w / w)``, as tensorpack's ``predict_image`` uses.
    """
    height, width = image.shape[:2]
    new_h, new_w = resized_shape(height, width, short_edge, max_size)
    if (new_h, new_w) != (height, width):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return image, float(np.sqrt(new_h / height * new_w / width))


def boxes_to_original(boxes: np.ndarray, scale: float, image_hw: tuple[int, int]) -> np.ndarray:
    """Map (N, 4) xyxy boxes from network-input pixels to the original image and clip them like tensorpack:
    x1, y1 >= 0, x2 <= W, y2 <= H (no other bounds)."""
    out = boxes / scale
    height, width = image_hw
    out[:, :2] = np.maximum(out[:, :2], 0.0)
    out[:, 2] = np.minimum(out[:, 2], width)
    out[:, 3] = np.minimum(out[:, 3], height)
    return out
