"""Winograd F(4x4, 3x3) convolutions against the direct ones."""

import numpy as np
import pytest
import tensorflow as tf


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
    args = tf.constant(x), tf.constant(kernel), tf.constant(winograd.transform_kernel(kernel)), tf.constant(bias)
    actual = winograd.conv3x3(*args, relu)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.numpy(), expected, atol=1e-4 * np.abs(expected).max())
    # A (0, 0) canvas (an image no canvas holds) takes the direct convolution instead.
    direct = winograd.conv3x3(*args, relu, canvas_hw=tf.zeros([2], tf.int32))
    np.testing.assert_allclose(direct.numpy(), expected, atol=1e-5 * np.abs(expected).max())


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


def test_winograd_relu_stack_is_one_program_for_every_count():
    """The mask head's stack runs in chunks of MASK_CHUNK maps: one trace (so one XLA program) whatever the count."""
    from maskrcnn_serving.modeling import winograd

    rng = np.random.default_rng(0)
    kernels = [tf.constant(winograd.transform_kernel(rng.normal(size=(3, 3, 5, 5)).astype(np.float32)))] * 2
    biases = [tf.zeros([5])] * 2
    before = winograd._relu_stack.experimental_get_tracing_count()
    for count in (1, winograd.MASK_CHUNK, winograd.MASK_CHUNK + 1, 5 * winograd.MASK_CHUNK - 3):
        out = winograd.conv3x3_relu_stack(tf.zeros([count, 14, 14, 5]), kernels, biases)
        assert out.shape == (count, 14, 14, 5)
    assert winograd._relu_stack.experimental_get_tracing_count() - before == 1


def test_winograd_on_a_canvas_equals_the_unpadded_convolution():
    """A map zero-padded to a larger canvas gives the same sums in its own region; every size and batch size goes
    through the one traced single-image program."""
    from maskrcnn_serving.modeling import winograd

    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 3, 6, 7)).astype(np.float32)
    layer = (tf.constant(kernel), tf.constant(winograd.transform_kernel(kernel)), tf.constant(rng.normal(size=7),
                                                                                            tf.float32))
    for shape, canvas in (((1, 9, 14, 6), (12, 16)), ((3, 10, 7, 6), (16, 8)), ((2, 8, 8, 6), (8, 8))):
        x = tf.constant(rng.normal(size=shape).astype(np.float32))
        expected = winograd.conv3x3(x, *layer, relu=True)
        actual = winograd.conv3x3(x, *layer, relu=True, canvas_hw=tf.constant(canvas))
        assert actual.shape == shape[:3] + (7,)
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-5 * np.abs(expected.numpy()).max())
    assert len(winograd._compiled_conv._list_all_concrete_functions()) == 1


def test_every_winograd_layer_shares_one_traced_function():
    """The layers of a graph call one traced function (the choice of path, the padding to the canvas, the map over
    the images), instead of each building its own copy: that copy per layer made tracing the float32 graph about
    1 s longer."""
    from maskrcnn_serving.modeling import winograd

    rng = np.random.default_rng(4)
    layers = []
    for channels, out_channels in ((6, 7), (7, 7), (7, 9)):
        kernel = rng.normal(size=(3, 3, channels, out_channels)).astype(np.float32)
        layers.append((tf.constant(kernel), tf.constant(winograd.transform_kernel(kernel)), tf.zeros([out_channels])))

    @tf.function(autograph=False)
    def network(x: tf.Tensor, canvas: tf.Tensor) -> tf.Tensor:
        for index, layer in enumerate(layers):
            x = winograd.conv3x3(x, *layer, relu=index < 2, canvas_hw=canvas)
        return x

    winograd.conv3x3(tf.zeros([1, 4, 4, 6]), *layers[0])  # traced here already (any earlier test may have too)
    before = winograd._canvas_conv.experimental_get_tracing_count()
    out = network(tf.constant(rng.normal(size=(2, 9, 11, 6)).astype(np.float32)), tf.constant([12, 12]))
    assert out.shape == (2, 9, 11, 9)
    assert winograd._canvas_conv.experimental_get_tracing_count() == before
    calls = [op for op in network.get_concrete_function(tf.TensorSpec([None, None, None, 6]),
                                                       tf.TensorSpec([2], tf.int32)).graph.get_operations()
             if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    assert len(calls) == len(layers)
