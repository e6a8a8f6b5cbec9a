"""Test-time resize and the inverse box scale (docs/model-conventions.md#preprocessing)."""

import math

import numpy as np
import pytest

from maskrcnn_serving.modeling.preprocess import boxes_to_original, resize_image, resized_shape


# --- resize -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hw, short, max_size, expected",
    [
        ((480, 640), 800, 1344.0, (800, 1067)),  # 800 * 640 / 480 = 1066.67 -> 1067
        ((640, 480), 800, 1344.0, (1067, 800)),
        ((100, 2000), 800, 1344.0, (67, 1344)),  # long side capped: both sides scaled by 1344 / 16000
        ((300, 300), 320, 576.0, (320, 320)),
        ((240, 420), 320, 576.0, (320, 560)),
    ],
)
def test_resized_shape(hw, short, max_size, expected):
    assert resized_shape(*hw, short, max_size) == expected


def test_resize_image_scale_and_boxes_back():
    image = np.zeros((480, 640, 3), np.uint8)
    resized, scale = resize_image(image, 800, 1344.0)
    assert resized.shape == (800, 1067, 3) and resized.dtype == np.uint8
    assert scale == pytest.approx(math.sqrt(800 / 480 * 1067 / 640))
    boxes = np.array([[-5.0, 10.0, 2000.0, 900.0]], np.float32)
    back = boxes_to_original(boxes.copy(), scale, (480, 640))
    np.testing.assert_allclose(back, [[0.0, 10.0 / scale, 640.0, 480.0]], rtol=1e-6)
