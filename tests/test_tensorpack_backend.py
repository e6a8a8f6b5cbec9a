"""The tensorpack backend end to end: demo model, random R101 weights, fc6 row orders, options, eval, CLI."""

import json

import cv2
import numpy as np
import pytest
from checkpoint_factory import R101_BLOCKS, random_weights, small_architecture, write_npz, write_tf_checkpoint

from maskrcnn_serving import cli
from maskrcnn_serving.backends.base import PredictOptions, load_backend
from maskrcnn_serving.backends.tensorpack_backend import TensorpackBackend
from maskrcnn_serving.evaluation import evaluate
from maskrcnn_serving.model_dir import load_model_dir


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
        masks = dets.masks()
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


def test_tiny_and_extreme_images(tensorpack_backend):
    for shape in ((1, 1, 3), (8, 900, 3), (700, 5, 3)):
        dets = tensorpack_backend.predict([np.full(shape, 127, np.uint8)])[0]
        assert dets.image_hw == shape[:2]
        assert dets.masks().shape == (len(dets), *shape[:2])


@pytest.fixture(scope="module")
def random_model_dirs(tmp_path_factory):
    """The same random small model stored with channel-first fc6 rows (npz) and channel-last rows (TF ckpt)."""
    arch = small_architecture(classes=3)
    weights = random_weights(arch, seed=3)
    # Make the RPN and box head confident so the random model produces detections.
    weights["fastrcnn/outputs/class/b"] = np.array([-3.0, 2.0, 1.0, 0.5], np.float32)
    first = tmp_path_factory.mktemp("fc6_first")
    write_npz(first / "model.npz", weights)
    last = tmp_path_factory.mktemp("fc6_last")
    fc6 = weights["fastrcnn/fc6/W"]
    channel_last = fc6.reshape(16, 7, 7, -1).transpose(1, 2, 0, 3).reshape(fc6.shape)
    write_tf_checkpoint(last, {**weights, "fastrcnn/fc6/W": channel_last}, step=10)
    (last / "config.json").write_text(json.dumps({"SERVING.FC6_ROW_ORDER": "channel_last"}))
    return first, last


def test_fc6_row_orders_give_the_same_model(random_model_dirs):
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    options = PredictOptions(score_threshold=0.0, max_detections=20)
    first, last = (load_backend("tensorpack", d, environ={}) for d in random_model_dirs)
    a, b = first.predict([image], options)[0], last.predict([image], options)[0]
    assert len(a) == 20
    np.testing.assert_allclose(a.boxes, b.boxes, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_r101_checkpoint_builds_and_runs(tmp_path):
    arch = small_architecture(blocks=R101_BLOCKS, classes=2)
    write_npz(tmp_path / "model.npz", random_weights(arch, seed=1))
    bundle = load_model_dir(tmp_path, environ={"RESNET_ARCH": "resnet101"})
    backend = TensorpackBackend.from_bundle(bundle)
    assert len(bundle.weights) == 562  # every variable of tensorpack's R101-FPN graph, loaded by name
    dets = backend.predict([np.zeros((64, 80, 3), np.uint8)], PredictOptions(score_threshold=0.0, max_detections=5))[0]
    assert len(dets) == 5 and dets.masks().shape == (5, 64, 80)


def test_eval_on_demo_fixture_reaches_the_reference(tensorpack_backend, fixtures_dir):
    """Acceptance: within 0.005 AP of tensorpack's own example (0.868 bbox / 0.888 segm) on val_public."""
    val = fixtures_dir / "val_public"
    report = evaluate(tensorpack_backend, val / "annotations.json", val / "images", progress=False)
    assert report["images"] == 200
    assert report["bbox"]["AP"] >= 0.863, report
    assert report["segm"]["AP"] >= 0.883, report


@pytest.fixture
def cli_uses_session_backend(monkeypatch, tensorpack_backend):
    """The CLI commands load their model through load_backend; hand them the session's instead of a second copy."""
    import maskrcnn_serving.backends.base as base

    monkeypatch.setattr(base, "load_backend", lambda name, model_dir=None, **kw: tensorpack_backend)


def test_cli_predict_writes_coco_results(cli_uses_session_backend, demo_model_dir, example_images, tmp_path):
    output = tmp_path / "results.json"
    assert cli.main(["predict", "--model-dir", str(demo_model_dir), str(example_images[0].parent),
                     "--output", str(output)]) == 0
    records = json.loads(output.read_text())
    assert {r["image_id"] for r in records} == {str(p) for p in example_images}
    from pycocotools import mask as mask_utils

    first = records[0]
    assert isinstance(first["segmentation"]["counts"], str)
    assert mask_utils.decode(first["segmentation"]).shape == tuple(first["segmentation"]["size"])
    assert len(first["bbox"]) == 4 and 0 < first["score"] <= 1


def test_cli_eval_prints_json_summary_last(cli_uses_session_backend, demo_model_dir, fixtures_dir, capsys):
    val = fixtures_dir / "val_public"
    assert cli.main(["eval", "--model-dir", str(demo_model_dir), "--annotations", str(val / "annotations.json"),
                     "--images", str(val / "images"), "--limit", "5"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"bbox", "segm", "images", "seconds"}
    assert summary["images"] == 5 and set(summary["segm"]) == {"AP", "AP50", "AP75"}


def test_cli_reports_load_errors(tmp_path, example_images, capsys):
    args = ["predict", "--model-dir", str(tmp_path), str(example_images[0]), "--output", str(tmp_path / "o.json")]
    code = cli.main(args)
    assert code == 2
    assert "No checkpoint in" in capsys.readouterr().err


def test_cli_inspect_summarizes_the_model_dir(demo_model_dir, capsys):
    assert cli.main(["inspect", "--model-dir", str(demo_model_dir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resnet_num_blocks"] == [1, 1, 1, 1]
    assert summary["class_names"] == ["circle", "rectangle", "triangle", "ring"]
    assert summary["parameters"] == 9_506_604  # the fixture README's count
    assert summary["resize"] == {"short_edge": 320, "max_size": 576.0}
