"""The mask paste (docs/model-conventions.md#paste): accurate and fast, against per-pixel references."""

import numpy as np
import pytest

from maskrcnn_serving.modeling.paste import paste_mask, paste_masks
from maskrcnn_serving.structures import MaskRuns


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
    runs = paste_mask(np.array([5.0, 5.0, 5.0, 9.0]), np.ones((28, 28)), (20, 20))
    assert runs.area == 0 and runs.patch().size == 0


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


def pixel_knots(box, hw):
    """Each pixel row's and column's knot interval and weight, as the spec places them: ``((row_segment, row_t),
    (column_segment, column_t))``, t the weight of the interval's upper knot and NaN outside the knots."""
    x1, y1, x2, y2 = (float(v) for v in box)  # as the paste reads a float32 box: its grown box is float64 arithmetic
    cx, cy = (x1 + x2) * 0.5, (y1 + y2) * 0.5
    half_w, half_h = (x2 - x1) * 0.5 * 30 / 28, (y2 - y1) * 0.5 * 30 / 28

    def segments(lo, hi, size):
        position = (np.arange(size) + 0.5 - lo) / (hi - lo) * 30 - 0.5
        inside = (position >= 0) & (position <= 29)
        segment = np.minimum(np.floor(np.where(inside, position, 0)).astype(int), 28)
        return segment, np.where(inside, position - segment, np.nan)

    return segments(cy - half_h, cy + half_h, hw[0]), segments(cx - half_w, cx + half_w, hw[1])


def per_pixel_product(box, mask, hw, threshold):
    """The paste as one float64 value per pixel of the image (the weights of both axes times the padded mask, the
    implementation before the runs): a vectorized reference for photo-sized boxes."""
    padded = np.pad(mask.astype(np.float64), 1)

    def weights(segment, t):
        w = np.zeros((len(segment), 30))
        w[np.arange(len(segment)), segment] = np.nan_to_num(1 - t)
        w[np.arange(len(segment)), segment + 1] = np.nan_to_num(t)
        return w

    rows, columns = pixel_knots(box, hw)
    values = weights(*rows) @ padded @ weights(*columns).T
    return (values >= threshold).astype(np.uint8)


def test_runs_of_photo_sized_boxes_are_the_per_pixel_values_thresholded():
    """Boxes up to a 12-megapixel photo, smooth network-like masks and noise, three thresholds: the runs found from
    the knot values set the pixels the per-pixel product sets, and MaskRuns' invariants hold."""
    rng = np.random.default_rng(5)
    hw = (3024, 4032)
    yy, xx = np.mgrid[0:28, 0:28]
    for case in range(6):
        size = rng.uniform(0.05, 1.0, 2) * hw[::-1]
        x1, y1 = rng.uniform(0, 1, 2) * (np.array(hw[::-1]) - size)
        box = np.array([x1, y1, x1 + size[0], y1 + size[1]], np.float32)
        if case % 2:
            mask = rng.random((28, 28)).astype(np.float32)
        else:
            mask = (1 / (1 + np.exp(np.hypot(yy - 14, xx - 14) - rng.uniform(5, 12)))).astype(np.float32)
        for threshold in (0.3, 0.5, 0.7):
            runs = paste_mask(box, mask, hw, threshold)
            full = np.zeros(hw, np.uint8)
            full[runs.y0 : runs.y0 + runs.height, runs.x0 : runs.x0 + runs.width] = runs.patch()
            np.testing.assert_array_equal(full, per_pixel_product(box, mask, hw, threshold))
            assert_valid_runs(runs)


def assert_valid_runs(runs: MaskRuns) -> None:
    assert 0 <= runs.y0 and runs.y0 + runs.height <= runs.image_hw[0]
    assert 0 <= runs.x0 and runs.x0 + runs.width <= runs.image_hw[1]
    assert np.all(runs.starts < runs.ends) and np.all(runs.starts >= 0) and np.all(runs.ends <= runs.width)
    assert np.all((runs.rows >= 0) & (runs.rows < runs.height))
    same_row = runs.rows[1:] == runs.rows[:-1]
    assert np.all(np.diff(runs.rows) >= 0) and np.all(runs.ends[:-1][same_row] <= runs.starts[1:][same_row])


