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


# ----------------------------------------------------------------------------------------------- bench model


def test_model_bench_stages_add_up_and_the_detection_count_is_fixed(tensorpack_backend):
    from maskrcnn_serving.bench.model import ModelBenchSettings, bench_model
    from maskrcnn_serving.bench.pipeline import STAGES, Pipeline

    settings = ModelBenchSettings(sizes=((160, 120),), batch_sizes=(1, 2), iterations=2, warmup=1)
    report = bench_model(Pipeline(tensorpack_backend, 0.0, 7, "legacy"), settings)
    assert [(r["size"], r["batch_size"]) for r in report["results"]] == [("160x120", 1), ("160x120", 2)]
    assert report["primary"] == {"size": "160x120", "batch_size": 1}
    for result in report["results"]:
        assert set(result["stages_s_per_image"]) == set(STAGES)
        staged = sum(result["stages_s_per_image"].values())
        assert abs(staged - result["total_s_per_image"]) <= 0.05 * result["total_s_per_image"]
        assert result["detections_per_image"] == {"mean": 7.0, "min": 7}  # score threshold 0: never fewer
        assert result["images"] == result["calls"] * result["batch_size"] == 2 * result["batch_size"]
        assert result["img_per_s"] == pytest.approx(1.0 / result["total_s_per_image"])
        latency = result["latency_s"]
        assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        assert result["peak_rss_mb"] > 100  # TensorFlow and the model are resident
        assert 0 < result["non_graph_share"] < 1


def test_seed_response_path_matches_ours_on_model_output(tensorpack_backend):
    """The seed baseline used by ``bench compare model`` encodes the same masks as our legacy format."""
    import json

    from maskrcnn_serving.bench.images import synthetic_jpegs
    from maskrcnn_serving.bench.pipeline import Pipeline

    payload = synthetic_jpegs((96, 128), 1, seed=5)
    ours = json.loads(Pipeline(tensorpack_backend, 0.0, 20, "legacy").run(payload).body)
    seed = json.loads(Pipeline(tensorpack_backend, 0.0, 20, "seed").run(payload).body)
    assert len(ours["annotations"]) == len(seed["annotations"]) == 20
    for a, b in zip(ours["annotations"], seed["annotations"], strict=True):
        assert a["segmentation"] == b["segmentation"]
        assert a["bbox"] == b["bbox"] and a["category_id"] == b["category_id"]


def test_bench_model_command_writes_json_table_and_png(tensorpack_backend, tmp_path, monkeypatch, capsys):
    from maskrcnn_serving import cli
    from maskrcnn_serving.commands import bench

    loads = []
    monkeypatch.setattr(bench, "_load", lambda name, *a: loads.append(name) or tensorpack_backend)
    out = tmp_path / "out" / "model.json"
    code = cli.main([
        "bench", "model", "--model-dir", "model/demo", "--backend", "tensorpack", "--sizes", "128x96,96x160",
        "--batch-sizes", "1", "--iterations", "2", "--warmup", "1", "--detections", "5", "--json", str(out),
    ])
    assert code == 0 and loads == ["tensorpack"]
    import json

    report = json.loads(out.read_text())
    for key in ("img_per_s", "latency_s", "stages_s_per_image", "total_s_per_image", "results", "machine", "model"):
        assert key in report
    assert set(report["latency_s"]) >= {"p50", "p90", "p99"}
    assert set(report["stages_s_per_image"]) == {"decode", "preprocess", "graph", "paste", "encode", "json"}
    assert report["detections"] == 5 and len(report["results"]) == 2
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "128x96" in table and "graph ms" in table and "non-graph" in table


# ----------------------------------------------------------------------------------------------- compare


