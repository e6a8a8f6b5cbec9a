"""The real-traffic stream (bench/traffic.py) and ``bench model --stream``."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np

from maskrcnn_serving import cli
from maskrcnn_serving.bench.images import encode_jpeg, synthetic_image
from maskrcnn_serving.bench.traffic import PHOTO_SIZES, Photo, mixed_stream, run_stream, stream_sizes
from maskrcnn_serving.bench.workload import Workload
from maskrcnn_serving.pipeline import Pipeline


def test_stream_sizes_are_seeded_permutations_of_both_orientations():
    assert any(w > h for w, h in PHOTO_SIZES) and any(w < h for w, h in PHOTO_SIZES)
    assert any(w * h >= 12_000_000 for w, h in PHOTO_SIZES) and len(set(PHOTO_SIZES)) == len(PHOTO_SIZES)
    count = len(PHOTO_SIZES)
    first = stream_sizes(3 * count, seed=0)
    assert first == stream_sizes(3 * count, seed=0)  # the same seed, the same stream
    for start in range(0, 3 * count, count):  # every pass over the list holds each size once
        assert sorted(first[start : start + count]) == sorted(PHOTO_SIZES)
    assert first[:count] != first[count : 2 * count]  # each pass in a new order
    assert stream_sizes(count, seed=1) != first[:count]


def test_mixed_stream_is_reproducible_photo_like_jpegs():
    photos = mixed_stream(2, seed=1)
    assert [p.size for p in photos] == stream_sizes(2, seed=1) == [(480, 640), (1920, 1080)]
    assert [p.jpeg for p in mixed_stream(2, seed=1)] == [p.jpeg for p in photos]
    for photo in photos:
        decoded = cv2.imdecode(np.frombuffer(photo.jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == (photo.size[1], photo.size[0], 3)
    assert photos[0].jpeg != mixed_stream(1, seed=2)[0].jpeg


def test_run_stream_times_two_passes_per_image(tensorpack_backend):
    sizes = [(160, 120), (90, 150), (200, 100)]
    photos = [Photo(size, i, encode_jpeg(synthetic_image(*size, seed=i))) for i, size in enumerate(sizes)]
    report = run_stream(Workload(Pipeline(tensorpack_backend), 0.0, 4, "legacy"), photos)
    for name in ("first_pass", "repeat_pass"):
        run = report[name]
        assert run["images"] == 3 and run["wall_s"] > 0
        assert 0 < run["s_per_image"]["p50"] <= run["s_per_image"]["p99"] <= run["s_per_image"]["max"]
        assert 0 < run["model_s_per_image"]["p50"] <= run["s_per_image"]["max"]
    assert 0.0 <= report["new_size_share"] < 1.0 and report["p99_over_p50"] >= 1.0
    assert [r["size"] for r in report["images"]] == ["160x120", "90x150", "200x100"]
    assert all(r["detections"] == 4 and r["repeat_seconds"] > 0 for r in report["images"])


def test_bench_model_stream_command_writes_json(tensorpack_backend, tmp_path, monkeypatch, capsys):
    from maskrcnn_serving.commands import bench

    monkeypatch.setattr(bench, "_open", lambda settings, *a: Pipeline(tensorpack_backend))
    out = tmp_path / "stream.json"
    code = cli.main(["bench", "model", "--model-dir", "model/demo", "--backend", "tensorpack", "--stream", "2",
                     "--stream-seed", "1", "--detections", "3", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["stream"] == {"images": 2, "seed": 1} and report["sizes"] == ["1920x1080", "480x640"]
    assert report["first_pass"]["images"] == report["repeat_pass"]["images"] == 2
    assert report["load_s"] >= 0 and report["warmup_s"] > 0  # the server's warm-up inference ran
    assert report["wall_incl_load_s"] >= report["first_pass"]["wall_s"]
    assert "machine" in report and report["model"]["backend"] == "tensorpack"
    assert "first pass" in capsys.readouterr().out


def test_bench_http_stream_sends_the_stream_in_order(scripted_server, tmp_path):
    url, seen = scripted_server
    out = tmp_path / "http.json"
    code = cli.main(["bench", "http", "--url", url, "--stream", "2", "--stream-seed", "1", "--concurrency", "1",
                     "--requests", "2", "--warmup", "0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["runs"][0]["ok"] == 2
    assert report["payload"]["images"].startswith("mixed stream of 2 photos, seed 1")
    sent = [cv2.imdecode(np.frombuffer(base64.b64decode(d["img_data"]), np.uint8), cv2.IMREAD_COLOR)
            for d in seen]
    assert [(image.shape[1], image.shape[0]) for image in sent] == stream_sizes(2, seed=1)
