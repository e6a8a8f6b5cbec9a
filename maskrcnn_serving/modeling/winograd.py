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

XLA compiles once per input shape (batch, height, width, channels); the compiled program takes the kernel as an
argument, so every layer of one shape shares it. Frames: NHWC, SAME padding (one zero row/column on each side).
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
    transformed = np.einsum("ai,ijck,bj->abck", _G, kernel.astype(np.float64), _G)
    return transformed.reshape(INPUT_TILE**2, *kernel.shape[2:]).astype(np.float32)


def _winograd_conv(x: tf.Tensor, transformed_kernel: tf.Tensor, bias: tf.Tensor, relu: bool) -> tf.Tensor:
    shape = tf.shape(x)
    batch, height, width = shape[0], shape[1], shape[2]
    channels, out_channels = x.shape[-1], transformed_kernel.shape[-1]
    m, a = OUTPUT_TILE, INPUT_TILE
    tiles_h, tiles_w = (height + m - 1) // m, (width + m - 1) // m
    # SAME padding (1 on top/left) plus enough bottom/right to complete the last tiles.
    padded = tf.pad(x, [[0, 0], [1, m * tiles_h + 1 - height], [1, m * tiles_w + 1 - width], [0, 0]])
    # Input tile (ty, tx) is padded[m*ty : m*ty + 6, m*tx : m*tx + 6]; its element (i, j) is phase slice (i, j).
    phases = tf.stack(
        [padded[:, i : i + m * tiles_h : m, j : j + m * tiles_w : m] for i in range(a) for j in range(a)]
    )
    tiles = tf.matmul(_INPUT_TRANSFORM, tf.reshape(phases, [a * a, -1]))
    products = tf.matmul(tf.reshape(tiles, [a * a, -1, channels]), transformed_kernel)  # [36, tiles, K]
    out = tf.matmul(_OUTPUT_TRANSFORM, tf.reshape(products, [a * a, -1]))  # [16, tiles * K]
    out = tf.reshape(out, [m, m, batch, tiles_h, tiles_w, out_channels])
    out = tf.reshape(tf.transpose(out, [2, 3, 0, 4, 1, 5]), [batch, m * tiles_h, m * tiles_w, out_channels])
    out = out[:, :height, :width] + bias
    return tf.nn.relu(out) if relu else out


_compiled = {
    relu: tf.function(lambda x, u, b, relu=relu: _winograd_conv(x, u, b, relu), jit_compile=True)
    for relu in (False, True)
}


def conv3x3(x: tf.Tensor, transformed_kernel: tf.Tensor, bias: tf.Tensor, relu: bool = False) -> tf.Tensor:
    """SAME 3x3 stride-1 convolution + bias (+ ReLU) of float32 NHWC ``x`` [B, H, W, C] with a kernel prepared by
    :func:`transform_kernel` ([36, C, K]); returns [B, H, W, K]. One XLA program per input shape."""
    return _compiled[relu](x, transformed_kernel, bias)


@tf.function(jit_compile=True)
def _relu_stack(x: tf.Tensor, transformed_kernels: list[tf.Tensor], biases: list[tf.Tensor]) -> tf.Tensor:
    for kernel, bias in zip(transformed_kernels, biases, strict=True):
        x = _winograd_conv(x, kernel, bias, relu=True)
    return x


def padded_count(count: tf.Tensor) -> tf.Tensor:
    """The batch size a stack of ``count`` small maps is padded to, so that XLA compiles a few shapes rather than
    one per count: a multiple of 8 up to 128 (at most 7 maps of waste), of 32 beyond; at least 8."""
    step = tf.where(count > 128, 32, 8)
    return tf.maximum((count + step - 1) // step * step, 8)


def conv3x3_relu_stack(x: tf.Tensor, transformed_kernels: list[tf.Tensor], biases: list[tf.Tensor]) -> tf.Tensor:
    """Several SAME 3x3 convolutions, each followed by bias and ReLU, in one XLA program: the mask head's
    ``[N, 14, 14, C]`` stack. ``x`` is zero-padded along N to :func:`padded_count` (the extra maps are dropped), so
    it compiles once per padded count. Winograd saves less on 14x14 maps (4x4 tiles cover 16x16) but still ~15%."""
    count = tf.shape(x)[0]
    padded = tf.pad(x, [[0, padded_count(count) - count], [0, 0], [0, 0], [0, 0]])
    return _relu_stack(padded, list(transformed_kernels), list(biases))[:count]
