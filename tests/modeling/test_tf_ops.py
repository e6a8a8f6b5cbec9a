"""TF building blocks against small hand-checked cases: box decoding, RoIAlign, final predictions
(docs/model-conventions.md)."""

import math

import numpy as np
import tensorflow as tf

from maskrcnn_serving.modeling import tf_ops


# --- box decoding (docs/model-conventions.md#box-decoding) --------------------------------------------------------
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


# --- RoIAlign (docs/model-conventions.md#roialign) ----------------------------------------------------------------
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
    levels = tf_ops.fpn_levels(boxes)
    assert levels.dtype == tf.float32  # float, so that on a GPU it stays in device memory
    np.testing.assert_array_equal(levels.numpy(), [0, 0, 0, 1, 2, 2, 3, 3])


def test_multilevel_roi_align_keeps_box_order():
    features = [tf.fill([1, 1024 // s, 1024 // s, 1], float(i)) for i, s in enumerate((4, 8, 16, 32))]
    boxes = tf.constant([[0, 0, 500, 500], [0, 0, 10, 10], [0, 0, 224, 224], [0, 0, 120, 120]], tf.float32)
    out = tf_ops.multilevel_roi_align(features, boxes, (4, 8, 16, 32), 2).numpy()
    np.testing.assert_array_equal(out[:, 0, 0, 0], [3, 0, 2, 1])


# --- final predictions (docs/model-conventions.md#per-class-nms) --------------------------------------------------
def test_fastrcnn_predictions_per_class_nms_and_strict_threshold():
    # Two overlapping proposals; class 1 scores them 0.9 / 0.8, class 2 scores the second 0.7 (threshold 0.7: dropped).
    boxes = tf.constant(np.tile(np.array([[0, 0, 10, 10], [1, 1, 10, 10]], np.float32)[:, None, :], [1, 3, 1]))
    scores = tf.constant([[0.1, 0.9, 0.0], [0.0, 0.8, 0.7]])
    b, s, labels, sources = tf_ops.fastrcnn_predictions(boxes, scores, 0.7, 100, 0.5)
    np.testing.assert_allclose(s.numpy(), [0.9])
    np.testing.assert_array_equal(labels.numpy(), [1])
    b, s, labels, sources = tf_ops.fastrcnn_predictions(boxes, scores, 0.5, 100, 0.5)  # class 2 kept: per class NMS
    np.testing.assert_allclose(s.numpy(), [0.9, 0.7])
    np.testing.assert_array_equal(labels.numpy(), [1, 2])
    np.testing.assert_allclose(b.numpy()[1], [1, 1, 10, 10])
    # each detection's proposal: its row of the scores gives the detection's score at its label
    np.testing.assert_array_equal(sources.numpy(), [0, 1])
    np.testing.assert_allclose(scores.numpy()[sources.numpy(), labels.numpy()], s.numpy())
