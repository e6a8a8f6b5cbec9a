"""The tensorpack backend end to end: demo model, random R101 weights, fc6 row orders, options, eval."""


import cv2
import numpy as np
import pytest
from checkpoint_factory import R101_BLOCKS, fc6_row_order_model_dirs

from maskrcnn_serving.backends.base import PredictOptions, load_backend
from maskrcnn_serving.model_dir import load_model_dir
from maskrcnn_serving.postprocess import full_masks


def read(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR)


def test_demo_model_detects_shapes(tensorpack_backend, example_images):
    images = [read(p) for p in example_images]
    results = tensorpack_backend.predict(images)
    assert len(results) == len(images)
    for image, dets in zip(images, results, strict=True):
        h, w = image.shape[:2]
        assert len(dets) > 0 and dets.image_hw == (h, w)
        assert np.all(np.diff(dets.scores) <= 0) and np.all(dets.scores > 0.05)
        assert np.all(dets.boxes[:, :2] >= 0) and np.all(dets.boxes[:, 2] <= w) and np.all(dets.boxes[:, 3] <= h)
        assert set(dets.labels.tolist()) <= {1, 2, 3, 4}
        masks = full_masks(dets)
        assert masks.shape == (len(dets), h, w) and masks.dtype == np.uint8
        confident = dets.scores > 0.9
        assert masks[confident].reshape(int(confident.sum()), -1).sum(axis=1).min() > 50
        assert dets.names[0] in ("circle", "rectangle", "triangle", "ring")


def test_options_force_a_fixed_number_of_detections(tensorpack_backend, example_images):
    image = read(example_images[0])
    dets = tensorpack_backend.predict([image], PredictOptions(score_threshold=0.0, max_detections=37))[0]
    assert len(dets) == 37
    strict = tensorpack_backend.predict([image], PredictOptions(score_threshold=0.9))[0]
    assert np.all(strict.scores > 0.9)
    default = tensorpack_backend.predict([image])[0]
    np.testing.assert_allclose(default.scores[: len(strict)], strict.scores)


def test_forward_takes_one_image_and_closes(tensorpack_backend, demo_model_dir):
    image = tensorpack_backend.preprocess(np.zeros((40, 50, 3), np.uint8))
    assert tensorpack_backend.max_batch_size == 1 and image.resized.shape == (320, 400, 3)
    with pytest.raises(ValueError, match="one image per call"):
        tensorpack_backend.forward([image, image], PredictOptions())
    other = load_backend("tensorpack", demo_model_dir, environ={})
    other.close()
    with pytest.raises(RuntimeError):  # the session is gone
        other.forward([image], PredictOptions())


def test_tiny_and_extreme_images(tensorpack_backend):
    for shape in ((1, 1, 3), (8, 900, 3), (700, 5, 3)):
        dets = tensorpack_backend.predict([np.full(shape, 127, np.uint8)])[0]
        assert dets.image_hw == shape[:2]
        assert full_masks(dets).shape == (len(dets), *shape[:2])


@pytest.fixture(scope="module")
def random_model_dirs(tmp_path_factory):
    """The same random small model stored with channel-first fc6 rows (npz) and channel-last rows (TF ckpt)."""
    return fc6_row_order_model_dirs(tmp_path_factory.mktemp("fc6_first"), tmp_path_factory.mktemp("fc6_last"), seed=3,
                                    step=10)


def test_fc6_row_orders_give_the_same_model(random_model_dirs):
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    options = PredictOptions(score_threshold=0.0, max_detections=20)
    first, last = (load_backend("tensorpack", d, environ={}) for d in random_model_dirs)
    a, b = first.predict([image], options)[0], last.predict([image], options)[0]
    assert len(a) == 20
    np.testing.assert_allclose(a.boxes, b.boxes, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_r101_checkpoint_builds_and_runs(r101_model_dirs, r101_tensorpack_backend):
    bundle = load_model_dir(r101_model_dirs[0], environ={"RESNET_ARCH": "resnet101"})
    assert bundle.architecture.resnet_num_blocks == R101_BLOCKS
    backend = r101_tensorpack_backend  # the same files, built once per session
    assert len(backend.bundle.weights) == len(bundle.weights) == 562  # every variable of tensorpack's R101-FPN graph
    dets = backend.predict([np.zeros((64, 80, 3), np.uint8)], PredictOptions(score_threshold=0.0, max_detections=5))[0]
    assert len(dets) == 5 and full_masks(dets).shape == (5, 64, 80)


def test_eval_on_demo_fixture_reaches_the_reference(tensorpack_val_report):
    """Acceptance: within 0.005 AP of tensorpack's own example (0.868 bbox / 0.888 segm) on val_public."""
    report = tensorpack_val_report
    assert report["images"] == 200
    assert report["bbox"]["AP"] >= 0.863, report
    assert report["segm"]["AP"] >= 0.883, report
