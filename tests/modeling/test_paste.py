"""The mask paste (docs/model-conventions.md#paste): accurate and fast, against per-pixel references."""

import contextlib

import numpy as np
import pytest

from maskrcnn_serving.modeling.paste import paste_mask_patch, paste_masks


# --- mask paste ---------------------------------------------------------------------------------------------------
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


def test_one_blas_thread_holds_while_any_thread_is_still_pasting():
    """Threads paste at once (the pipeline's annotation workers, the server's request threads): BLAS stays on one
    thread until the last of them is done, then gets its own setting back."""
    import threading

    from threadpoolctl import threadpool_info, threadpool_limits

    from maskrcnn_serving.modeling import paste

    def blas_threads() -> set[int]:  # numpy's BLAS (OpenCV brings an OpenBLAS of its own, fixed at one thread)
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"
                and "numpy" in lib["filepath"]}

    with threadpool_limits(limits=2, user_api="blas"):
        if blas_threads() != {2}:
            pytest.skip("this numpy's BLAS cannot be set to 2 threads")
        both_inside, first_left = threading.Barrier(2), threading.Event()
        seen = {}

        def first():
            with paste._single_threaded_blas():
                both_inside.wait()
            first_left.set()

        def second():
            with paste._single_threaded_blas():
                both_inside.wait()
                first_left.wait(5)
                seen["after the first left"] = blas_threads()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert seen["after the first left"] == {1}
        assert blas_threads() == {2}


def test_the_paste_in_bands_of_rows_gives_the_mask_of_the_whole_box(monkeypatch):
    """The accurate paste makes its float values a band of rows at a time (bounded memory for a photo-sized box):
    the same pixels as one product over the whole box, with bands of one row, a few rows, and one band."""
    from maskrcnn_serving.modeling import paste

    cases = _random_paste_cases(60, seed=3)
    monkeypatch.setattr(paste, "PASTE_CHUNK_VALUES", 1 << 40)
    whole = [paste.paste_mask_patch(box, mask, hw) for box, mask, hw in cases]
    assert max(patch.size for _, _, patch in whole) > 50_000
    for band_values in (1, 1000, 4096):
        monkeypatch.setattr(paste, "PASTE_CHUNK_VALUES", band_values)
        for (box, mask, hw), (y0, x0, expected) in zip(cases, whole, strict=True):
            got_y0, got_x0, got = paste.paste_mask_patch(box, mask, hw)
            assert (got_y0, got_x0) == (y0, x0) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, expected)
