"""The optimized backend: same detections as the tensorpack backend, batch/bucket invariance, fc6 row orders,
Winograd, precision settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf
from assertions import assert_same_detections, box_iou

from maskrcnn_serving.backends import optimized
from maskrcnn_serving.backends.base import PredictOptions, load_backend
from maskrcnn_serving.backends.optimized import (
    OptimizedBackend,
    masks_bucket_padding,
    resolve_precision,
    resolve_winograd,
    winograd_canvases,
)
from maskrcnn_serving.evaluation import evaluate
from maskrcnn_serving.model_dir import load_model_dir
from maskrcnn_serving.modeling.tf2_network import MaskRCNN
from maskrcnn_serving.pipeline import Pipeline
from maskrcnn_serving.postprocess import full_masks
from maskrcnn_serving.settings import Settings

ALL = PredictOptions(score_threshold=0.0, max_detections=30)
DEMO = Path(__file__).resolve().parents[2] / "model" / "demo"


def read(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR)


def test_matches_tensorpack_on_the_example_images(optimized_backend, tensorpack_backend, example_images, run_batched):
    images = [read(p) for p in example_images]
    expected = tensorpack_backend.predict(images)
    actual, stats = run_batched(optimized_backend, images + images)  # several images per call
    assert stats.largest_batch > 1
    actual = actual[len(images) :]
    for a, b in zip(expected, actual, strict=True):
        assert len(a) > 0
        assert_same_detections(a, b)


def test_forced_detection_count_matches_tensorpack(optimized_backend, tensorpack_backend, example_images):
    image = read(example_images[1])
    expected = tensorpack_backend.predict([image], ALL)[0]
    actual = optimized_backend.predict([image], ALL)[0]
    assert len(actual) == 30
    assert_same_detections(expected, actual, box_atol=0.1, min_mask_iou=0.95)


@pytest.fixture(scope="module")
def coarse_bucket_backend(demo_model_dir):
    """Buckets of 128: images of different sizes share calls, so the network masks the padding."""
    backend = OptimizedBackend.from_bundle(load_model_dir(demo_model_dir, environ={}),
                                           Settings(precision="float32", bucket_step=128, max_batch_size=4))
    assert backend.network.masked_padding
    return backend


def test_results_do_not_depend_on_batch_or_padding(optimized_backend, coarse_bucket_backend, example_images,
                                                    run_batched):
    """Images padded into a larger shared bucket give exactly their batch-1 answers (the padding is masked)."""
    assert not optimized_backend.network.masked_padding  # buckets of 32: every image pads as in tensorpack
    # 368x320 and 320x352 after the resize: different buckets of 32, one bucket of 128 (384x384).
    first, second = read(example_images[0]), read(example_images[2])[:300, :330]
    alone = [optimized_backend.predict([img], ALL)[0] for img in (first, second)]
    assert {coarse_bucket_backend.preprocess(image).batch_key for image in (first, second)} == {(384, 384)}
    for backend, largest in ((optimized_backend, 2), (coarse_bucket_backend, 3)):
        together, stats = run_batched(backend, [first, second, first], ALL)
        assert stats.largest_batch == largest  # buckets of 128: both sizes share one call
        for a, b in zip(alone + alone[:1], together, strict=True):
            assert_same_detections(a, b, box_atol=1e-3, min_mask_iou=0.999)

    # Run the raw graph with both images in one bucket much larger than either.
    backend = coarse_bucket_backend
    resized = [backend.preprocess(img).resized for img in (first, second)]
    batch = np.zeros((2, 448, 640, 3), np.uint8)
    for i, r in enumerate(resized):
        batch[i, : r.shape[0], : r.shape[1]] = r
    hw = np.asarray([r.shape[:2] for r in resized], np.int32)
    direct = tf.zeros([2], tf.int32)  # no Winograd canvas
    out = backend.detect_function()(
        tf.constant(batch), tf.constant(hw), tf.constant(0.0), tf.constant(30), direct
    )
    counts = out["counts"].numpy()
    assert counts.tolist() == [len(alone[0]), len(alone[1])]
    single = backend.detect_function()(
        tf.constant(batch[1:, : -(-hw[1, 0] // 32) * 32, : -(-hw[1, 1] // 32) * 32]), tf.constant(hw[1:]),
        tf.constant(0.0), tf.constant(30), direct,
    )
    np.testing.assert_allclose(out["boxes"].numpy()[counts[0] :], single["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(out["masks"].numpy()[counts[0] :], single["masks"].numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def winograd_backend(demo_model_dir):
    """The demo model with EVERY 3x3 stride-1 convolution at strides 4-16 run by Winograd (by default only those
    with >= 128 input channels are, and the demo model's are narrower), in buckets of 128 with the padding masked:
    each Winograd convolution is an XLA program compiled per input shape, and val_public's 200 sizes fall into 4
    buckets of 128 (14 of 32), which halves the time of the eval below."""
    bundle = load_model_dir(demo_model_dir, environ={})
    settings = Settings(max_batch_size=4, bucket_step=128)
    network = MaskRCNN(bundle, winograd=True, winograd_min_channels=1,
                       masked_padding=masks_bucket_padding(settings.bucket_step))
    assert network.masked_padding
    return OptimizedBackend(bundle, network, settings, "float32")


def test_winograd_network_matches_the_direct_one(winograd_backend, optimized_backend, example_images):
    transformed = {name[: -len("/U")] for name in winograd_backend.network.params if name.endswith("/U")}
    expected = {"rpn/conv0", "fpn/posthoc_3x3_p2", "fpn/posthoc_3x3_p4", "group0/block0/conv2", "maskrcnn/fcn3"}
    assert expected <= transformed
    assert "fpn/posthoc_3x3_p5" not in transformed and "group1/block0/conv2" not in transformed  # stride 32 / 2
    assert not any(name.endswith("/U") for name in optimized_backend.network.params)  # the demo's are < 128 wide
    images = [read(p) for p in example_images]
    for a, b in zip(optimized_backend.predict(images, ALL), winograd_backend.predict(images, ALL), strict=True):
        assert_same_detections(a, b, box_atol=0.02, min_mask_iou=0.99)


def test_no_trace_or_compilation_after_warm_up(demo_model_dir, tmp_path):
    """After ``warm_up``, images of sizes and batch sizes never seen run without tracing the graph again and
    without compiling an XLA program: every Winograd convolution runs at one of the canvases compiled while warming
    up. Counted in a child process whose XLA persistent cache writes one file per compilation."""
    cache = tmp_path / "xla"
    cache.mkdir()
    env = {**os.environ, "TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={cache}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    script = Path(__file__).with_name("no_compile_after_warm_up.py")
    done = subprocess.run([sys.executable, str(script), str(demo_model_dir), str(cache)], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    canvases = {tuple(c) for c in report["canvases"]}
    assert len(canvases) == 5 and len({tuple(b) for b in report["buckets"]} - canvases) >= 5  # new sizes
    warm = report["after_warm_up"]
    assert warm["traces"] == 2  # with and without the search vectors, for every batch size
    assert warm["compilations"] >= len(canvases) + 1  # each canvas's convolutions, and the mask head's chunk
    assert report["after_requests"] == warm


def test_graphs_are_traced_without_autograph(demo_model_dir, tmp_path, monkeypatch):
    """The network builds its loops and conditions with tf.while_loop / tf.cond itself, so its tf.functions turn
    autograph off: autograph's source conversion was most of the trace time (R50 bfloat16: 3.0 s against 0.9 s),
    and it writes each converted function as a Python file to the temporary folder, which is how this test sees it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bundle = load_model_dir(demo_model_dir, environ={})
    network = MaskRCNN(bundle, winograd=True, winograd_min_channels=1)
    backend = OptimizedBackend(bundle, network, Settings(), "float32")
    for with_embeddings in (False, True):
        backend.detect_function(with_embeddings)
    assert backend.traces == 2
    assert not list(tmp_path.glob("__autograph_generated*"))


def test_winograd_canvases_hold_every_resized_image():
    """Every image the test resize can make, bucketed, fits a canvas; per orientation the canvases are square,
    4:3 (a 4:3 photo runs unpadded) and the longest."""
    from maskrcnn_serving.modeling.preprocess import resized_shape

    canvases = winograd_canvases(800, 1344.0, 32)
    assert canvases == ((800, 800), (800, 1088), (1088, 800), (800, 1344), (1344, 800))
    step = 32
    for height, width in [(480, 640), (3024, 4032), (1080, 1920), (1, 5000), (5000, 3), (999, 1000), (1170, 2532)]:
        h, w = resized_shape(height, width, 800, 1344.0)
        bucket = (-(-h // step) * step, -(-w // step) * step)
        assert any(c[0] >= bucket[0] and c[1] >= bucket[1] for c in canvases), (height, width, bucket)
    assert winograd_canvases(800, 1344.0, 32)[1] == (800, -(-1067 // 32) * 32)  # 640x480 -> 800x1067 -> 1088
    assert winograd_canvases(320, 576.0, 128) == ((384, 384), (384, 512), (512, 384), (384, 640), (640, 384))


def test_winograd_defaults_and_validation():
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    assert resolve_winograd("auto", "float32") is not has_gpu
    assert resolve_winograd("auto", "bfloat16") is False
    assert resolve_winograd("off", "float32") is False
    with pytest.raises(ValueError):
        resolve_winograd("on", "bfloat16")
    assert Settings.from_env({"MASKRCNN_WINOGRAD": "0"}).winograd == "off"
    assert Settings.from_env({}, winograd="on").winograd == "on"
    with pytest.raises(ValueError):
        Settings(winograd="sometimes")
    with pytest.raises(ValueError):
        MaskRCNN(load_model_dir(DEMO, environ={}), tf.bfloat16, winograd=True)


def test_eval_on_demo_fixture_matches_tensorpack(winograd_backend, tensorpack_val_report, fixtures_dir):
    """Acceptance: within 0.003 AP of the tensorpack backend on val_public (Winograd in every eligible layer), and
    above the foundation thresholds (tensorpack's own example minus 0.005)."""
    val = fixtures_dir / "val_public"
    expected = tensorpack_val_report
    actual = evaluate(Pipeline(winograd_backend), val / "annotations.json", val / "images", progress=False)
    for kind, threshold in (("bbox", 0.863), ("segm", 0.883)):
        assert actual[kind]["AP"] >= threshold, actual
        assert abs(actual[kind]["AP"] - expected[kind]["AP"]) <= 0.003, (expected, actual)


def test_tiny_and_extreme_images(optimized_backend):
    for shape in ((1, 1, 3), (8, 900, 3), (700, 5, 3)):
        dets = optimized_backend.predict([np.full(shape, 127, np.uint8)])[0]
        assert dets.image_hw == shape[:2]
        assert full_masks(dets).shape == (len(dets), *shape[:2])
    assert optimized_backend.predict([]) == []


def test_r101_both_fc6_row_orders_match_tensorpack(r101_model_dirs, r101_tensorpack_backend):
    image = np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    options = PredictOptions(score_threshold=0.0, max_detections=20)
    first, last = r101_model_dirs
    expected = r101_tensorpack_backend.predict([image], options)[0]
    assert len(expected) == 20
    for model_dir in (first, last):
        backend = load_backend("optimized", model_dir, Settings(precision="float32"), environ={})
        assert_same_detections(expected, backend.predict([image], options)[0], box_atol=1e-2, min_mask_iou=0.97)


def test_bfloat16_runs_and_agrees_on_confident_detections(demo_model_dir, optimized_backend, example_images):
    backend = OptimizedBackend.from_bundle(load_model_dir(demo_model_dir, environ={}), Settings(precision="bfloat16"))
    assert backend.network.compute_dtype == tf.bfloat16
    image = read(example_images[0])
    reference = optimized_backend.predict([image])[0]
    low = backend.predict([image])[0]
    confident = reference.select(reference.scores > 0.9)
    assert len(confident) > 0
    matched = low.select(low.scores > 0.5)
    for box, label in zip(confident.boxes, confident.labels, strict=True):
        ious = box_iou(box, matched.boxes)
        assert ious.max() > 0.9 and matched.labels[ious.argmax()] == label


def test_settings_from_environment_and_validation():
    settings = Settings.from_env(
        {"MASKRCNN_PRECISION": "mixed", "MASKRCNN_XLA": "1", "MASKRCNN_MAX_BATCH_SIZE": "2"}, max_batch_size=3
    )
    assert (settings.precision, settings.xla, settings.max_batch_size, settings.bucket_step) == ("mixed", True, 3, 32)
    assert resolve_precision("float32") == "float32"
    for bad in ({"precision": "int8"}, {"max_batch_size": 0}):
        with pytest.raises(ValueError):
            Settings(**bad)
    # The buckets' rule is the network's: checked by the backend (and by ``serve`` before it starts, test_serve.py).
    OptimizedBackend.check_settings(Settings(bucket_step=128))
    for environ in ({"MASKRCNN_BUCKET_STEP": "48"}, {"MASKRCNN_BUCKET_STEP": "16"}):
        with pytest.raises(ValueError, match="bucket_step must be a positive multiple of 32"):
            OptimizedBackend.check_settings(Settings.from_env(environ))
    with pytest.raises(ValueError, match="bucket_step must be a positive multiple of 32, got 48"):
        load_backend("optimized", DEMO, Settings(bucket_step=48), environ={})  # refused before the network is built
    assert not masks_bucket_padding(32) and masks_bucket_padding(64)


@pytest.mark.parametrize(("gpu", "bf16_cpu", "expected"),
                         [(True, True, "float16"), (False, True, "bfloat16"), (False, False, "float32")])
def test_mixed_precision_picks_float16_on_gpu_bfloat16_on_capable_cpus_else_float32(monkeypatch, gpu, bf16_cpu,
                                                                                     expected):
    monkeypatch.setattr(optimized.tf.config, "list_physical_devices", lambda kind=None: ["gpu"] if gpu else [])
    monkeypatch.setattr(optimized, "cpu_prefers_bfloat16", lambda: bf16_cpu)
    assert resolve_precision("mixed") == expected
    assert resolve_precision("bfloat16") == "bfloat16"  # explicit choices are kept




@pytest.mark.parametrize(("vendor", "flags", "expected"), [
    ("GenuineIntel", "avx512f avx512_bf16 amx_bf16 amx_tile", True),   # Sapphire Rapids with AMX visible
    ("GenuineIntel", "avx512f avx512_bf16 avx512_fp16", False),        # AVX512-BF16 only: measured slower
    ("AuthenticAMD", "avx512f avx512_bf16", True),                     # Zen 4: measured 2.07x
    ("AuthenticAMD", "avx2", False),
])
def test_bfloat16_is_preferred_only_where_it_was_measured_faster(vendor, flags, expected):
    cpuinfo = f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse {flags}\n"
    assert optimized.cpu_prefers_bfloat16(cpuinfo) is expected
