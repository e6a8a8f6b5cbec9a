"""3x3 stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3), compiled with XLA, for float32 on CPU.

Why: on CPU the network is compute-bound (oneDNN's direct convolution already runs near the cores' peak), and its
largest layers are 3x3 stride-1 convolutions with 128-256 channels on large maps (the FPN and RPN convolutions on
P2 and P3 alone are a quarter of all multiply-adds). F(4x4, 3x3) computes each 4x4 output tile from a 6x6 input
tile with 36 multiplies per channel pair instead of 144: the per-tile work becomes 36 independent matrix products
``[tiles, C] @ [C, K]``, and the input/output transforms are cheap linear maps. Those transforms are memory-bound;
as separate TensorFlow ops they cost more than the multiplies saved, so the whole convolution is one XLA cluster
(``jit_compile``), which fuses them into a few passes. Measured on a 2-core AVX-512 CPU: a 3x3 256->256
convolution on a 200x272 map takes 86 ms instead of 165 ms.

The result equals the direct convolution up to float32 rounding (the transforms have coefficients up to 8, so the
rounding error is about 10x that of the direct convolution: ~1e-5 relative). It is meant for float32 only: in
bfloat16 or float16 that amplified rounding would be visible, and those dtypes have fast direct kernels anyway.

XLA compiles once per input shape. To keep the number of shapes small, the program takes one image at a time (a
batch runs image by image: the programs do not depend on the batch size), the kernel and the ReLU as arguments
(every layer of one map size and channel count shares it), and :func:`conv3x3` can run a map zero-padded to a
larger ``canvas``, so that all the sizes that fit in a canvas share that canvas's program: the optimized backend
runs each request at one of a few canvas sizes per orientation and compiles them all while it warms up
(backends/optimized.py). The mask head's stack runs in chunks of a fixed number of RoIs: one program for any
detection count. Frames: NHWC, SAME padding (one zero row/column on each side).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

OUTPUT_TILE = 4  # m in F(m x m, 3 x 3)
KERNEL_SIZE = 3
INPUT_TILE = OUTPUT_TILE + KERNEL_SIZE - 1  # 6
# Interpolation points of the Cook-Toom construction (plus the point at infinity): the usual choice for F(4, 3).
_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0)


def winograd_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D F(4, 3) matrices (A^T (4x6), G (6x3), B^T (6x6)), float64, such that for a 6-sample input d and a 3-tap
    kernel g the 4 correlation outputs ``y[i] = sum_k d[i + k] g[k]`` are ``A^T ((G g) * (B^T d))``.

    A^T and G are Vandermonde matrices of the points (last column/row for the point at infinity); B^T is solved
    from that identity, then each of its rows is scaled to integer entries (the scale moves into G's row)."""
    a, m, r = INPUT_TILE, OUTPUT_TILE, KERNEL_SIZE
    at = np.zeros((m, a))
    g = np.zeros((a, r))
    for column, point in enumerate(_POINTS):
        at[:, column] = point ** np.arange(m)
        g[column] = point ** np.arange(r)
    at[m - 1, a - 1] = 1.0
    g[a - 1, r - 1] = 1.0
    # y_i = sum_t AT[i, t] (G g)_t (BT d)_t must equal d_{i+k} g_k for every basis kernel g = e_k and input d = e_j.
    equations, targets = [], []
    for k in range(r):
        for j in range(a):
            for i in range(m):
                coefficients = np.zeros((a, a))
                coefficients[:, j] = at[i] * g[:, k]
                equations.append(coefficients.ravel())
                targets.append(1.0 if j == i + k else 0.0)
    bt = np.linalg.lstsq(np.asarray(equations), np.asarray(targets), rcond=None)[0].reshape(a, a)
    bt[np.abs(bt) < 1e-9] = 0.0
    for row in range(a):
        scale = np.abs(bt[row][bt[row] != 0]).min()
        bt[row] /= scale
        g[row] *= scale
    return at, g, np.round(bt)


_AT, _G, _BT = winograd_matrices()
# 2-D transforms as single matrices over the flattened tile: input (36 x 36), output (16 x 36).
_INPUT_TRANSFORM = np.einsum("ai,bj->abij", _BT, _BT).reshape(INPUT_TILE**2, INPUT_TILE**2).astype(np.float32)
_OUTPUT_TRANSFORM = np.einsum("ia,jb->ijab", _AT, _AT).reshape(OUTPUT_TILE**2, INPUT_TILE**2).astype(np.float32)