def test_runs_of_random_boxes_and_thresholds_are_the_per_pixel_reference():
    """Boxes from sub-pixel to larger than the image, overhanging its edges, random masks: every pixel as the
    per-pixel transcription of the spec decides it (the product of the two knots' weights and values)."""
    for box, mask, hw in _random_paste_cases(40, seed=4)[:40]:
        small_hw = (min(hw[0], 120), min(hw[1], 160))
        box = np.minimum(box * 0.25, [small_hw[1], small_hw[0], small_hw[1], small_hw[0]])
        for threshold in (0.3, 0.5, 0.7):
            got = paste_masks(box[None], mask[None], small_hw, threshold)[0]
            np.testing.assert_array_equal(got, reference_accurate_paste(box, mask, small_hw, threshold))


def test_threshold_must_be_positive_and_nan_probabilities_set_nothing():
    box = np.array([3.0, 4.0, 90.0, 70.0])
    with pytest.raises(ValueError, match="> 0"):
        paste_mask(box, np.ones((28, 28), np.float32), (80, 100), threshold=0.0)
    assert paste_mask(box, np.full((28, 28), np.nan, np.float32), (80, 100)).area == 0
    partly = np.ones((28, 28), np.float32)
    partly[5:9, 3:20] = np.nan
    runs = paste_mask(box, partly, (80, 100))
    assert_valid_runs(runs)
    assert 0 < runs.area < paste_mask(box, np.ones((28, 28), np.float32), (80, 100)).area


def test_mask_runs_round_trip_through_their_pixels():
    rng = np.random.default_rng(2)
    for _ in range(300):
        hw = (int(rng.integers(1, 20)), int(rng.integers(1, 20)))
        patch = (rng.random((int(rng.integers(0, 22)), int(rng.integers(0, 22)))) < rng.random()).astype(np.uint8)
        y0, x0 = int(rng.integers(0, hw[0])), int(rng.integers(0, hw[1]))
        runs = MaskRuns.from_patch(y0, x0, patch, hw)
        assert_valid_runs(runs)
        visible = patch[: hw[0] - y0, : hw[1] - x0]
        if visible.size:
            np.testing.assert_array_equal(runs.patch(), visible)
        assert runs.area == int(visible.sum())
        transposed = runs.transposed()
        assert transposed.image_hw == hw[::-1] and (transposed.y0, transposed.x0) == (runs.x0, runs.y0)
        if visible.size:
            np.testing.assert_array_equal(transposed.patch(), visible.T)
    # Runs that touch are set pixels all the same.
    touching = MaskRuns(1, 2, 2, 6, (4, 9), np.array([0, 0, 1]), np.array([0, 3, 1]), np.array([3, 5, 2]))
    assert touching.patch().tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]


def two_stage_values(box, mask, hw):
    """Every pixel's value computed as the paste computes the values it checks: each row's values at the knot
    columns (two knot rows and their weights), then two of those and the column's weights; 0 outside the knots."""
    (row_segment, row_t), (column_segment, column_t) = pixel_knots(box, hw)
    padded = np.pad(mask.astype(np.float64), 1)
    row_t = row_t[:, None]
    knot_values = np.nan_to_num(padded[row_segment] * (1 - row_t) + padded[row_segment + 1] * row_t)
    values = knot_values[:, column_segment] * (1 - column_t) + knot_values[:, column_segment + 1] * column_t
    return np.nan_to_num(values)


def test_a_pixel_on_the_threshold_is_decided_by_its_own_value():
    """Masks of a few levels, boxes 28 x k pixels and thresholds at those levels put pixel values exactly on the
    threshold, or one rounding away from it. A run end solved from the knots can land a pixel off there; the paste
    checks the pixels beside each end against their own values, so every pixel is what its value says."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        hw = (int(rng.integers(5, 120)), int(rng.integers(5, 120)))
        levels = int(rng.choice([2, 4, 8, 10]))
        mask = (rng.integers(0, levels + 1, (28, 28)) / levels).astype(np.float32)
        scale = rng.choice([0.5, 1, 2, 3, 7, 28 / 30, 2.5])
        x1, y1 = (int(v) for v in rng.integers(0, 40, 2))
        box = np.array([x1, y1, x1 + 28 * scale, y1 + 28 * scale * rng.choice([1, 2])], np.float32)
        box = np.minimum(box, [hw[1], hw[0], hw[1], hw[0]])
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        threshold = float(rng.integers(1, levels + 1) / levels)
        got = paste_masks(box[None], mask[None], hw, threshold)[0]
        np.testing.assert_array_equal(got, (two_stage_values(box, mask, hw) >= threshold).astype(np.uint8))