def test_compare_rle_finds_identical_output_and_a_speedup(tmp_path, capsys):
    import json

    from maskrcnn_serving import cli

    out = tmp_path / "rle.json"
    code = cli.main(["bench", "compare", "rle", "--masks", "6", "--size", "120x90", "--rounds", "2",
                     "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["identical"] is True and report["rounds"] == 2
    assert report["a"]["encoder"] == "legacy" and report["b"]["encoder"] == "seed"
    assert report["speedup_a_over_b"] > 1.0
    assert "identical" in capsys.readouterr().out


def test_compare_pipelines_interleaves_and_reports_the_ratio(tensorpack_backend, tmp_path):
    from maskrcnn_serving.bench.compare import compare_pipelines
    from maskrcnn_serving.bench.pipeline import Pipeline
    from maskrcnn_serving.bench.plots import plot_compare

    a = Pipeline(tensorpack_backend, 0.0, 10, "legacy")
    b = Pipeline(tensorpack_backend, 0.0, 10, "coco")
    report = compare_pipelines(a, b, size=(128, 96), rounds=3, warmup=1, labels=("legacy", "coco"))
    assert report["rounds"] == 3 and report["a"]["calls"] == report["b"]["calls"] == 3
    assert report["throughput_ratio_b_over_a"] == pytest.approx(report["b"]["img_per_s"] / report["a"]["img_per_s"])
    assert plot_compare(report, tmp_path / "c.png").stat().st_size > 5_000


# ----------------------------------------------------------------------------------------------- bench http


@pytest.fixture
def scripted_server():
    """A minimal Flask app on 127.0.0.1: 200 with a 1000-byte body, except 500 for images whose id ends in "-3-0"
    (the 4th body) and 413 for raw bodies. Yields its URL; shut down after the test."""
    import threading

    from flask import Flask, Response, request
    from werkzeug.serving import make_server

    app = Flask("scripted")
    seen = []

    @app.post("/invocations")
    def invocations():
        if request.mimetype != "application/json":
            return Response(b"too large", status=413)
        document = request.get_json()
        seen.append(document)
        if document["img_id"].endswith("-3-0"):
            return Response(b'{"error": "scripted"}', status=500, mimetype="application/json")
        return Response(b"x" * 1000, mimetype="application/json")

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_load_generator_counts_every_request_by_status_and_size(scripted_server):
    from maskrcnn_serving.bench import loadgen

    url, seen = scripted_server
    target = loadgen.HttpTarget(url, timeout=10)
    images = [bytes([i]) * (100 + i) for i in range(4)]
    bodies = loadgen.build_bodies(images, fields={"format": "coco"})
    assert [b.images for b in bodies] == [1, 1, 1, 1]

    closed = loadgen.run_closed(target, bodies, concurrency=3, requests=10, duration=30)
    # Bodies are used in turn: requests 3 and 7 carry the 4th body, which the server fails.
    assert closed["sent"] == 10 and closed["ok"] == 8
    assert closed["status_counts"] == {"200": 8, "500": 2}
    assert closed["response_bytes"]["mean"] == 1000.0
    assert closed["request_bytes"]["min"] == min(len(b.data) for b in bodies)
    assert closed["request_bytes"]["max"] == max(len(b.data) for b in bodies)
    assert closed["throughput_rps"] == pytest.approx(8 / closed["wall_s"])
    assert len(seen) == 10 and all(doc["format"] == "coco" for doc in seen)

    open_loop = loadgen.run_open(target, bodies, rate=40.0, requests=8, duration=30)
    assert open_loop["sent"] == 8 and open_loop["status_counts"] == {"200": 6, "500": 2}
    assert open_loop["wall_s"] >= 7 / 40.0  # 8 arrivals at 40/s span at least 0.175 s
    assert open_loop["latency_s"]["min"] >= open_loop["service_latency_s"]["min"]

    # Bounded by time as well as by count.
    bounded = loadgen.run_open(target, bodies, rate=20.0, requests=1000, duration=0.3)
    assert 1 <= bounded["sent"] <= 7

    raw = loadgen.run_closed(target, loadgen.build_bodies(images, raw=True), concurrency=1, requests=2, duration=30)
    assert raw["status_counts"] == {"413": 2} and raw["ok"] == 0 and raw["latency_s"] == {}


def test_bench_http_command_writes_json_and_png(scripted_server, tmp_path, capsys):
    import json

    from maskrcnn_serving import cli

    url, _ = scripted_server
    out = tmp_path / "http.json"
    code = cli.main(["bench", "http", "--url", url, "--size", "64x48", "--concurrency", "1,2", "--rates", "30",
                     "--requests", "8", "--warmup", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and [r["mode"] for r in report["runs"]] == ["closed", "closed", "open"]
    assert [r["sent"] for r in report["runs"]] == [8, 8, 8]
    assert all(set(r["latency_s"]) >= {"p50", "p90", "p99"} for r in report["runs"])
    assert report["target"].endswith("/invocations")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "closed" in capsys.readouterr().out


def test_load_generator_counts_requests_that_get_no_answer():
    import socket

    from maskrcnn_serving.bench.loadgen import HttpTarget, build_bodies, run_closed

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_closed(HttpTarget(f"127.0.0.1:{port}", timeout=5), build_bodies([b"abc"]), 2, 4, 30)
    assert result["sent"] == 4 and result["ok"] == 0
    assert result["status_counts"] == {"error:ConnectionRefusedError": 4}


def test_bench_http_against_the_real_server(live_server, example_images, tmp_path):
    """The session's gunicorn server (demo model): every request of a short sweep answered 200 in coco format."""
    import json

    from maskrcnn_serving import cli

    out = tmp_path / "live.json"
    code = cli.main(["bench", "http", "--url", live_server.url, "--images", str(example_images[0]),
                     "--concurrency", "2", "--rates", "5", "--requests", "4", "--warmup", "1",
                     "--field", "format=coco", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["warmup_statuses"] == ["200"]
    for run in report["runs"]:
        assert run["status_counts"] == {"200": 4}
        assert run["response_bytes"]["min"] > 50 and run["throughput_rps"] > 0
        assert run["request_bytes"]["min"] > example_images[0].stat().st_size  # base64 of the file, plus JSON


def test_sagemaker_target_calls_invoke_endpoint_and_maps_container_errors(monkeypatch):
    """boto3 is optional and not installed for the tests: a stand-in records the calls; a ModelError carries the
    container's own status, which the load generator must count (not the 424 SageMaker wraps it in)."""
    import sys
    import types

    from maskrcnn_serving.bench import loadgen

    class ClientError(Exception):
        def __init__(self, response):
            super().__init__("client error")
            self.response = response

    calls = []

    class Client:
        def invoke_endpoint(self, **kwargs):
            calls.append(kwargs)
            if kwargs["Body"] == b"bad":
                raise ClientError({"Error": {"Code": "ModelError"}, "OriginalStatusCode": 413,
                                   "ResponseMetadata": {"HTTPStatusCode": 424}})
            return {"Body": types.SimpleNamespace(read=lambda: b'{"annotations": []}')}

    boto3 = types.ModuleType("boto3")
    boto3.client = lambda service, region_name=None, config=None: calls.append((service, region_name)) or Client()
    botocore = types.ModuleType("botocore")
    config_module = types.ModuleType("botocore.config")
    config_module.Config = lambda **kwargs: kwargs
    exceptions_module = types.ModuleType("botocore.exceptions")
    exceptions_module.ClientError = ClientError
    for name, module in {"boto3": boto3, "botocore": botocore, "botocore.config": config_module,
                         "botocore.exceptions": exceptions_module}.items():
        monkeypatch.setitem(sys.modules, name, module)

    target = loadgen.SageMakerTarget("my-endpoint", "eu-west-1")
    assert target.description == "sagemaker:my-endpoint"
    assert target.send(b"{}", "application/json") == (200, b'{"annotations": []}')
    status, _ = target.send(b"bad", "application/json")
    assert status == 413
    assert calls[0] == ("sagemaker-runtime", "eu-west-1")
    assert calls[1] == {"EndpointName": "my-endpoint", "ContentType": "application/json",
                        "Accept": "application/json", "Body": b"{}"}