def transform_kernel(kernel: np.ndarray) -> np.ndarray:
    """[3, 3, C, K] (HWIO) kernel -> [36, C, K] float32 ``G g G^T`` per (input, output) channel pair, in float64."""
    if kernel.shape[:2] != (KERNEL_SIZE, KERNEL_SIZE):
        raise ValueError(f"expected a 3x3 kernel, got shape {kernel.shape}")
    transformed = np.einsum("ai,ijck,bj->abck", _G, kernel.astype(np.float64), _G, optimize=True)
    return transformed.reshape(INPUT_TILE**2, *kernel.shape[2:]).astype(np.float32)


def _overlapping_tiles(x: tf.Tensor, count: tf.Tensor, axis: int) -> tf.Tensor:
    """Split ``axis`` (length ``OUTPUT_TILE * count + 2``) into ``count`` overlapping windows of ``INPUT_TILE``
    starting every ``OUTPUT_TILE``: [..., L, ...] -> [..., count, INPUT_TILE, ...]."""
    m = OUTPUT_TILE
    shape = tf.shape(x)
    blocked = tf.concat([shape[:axis], [count, m], shape[axis + 1 :]], axis=0)
    head = tf.reshape(tf.gather(x, tf.range(m * count), axis=axis), blocked)
    tail = tf.reshape(tf.gather(x, tf.range(m, m * count + m), axis=axis), blocked)
    return tf.concat([head, tf.gather(tail, tf.range(INPUT_TILE - m), axis=axis + 1)], axis=axis + 1)


def _winograd_conv(x: tf.Tensor, transformed_kernel: tf.Tensor, bias: tf.Tensor, floor: tf.Tensor) -> tf.Tensor:
    """``max(conv(x) + bias, floor)``: ``floor`` 0 is the ReLU, -inf none (a runtime value, so that one compiled
    program serves both)."""
    shape = tf.shape(x)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    out_channels = tf.shape(transformed_kernel)[2]
    m, a = OUTPUT_TILE, INPUT_TILE
    tiles_h, tiles_w = (height + m - 1) // m, (width + m - 1) // m
    # SAME padding (1 on top/left) plus enough bottom/right to complete the last tiles.
    padded = tf.pad(x, [[0, 0], [1, m * tiles_h + 1 - height], [1, m * tiles_w + 1 - width], [0, 0]])
    # Input tile (ty, tx) is padded[m*ty : m*ty + 6, m*tx : m*tx + 6]: per axis, the m rows of block ty and the
    # first two of block ty + 1: reshapes of contiguous ranges (36 strided slices gave the same program but took XLA
    # 3x longer to compile).
    rows = _overlapping_tiles(padded, tiles_h, axis=1)  # [B, th, 6, W', C]
    windows = _overlapping_tiles(rows, tiles_w, axis=3)  # [B, th, 6, tw, 6, C]
    phases = tf.transpose(windows, [2, 4, 0, 1, 3, 5])  # [6, 6, B, th, tw, C]
    tiles = tf.matmul(_INPUT_TRANSFORM, tf.reshape(phases, [a * a, -1]))
    products = tf.matmul(tf.reshape(tiles, [a * a, -1, channels]), transformed_kernel)  # [36, tiles, K]
    out = tf.matmul(_OUTPUT_TRANSFORM, tf.reshape(products, [a * a, -1]))  # [16, tiles * K]
    out = tf.reshape(out, [m, m, batch, tiles_h, tiles_w, out_channels])
    out = tf.reshape(tf.transpose(out, [2, 3, 0, 4, 1, 5]), [batch, m * tiles_h, m * tiles_w, out_channels])
    return tf.maximum(out[:, :height, :width] + bias, floor)


# One image at a time, any size and channel count: XLA compiles once per concrete (H, W, C, K), whatever the batch
# size of the network call and whether a ReLU follows.
_compiled_conv = tf.function(
    _winograd_conv, jit_compile=True, reduce_retracing=True, autograph=False,
    input_signature=[tf.TensorSpec([1, None, None, None], tf.float32), tf.TensorSpec([INPUT_TILE**2, None, None]),
                     tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.float32)],
)


def _floor(relu: bool) -> tf.Tensor:
    return tf.constant(0.0 if relu else -np.inf, tf.float32)


