"""``maskrcnn-serving export``: the SavedModel reloads and gives the optimized backend's detections."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tensorflow as tf
from assertions import box_iou

from maskrcnn_serving import cli
from maskrcnn_serving.modeling.preprocess import resized_shape


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_model_dir):
    output = tmp_path_factory.mktemp("export") / "maskrcnn" / "1"
    assert cli.main(["export", "--model-dir", str(demo_model_dir), "--output", str(output)]) == 0
    assert (output / "saved_model.pb").is_file()
    return output, tf.saved_model.load(str(output))


def _valid(outputs, i):
    n = int(outputs["num_detections"][i])
    return {k: v[i, :n].numpy() for k, v in outputs.items() if k != "num_detections"}, n


def test_image_tensor_signature_matches_the_backend_exactly(exported, optimized_backend, example_images):
    """An image already at the model's input size skips the resize, so graph and backend see the same pixels."""
    _, model = exported
    bgr = cv2.imread(str(example_images[0]))
    bgr = cv2.resize(bgr, (320, 368), interpolation=cv2.INTER_LINEAR)
    cfg = optimized_backend.bundle.inference
    assert resized_shape(368, 320, cfg.short_edge_size, cfg.max_size) == (368, 320)
    expected = optimized_backend.predict([bgr])[0]
    outputs = model.signatures["detect_images"](images=tf.constant(np.stack([bgr[..., ::-1]] * 2)))
    assert outputs["boxes"].shape[1:] == (100, 4) and outputs["masks"].shape[1:] == (100, 28, 28)
    for i in range(2):
        got, n = _valid(outputs, i)
        assert n == len(expected) > 0
        np.testing.assert_allclose(got["boxes"], expected.boxes, atol=1e-3)
        np.testing.assert_allclose(got["scores"], expected.scores, atol=1e-5)
        np.testing.assert_array_equal(got["labels"], expected.labels)
        np.testing.assert_allclose(got["masks"], expected.mask_probs, atol=1e-4)
    assert np.all(outputs["scores"][0, len(expected) :].numpy() == 0)


def test_encoded_signature_agrees_with_the_backend(exported, optimized_backend, example_images):
    """Encoded JPEGs of different sizes in one call: the same decoded pixels; the in-graph resize differs from cv2's
    by at most one grey level (fixed-point rounding)."""
    output_dir, model = exported
    blobs = [p.read_bytes() for p in example_images]
    outputs = model.signatures["serving_default"](images=tf.constant(blobs))
    expected = optimized_backend.predict([cv2.imread(str(p)) for p in example_images])
    for i, dets in enumerate(expected):
        got, n = _valid(outputs, i)
        confident = dets.scores > 0.5
        assert confident.any()
        for box, label, probs in zip(dets.boxes[confident], dets.labels[confident], dets.mask_probs[confident],
                                     strict=True):
            ious = box_iou(box, got["boxes"])
            j = int(ious.argmax())
            assert ious[j] > 0.95 and got["labels"][j] == label
            assert np.abs(got["masks"][j] - probs).mean() < 0.02
    assert (output_dir / "assets.extra" / "maskrcnn_serving.json").is_file()


def test_export_refuses_to_overwrite(exported, demo_model_dir):
    output_dir, _ = exported
    with pytest.raises(SystemExit, match="already holds a SavedModel"):
        cli.main(["export", "--model-dir", str(demo_model_dir), "--output", str(output_dir)])


def test_in_graph_resize_shape_equals_the_backends():
    from maskrcnn_serving.modeling.saved_model import resized_shape_tf

    rng = np.random.default_rng(0)
    sizes = [(1, 1), (480, 640), (640, 480), (800, 1333), (3000, 4000), (5, 700), (700, 5), (320, 320)]
    sizes += [(2, 3000), (3000, 2)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(200)]
    for short_edge, max_size in ((800, 1344.0), (320, 576.0)):
        for h, w in sizes:
            got = tuple(resized_shape_tf(tf.constant([h, w]), float(short_edge), max_size).numpy().tolist())
            assert got == resized_shape(h, w, short_edge, max_size), (h, w)
