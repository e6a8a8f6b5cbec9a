"""Benchmarks: accounting of the model and HTTP benchmarks, the seed RLE baseline, and the paste speed fix."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest


def _random_paste_cases(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        image_hw = (int(rng.integers(40, 500)), int(rng.integers(40, 700)))
        x1, y1 = rng.uniform(-0.3, 1.0) * image_hw[1], rng.uniform(-0.3, 1.0) * image_hw[0]
        w, h = rng.uniform(0.2, 1.2) * image_hw[1], rng.uniform(0.2, 1.2) * image_hw[0]
        box = np.array([max(0, x1), max(0, y1), min(image_hw[1], x1 + w), min(image_hw[0], y1 + h)], np.float32)
        cases.append((box, rng.random((28, 28)).astype(np.float32), image_hw))
    return cases


def test_paste_on_one_blas_thread_gives_the_same_bits_as_threaded_blas(monkeypatch):
    """The paste runs its matrix products on one BLAS thread for speed; the masks must not change by one pixel."""
    from threadpoolctl import threadpool_limits

    from maskrcnn_serving.modeling import paste

    cases = _random_paste_cases(150)
    ours = [paste.paste_mask_patch(box, mask, hw, threshold=t) for box, mask, hw in cases for t in (0.3, 0.5, 0.7)]
    monkeypatch.setattr(paste, "_single_threaded_blas", contextlib.nullcontext)
    with threadpool_limits(limits=2, user_api="blas"):
        threaded = [
            paste.paste_mask_patch(box, mask, hw, threshold=t) for box, mask, hw in cases for t in (0.3, 0.5, 0.7)
        ]
    for (y0, x0, patch), (ry0, rx0, reference) in zip(ours, threaded, strict=True):
        assert (y0, x0) == (ry0, rx0)
        np.testing.assert_array_equal(patch, reference)

    # Underneath, the float products agree to rounding: OpenBLAS picks its kernel by thread count.
    rng = np.random.default_rng(1)
    wy = paste._interp_weights(np.arange(800) + 0.5, -10.3, 790.7, 30)
    wx = paste._interp_weights(np.arange(1067) + 0.5, 3.3, 1000.1, 30)
    padded = rng.random((30, 30))
    with threadpool_limits(limits=1, user_api="blas"):
        single = wy @ padded @ wx.T
    with threadpool_limits(limits=2, user_api="blas"):
        double = wy @ padded @ wx.T
    assert np.abs(single - double).max() < 1e-14


@pytest.mark.parametrize(
    ("mask", "counts"),
    [
        ([[0, 1, 1], [0, 0, 1]], [1, 2, 2, 1]),
        ([[0, 0, 0], [0, 0, 0]], [6]),
        ([[1, 1, 1], [1, 1, 1]], [0, 6]),
        ([[1, 0], [0, 0]], [0, 1, 3]),
    ],
)
def test_seed_encoder_matches_the_documented_examples(mask, counts):
    from maskrcnn_serving.bench.seed_rle import seed_binary_mask_to_rle

    array = np.array(mask, np.uint8)
    assert seed_binary_mask_to_rle(array) == {"counts": counts, "size": list(array.shape)}


def test_our_legacy_rle_equals_the_seed_groupby_encoder_on_random_masks():
    """Full-size masks (shapes and pure noise) and patches placed anywhere, clipped at the image edges."""
    from maskrcnn_serving.bench.images import synthetic_masks
    from maskrcnn_serving.bench.seed_rle import seed_binary_mask_to_rle
    from maskrcnn_serving.encoding import legacy_rle

    rng = np.random.default_rng(0)
    for mask in synthetic_masks(20, 48, 64, seed=3):
        assert legacy_rle(0, 0, mask, mask.shape) == seed_binary_mask_to_rle(mask)
    for _ in range(400):
        height, width = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        patch = (rng.random((int(rng.integers(0, 34)), int(rng.integers(0, 34)))) < rng.random()).astype(np.uint8)
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        full = np.zeros((height, width), np.uint8)
        visible = patch[: height - y0, : width - x0]
        full[y0 : y0 + visible.shape[0], x0 : x0 + visible.shape[1]] = visible
        assert legacy_rle(y0, x0, patch, (height, width)) == seed_binary_mask_to_rle(full)
