"""``bench model`` and ``bench compare model``: requests through the serving pipeline, timed by its stages."""

from __future__ import annotations

import json

import pytest

from maskrcnn_serving.bench.images import synthetic_jpegs
from maskrcnn_serving.bench.workload import Workload
from maskrcnn_serving.pipeline import STAGES, Pipeline


def test_model_bench_stages_add_up_and_the_detection_count_is_fixed(tensorpack_backend):
    from maskrcnn_serving.bench.model import ModelBenchSettings, bench_model

    settings = ModelBenchSettings(sizes=((160, 120),), batch_sizes=(1, 2), iterations=2, warmup=1)
    report = bench_model(Workload(Pipeline(tensorpack_backend), 0.0, 7, "legacy"), settings)
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
        assert 0 < result["non_model_share"] < 1


def test_seed_response_path_matches_ours_on_model_output(tensorpack_backend):
    """The seed baseline used by ``bench compare model`` encodes the same masks as our legacy format."""
    from maskrcnn_serving.bench.images import synthetic_jpegs

    payload = synthetic_jpegs((96, 128), 1, seed=5)
    ours = json.loads(Workload(Pipeline(tensorpack_backend), 0.0, 20, "legacy").run(payload).body)
    seed = json.loads(Workload(Pipeline(tensorpack_backend), 0.0, 20, "seed").run(payload).body)
    assert len(ours["annotations"]) == len(seed["annotations"]) == 20
    for a, b in zip(ours["annotations"], seed["annotations"], strict=True):
        assert a["segmentation"] == b["segmentation"]
        assert a["bbox"] == b["bbox"] and a["category_id"] == b["category_id"]


def test_compare_pipelines_interleaves_and_reports_the_ratio(tensorpack_backend, tmp_path):
    from maskrcnn_serving.bench.compare import compare_pipelines
    from maskrcnn_serving.bench.plots import plot_compare

    pipeline = Pipeline(tensorpack_backend)
    a = Workload(pipeline, 0.0, 10, "legacy")
    b = Workload(pipeline, 0.0, 10, "coco")
    images = synthetic_jpegs((128, 96), 2)
    report = compare_pipelines(a, b, images, "128x96", rounds=5, warmup=1, labels=("legacy", "coco"), pass_length=2)
    assert report["rounds"] == 5 and report["a"]["calls"] == report["b"]["calls"] == 5
    assert report["throughput_ratio_b_over_a"] == pytest.approx(report["b"]["img_per_s"] / report["a"]["img_per_s"])
    # Two complete passes of 2 rounds (the fifth round starts a third, incomplete one, left out).
    assert len(report["passes"]) == 2
    for side in ("a", "b"):
        all_calls = report[side]["images"] / report[side]["img_per_s"]
        assert 0 < sum(one[f"{side}_s"] for one in report["passes"]) < all_calls
    assert plot_compare(report, tmp_path / "c.png").stat().st_size > 5_000
