"""The TF2 network's weight transforms (the network end to end is tested through the optimized backend)."""

import numpy as np
import tensorflow as tf

from maskrcnn_serving.modeling.tf2_network import fold_frozen_bn


def test_fold_frozen_bn_equals_conv_then_bn():
    rng = np.random.default_rng(0)
    weights = {
        "c/W": rng.normal(size=(3, 3, 4, 5)).astype(np.float32),
        "c/bn/gamma": rng.uniform(0.5, 2, 5).astype(np.float32),
        "c/bn/beta": rng.normal(size=5).astype(np.float32),
        "c/bn/mean/EMA": rng.normal(size=5).astype(np.float32),
        "c/bn/variance/EMA": rng.uniform(0.1, 3, 5).astype(np.float32),
    }
    x = tf.constant(rng.normal(size=(1, 6, 7, 4)).astype(np.float32))
    conv = tf.nn.conv2d(x, weights["c/W"], 1, "SAME")
    expected = (conv - weights["c/bn/mean/EMA"]) / np.sqrt(weights["c/bn/variance/EMA"] + 1e-5)
    expected = expected * weights["c/bn/gamma"] + weights["c/bn/beta"]
    kernel, bias = fold_frozen_bn(weights, "c")
    np.testing.assert_allclose(tf.nn.conv2d(x, kernel, 1, "SAME") + bias, expected, rtol=1e-4, atol=1e-4)