@tf.function(
    autograph=False,
    input_signature=[tf.TensorSpec([None, None, None, None], tf.float32),
                     tf.TensorSpec([KERNEL_SIZE, KERNEL_SIZE, None, None], tf.float32),
                     tf.TensorSpec([INPUT_TILE**2, None, None], tf.float32), tf.TensorSpec([None], tf.float32),
                     tf.TensorSpec([], tf.float32), tf.TensorSpec([2], tf.int32)],
)
def _canvas_conv(x: tf.Tensor, kernel: tf.Tensor, transformed_kernel: tf.Tensor, bias: tf.Tensor, floor: tf.Tensor,
                 canvas_hw: tf.Tensor) -> tf.Tensor:
    """:func:`conv3x3`'s work, traced once for every layer and call: the network's Winograd layers share this one
    function instead of each building its own copy of the choice, the padding, the map over the images and the crop
    (which made tracing the float32 graph take about 1 s more)."""
    def winograd() -> tf.Tensor:
        height, width = tf.shape(x)[1], tf.shape(x)[2]
        padded = tf.pad(x, [[0, 0], [0, canvas_hw[0] - height], [0, canvas_hw[1] - width], [0, 0]])
        out = tf.map_fn(lambda image: _compiled_conv(image[None], transformed_kernel, bias, floor)[0], padded,
                        fn_output_signature=tf.TensorSpec([None, None, None], tf.float32))
        return out[:, :height, :width]

    def direct() -> tf.Tensor:
        return tf.maximum(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias), floor)

    return tf.cond(canvas_hw[0] > 0, winograd, direct)


def conv3x3(
    x: tf.Tensor, kernel: tf.Tensor, transformed_kernel: tf.Tensor, bias: tf.Tensor, relu: bool = False,
    canvas_hw: tf.Tensor | None = None,
) -> tf.Tensor:
    """SAME 3x3 stride-1 convolution + bias (+ ReLU) of float32 NHWC ``x`` [B, H, W, C] by ``kernel`` ([3, 3, C, K]),
    given also as :func:`transform_kernel` prepared it (``transformed_kernel``, [36, C, K]); returns [B, H, W, K].

    Each image runs in one XLA program compiled per input size. ``canvas_hw`` ((2,) int32, at least (H, W)): run
    every image zero-padded bottom/right to that size instead, and crop the result; the valid region's sums are
    the same (SAME padding reads zeros there too), and the programs compiled are those of the canvas sizes only.
    A canvas of (0, 0) runs the direct convolution of ``kernel`` instead (a size no canvas holds)."""
    if canvas_hw is None:
        canvas_hw = tf.shape(x)[1:3]
    out = _canvas_conv(x, kernel, transformed_kernel, bias, _floor(relu), canvas_hw)
    out.set_shape([*x.shape[:3], transformed_kernel.shape[-1]])
    return out


def compile_program(height: int, width: int, channels: int, out_channels: int) -> None:
    """Compile the program :func:`conv3x3` runs on [*, height, width, channels] maps to ``out_channels``, by running
    it once on zeros the way the network calls it: TensorFlow caches an XLA program per call path, and calling the
    compiled function directly (eagerly) would compile a copy that the network's calls do not use (measured)."""
    _canvas_conv(tf.zeros([1, height, width, channels]), tf.zeros([KERNEL_SIZE, KERNEL_SIZE, channels, out_channels]),
                 tf.zeros([INPUT_TILE**2, channels, out_channels]), tf.zeros([out_channels]), _floor(False),
                 tf.constant([height, width]))


# The mask head's RoI maps run in chunks of this many: one compiled program for any number of detections.
MASK_CHUNK = 16


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _relu_stack(x: tf.Tensor, transformed_kernels: list[tf.Tensor], biases: list[tf.Tensor]) -> tf.Tensor:
    floor = _floor(True)
    for kernel, bias in zip(transformed_kernels, biases, strict=True):
        x = _winograd_conv(x, kernel, bias, floor)
    return x


def conv3x3_relu_stack(x: tf.Tensor, transformed_kernels: list[tf.Tensor], biases: list[tf.Tensor]) -> tf.Tensor:
    """Several SAME 3x3 convolutions, each followed by bias and ReLU, in one XLA program: the mask head's
    ``[N, 14, 14, C]`` stack. It runs on chunks of :data:`MASK_CHUNK` maps (the last one zero-padded, its extra
    maps dropped), so it compiles once whatever N. Winograd saves less on 14x14 maps (4x4 tiles cover 16x16) but
    still ~15%."""
    count = tf.shape(x)[0]
    chunks = (count + MASK_CHUNK - 1) // MASK_CHUNK
    padded = tf.pad(x, [[0, chunks * MASK_CHUNK - count], [0, 0], [0, 0], [0, 0]])
    padded = tf.reshape(padded, [chunks, MASK_CHUNK, *x.shape[1:]])
    kernels, biases = list(transformed_kernels), list(biases)
    out_shape = [MASK_CHUNK, *x.shape[1:3], kernels[-1].shape[-1]]
    out = tf.map_fn(lambda chunk: _relu_stack(chunk, kernels, biases), padded,
                    fn_output_signature=tf.TensorSpec(out_shape, tf.float32))
    return tf.reshape(out, [-1, *out_shape[1:]])[:count]
