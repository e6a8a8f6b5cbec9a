"""Numeric building blocks against small hand-checked cases (spec-facts C.2-C.13)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_serving.modeling import tf_ops
from maskrcnn_serving.modeling.anchors import cell_anchors, fpn_anchors, grid_anchors
from maskrcnn_serving.modeling.paste import paste_mask_patch, paste_masks
from maskrcnn_serving.modeling.preprocess import boxes_to_original, resize_image, resized_shape


# --- resize (C.2) -------------------------------------------------------------------------------------------------
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


# --- anchors (C.4) ------------------------------------------------------------------------------------------------
def test_cell_anchors_ratio_is_height_over_width():
    cells = cell_anchors(32, (0.5, 1.0, 2.0))
    w = math.sqrt(32 * 32 / 0.5)
    np.testing.assert_allclose(cells[0], [-w / 2, -w / 4, w / 2, w / 4])  # r = 0.5 is a wide box
    np.testing.assert_allclose(cells[1], [-16, -16, 16, 16])
    np.testing.assert_allclose(cells[2], [-w / 4, -w / 2, w / 4, w / 2])


def test_grid_anchors_are_centred_on_j_stride_i_stride():
    anchors = grid_anchors(4, 32, (0.5, 1.0, 2.0), 3, 5)
    assert anchors.shape == (3, 5, 3, 4) and anchors.dtype == np.float32
    np.testing.assert_allclose(anchors[0, 0, 1], [-16, -16, 16, 16])
    np.testing.assert_allclose(anchors[1, 2, 1], [8 - 16, 4 - 16, 8 + 16, 4 + 16])  # row i=1 (y), column j=2 (x)


def test_fpn_anchor_fields_follow_max_size():
    levels = fpn_anchors((4, 8, 16, 32, 64), (32, 64, 128, 256, 512), (0.5, 1.0, 2.0), 1344.0)
    assert [a.shape[0] for a in levels] == [336, 168, 84, 42, 21]


# --- box decoding (C.7) -------------------------------------------------------------------------------------------
def test_decode_boxes_hand_case_and_clip():
    anchors = tf.constant([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 20.0]])
    deltas = tf.constant([[0.1, 0.2, math.log(2.0), 0.0], [0.0, 0.0, 10.0, 0.0]])
    out = tf_ops.decode_boxes(deltas, anchors, clip=math.log(84.0)).numpy()
    # wa=10, ha=20, centre (5, 10): xc = 0.1*10 + 5 = 6, yc = 0.2*20 + 10 = 14, w = 2*10 = 20, h = 20.
    np.testing.assert_allclose(out[0], [-4, 4, 16, 24], rtol=1e-6)
    # tw=10 is clipped to log(84): w = 84 * 10 = 840 about the centre x = 5.
    np.testing.assert_allclose(out[1], [5 - 420, 0, 5 + 420, 20], rtol=1e-5)


def test_clip_boxes_to_unpadded_image():
    boxes = tf.constant([[-3.0, -1.0, 700.0, 30.0]])
    out = tf_ops.clip_boxes(boxes, tf.constant([480, 640])).numpy()
    np.testing.assert_allclose(out, [[0, 0, 640, 30]])


def test_fastrcnn_decoding_divides_by_regression_weights():
    proposals = tf.constant([[0.0, 0.0, 10.0, 20.0]])
    deltas = tf.constant([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 5 * math.log(2.0), 0.0]]])  # (1, 2 classes, 4)
    out = tf_ops.decode_fastrcnn_boxes(deltas, proposals, [10, 10, 5, 5], math.log(84.0), tf.constant([100, 100]))
    np.testing.assert_allclose(out.numpy()[0, 1], [0, 4, 16, 24], rtol=1e-6)  # x1 = -4 clipped to the image


# --- RoIAlign (C.9) -----------------------------------------------------------------------------------------------
def arange_map(size=5):
    return tf.constant(np.arange(size * size, dtype=np.float32).reshape(1, size, size, 1))


def test_roi_align_half_pixel_two_samples_per_bin():
    # Samples of box [1,1,3,3] on a 5x5 arange map at 4x4 are 4.5 5 5.5 6 / 7 7.5 8 8.5 / ... (tensorpack's
    # documented example); averaging 2x2 of them gives the 2x2 RoIAlign output.
    out = tf_ops.roi_align(arange_map(), tf.constant([[1.0, 1.0, 3.0, 3.0]]), 2).numpy()[0, :, :, 0]
    np.testing.assert_allclose(out, [[6.0, 7.0], [11.0, 12.0]], rtol=1e-6)


def test_roi_align_border_replicates_edge():
    # Box [0,0,1,1] at resolution 1 samples x, y in {-0.25, 0.25} (pixel-index units); the edge-replicated border
    # makes -0.25 read pixel 0, so the mean is 0.125 along each axis: 5 * 0.125 + 0.125 = 0.75.
    out = tf_ops.roi_align(arange_map(), tf.constant([[0.0, 0.0, 1.0, 1.0]]), 1).numpy()
    np.testing.assert_allclose(out[0, 0, 0, 0], 0.75, rtol=1e-6)


def test_fpn_level_assignment():
    sides = np.array([10, 56, 111, 112, 224, 447, 448, 2000], np.float32)
    boxes = tf.constant(np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], axis=1))
    # floor(4 + log2(side / 224 + 1e-6)) clamped to [2, 5], minus 2.
    np.testing.assert_array_equal(tf_ops.fpn_level_indices(boxes).numpy(), [0, 0, 0, 1, 2, 2, 3, 3])


def test_multilevel_roi_align_keeps_box_order():
    features = [tf.fill([1, 1024 // s, 1024 // s, 1], float(i)) for i, s in enumerate((4, 8, 16, 32))]
    boxes = tf.constant([[0, 0, 500, 500], [0, 0, 10, 10], [0, 0, 224, 224], [0, 0, 120, 120]], tf.float32)
    out = tf_ops.multilevel_roi_align(features, boxes, (4, 8, 16, 32), 2).numpy()
    np.testing.assert_array_equal(out[:, 0, 0, 0], [3, 0, 2, 1])


# --- final predictions (C.11) -------------------------------------------------------------------------------------
def test_fastrcnn_predictions_per_class_nms_and_strict_threshold():
    # Two overlapping proposals; class 1 scores them 0.9 / 0.8, class 2 scores the second 0.7 (threshold 0.7: dropped).
    boxes = tf.constant(np.tile(np.array([[0, 0, 10, 10], [1, 1, 10, 10]], np.float32)[:, None, :], [1, 3, 1]))
    scores = tf.constant([[0.1, 0.9, 0.0], [0.0, 0.8, 0.7]])
    b, s, labels = tf_ops.fastrcnn_predictions(boxes, scores, 0.7, 100, 0.5)
    np.testing.assert_allclose(s.numpy(), [0.9])
    np.testing.assert_array_equal(labels.numpy(), [1])
    b, s, labels = tf_ops.fastrcnn_predictions(boxes, scores, 0.5, 100, 0.5)  # class 2 kept: NMS is per class
    np.testing.assert_allclose(s.numpy(), [0.9, 0.7])
    np.testing.assert_array_equal(labels.numpy(), [1, 2])
    np.testing.assert_allclose(b.numpy()[1], [1, 1, 10, 10])


# --- mask paste (C.13) --------------------------------------------------------------------------------------------
def reference_accurate_paste(box, mask, hw, threshold=0.5):
    """Per-pixel transcription of the spec: bilinear between knots 0.5..29.5 of the zero-padded mask, 0 outside."""
    padded = np.pad(mask.astype(np.float64), 1)
    n = padded.shape[0]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw_, hh = (box[2] - box[0]) / 2 * n / (n - 2), (box[3] - box[1]) / 2 * n / (n - 2)
    x0, x1, y0, y1 = cx - hw_, cx + hw_, cy - hh, cy + hh
    out = np.zeros(hw, np.uint8)
    for y in range(hw[0]):
        v = (y + 0.5 - y0) / (y1 - y0) * n - 0.5
        if not 0 <= v <= n - 1:
            continue
        for x in range(hw[1]):
            u = (x + 0.5 - x0) / (x1 - x0) * n - 0.5
            if not 0 <= u <= n - 1:
                continue
            i, j = min(int(v), n - 2), min(int(u), n - 2)
            a, b = v - i, u - j
            value = (padded[i, j] * (1 - a) * (1 - b) + padded[i, j + 1] * (1 - a) * b
                     + padded[i + 1, j] * a * (1 - b) + padded[i + 1, j + 1] * a * b)
            out[y, x] = value >= threshold
    return out


def test_accurate_paste_of_a_full_mask_fills_exactly_its_box():
    # Box [10, 38): the grown box is [9, 39]; pixel x=10 sits on knot 1 (value 1), x=9 on the zero knot 0.
    out = paste_masks(np.array([[10.0, 10.0, 38.0, 38.0]]), np.ones((1, 28, 28), np.float32), (50, 50))[0]
    expected = np.zeros((50, 50), np.uint8)
    expected[10:38, 10:38] = 1
    np.testing.assert_array_equal(out, expected)


def test_accurate_paste_matches_per_pixel_reference():
    rng = np.random.default_rng(0)
    hw = (60, 70)
    for _ in range(12):
        x0, y0 = rng.uniform(-5, 50, 2)
        box = np.array([x0, y0, x0 + rng.uniform(0.5, 40), y0 + rng.uniform(0.5, 40)])
        box = np.clip(box, 0, [70, 60, 70, 60])
        mask = rng.uniform(0, 1, (28, 28)).astype(np.float32)
        got = paste_masks(box[None], mask[None], hw)[0]
        np.testing.assert_array_equal(got, reference_accurate_paste(box, mask, hw))


def test_paste_degenerate_box_is_empty():
    y0, x0, patch = paste_mask_patch(np.array([5.0, 5.0, 5.0, 9.0]), np.ones((28, 28)), (20, 20))
    assert patch.size == 0


def test_fast_paste_rounds_the_box():
    out = paste_masks(np.array([[10.0, 10.0, 38.0, 38.0]]), np.ones((1, 28, 28), np.float32), (50, 50),
                      accurate=False)[0]
    assert out[10:38, 10:38].all() and out.sum() == 28 * 28
    edge = paste_masks(np.array([[40.0, 40.0, 50.0, 50.0]]), np.ones((1, 28, 28), np.float32), (50, 50),
                       accurate=False)[0]
    assert edge[40:50, 40:50].all() and edge.sum() == 100


def tensorpack_accurate_paste(box, mask, hw):
    """tensorpack's own accurate paste, with the SciPy interp2d it used (removed in SciPy 1.14; scipy is pinned to
    1.13.1 in the dev extra for this comparison only)."""
    import warnings

    interpolate = pytest.importorskip("scipy.interpolate")
    if not hasattr(interpolate, "interp2d"):
        pytest.skip("this SciPy has no interp2d (removed in 1.14)")
    padded = np.pad(mask, [(1, 1), (1, 1)], mode="constant")
    n = padded.shape[0]
    w_half, h_half = (box[2] - box[0]) * 0.5 * n / (n - 2), (box[3] - box[1]) * 0.5 * n / (n - 2)
    x_c, y_c = (box[2] + box[0]) * 0.5, (box[3] + box[1]) * 0.5
    scaled = np.array([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half])
    knots = np.arange(0.0, n) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        interp = interpolate.interp2d(knots, knots, padded, fill_value=0.0)
    ys = (np.arange(0.0, hw[0]) + 0.5 - scaled[1]) / (scaled[3] - scaled[1]) * n
    xs = (np.arange(0.0, hw[1]) + 0.5 - scaled[0]) / (scaled[2] - scaled[0]) * n
    return (interp(xs, ys) >= 0.5).astype(np.uint8)


def test_accurate_paste_equals_scipy_interp2d_as_tensorpack_used_it():
    rng = np.random.default_rng(1)
    hw = (80, 90)
    for _ in range(20):
        x0, y0 = rng.uniform(0, 60, 2)
        box = np.array([x0, y0, min(90.0, x0 + rng.uniform(1, 60)), min(80.0, y0 + rng.uniform(1, 60))])
        # Real network masks: smooth sigmoid outputs, so no value sits within rounding of the threshold.
        mask = cv2_blur(rng.uniform(0, 1, (28, 28)))
        ours = paste_masks(box[None], mask[None], hw)[0]
        np.testing.assert_array_equal(ours, tensorpack_accurate_paste(box, mask, hw))


def cv2_blur(values):
    import cv2

    return cv2.GaussianBlur(values.astype(np.float32), (5, 5), 1.5)


# --- Winograd F(4x4, 3x3) -------------------------------------------------------------------------------------------
def test_winograd_matrices_compute_the_1d_correlation_exactly():
    from maskrcnn_serving.modeling.winograd import winograd_matrices

    at, g, bt = winograd_matrices()
    assert np.array_equal(bt, np.round(bt))  # integer input transform: no rounding before the products
    for k in range(3):
        for j in range(6):
            d, kernel = np.eye(6)[j], np.eye(3)[k]
            expected = [d[i : i + 3] @ kernel for i in range(4)]
            np.testing.assert_allclose(at @ ((g @ kernel) * (bt @ d)), expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 13, 17, 8), (1, 8, 12, 16), (3, 4, 5, 2)])
@pytest.mark.parametrize("relu", [False, True])
def test_winograd_conv3x3_equals_the_direct_convolution(shape, relu):
    from maskrcnn_serving.modeling import winograd

    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(3, 3, shape[3], 5)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    expected = tf.nn.conv2d(x.astype(np.float64), kernel.astype(np.float64), 1, "SAME").numpy() + bias
    if relu:
        expected = np.maximum(expected, 0)
    actual = winograd.conv3x3(tf.constant(x), tf.constant(winograd.transform_kernel(kernel)), tf.constant(bias), relu)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.numpy(), expected, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("count", [0, 3, 8, 13])
def test_winograd_relu_stack_equals_direct_convolutions_for_any_count(count):
    from maskrcnn_serving.modeling import winograd

    rng = np.random.default_rng(count)
    x = rng.normal(size=(count, 14, 14, 6)).astype(np.float32)
    kernels = [rng.normal(size=(3, 3, 6, 6)).astype(np.float32) * 0.3 for _ in range(3)]
    biases = [rng.normal(size=6).astype(np.float32) for _ in range(3)]
    expected = x.astype(np.float64)
    for kernel, bias in zip(kernels, biases, strict=True):
        expected = np.maximum(tf.nn.conv2d(expected, kernel.astype(np.float64), 1, "SAME").numpy() + bias, 0)
    actual = winograd.conv3x3_relu_stack(
        tf.constant(x), [tf.constant(winograd.transform_kernel(k)) for k in kernels], [tf.constant(b) for b in biases]
    )
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.numpy(), expected, atol=1e-4 * np.abs(expected).max(initial=1.0))


def test_winograd_padded_counts_are_few():
    from maskrcnn_serving.modeling.winograd import padded_count

    counts = np.arange(0, 801)
    padded = padded_count(tf.constant(counts, tf.int32)).numpy()
    assert (padded >= counts).all() and (padded >= 8).all()
    assert (padded - counts)[(counts > 0) & (counts <= 128)].max() == 7 and (padded - counts).max() == 31
    assert len(np.unique(padded)) == 16 + (800 - 128) // 32
