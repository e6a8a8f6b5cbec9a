"""``maskrcnn-serving bench``: model, compare and http write their JSON, table and figure."""

from __future__ import annotations

import json

import pytest

from maskrcnn_serving import cli
from maskrcnn_serving.pipeline import Pipeline


def test_bench_model_command_writes_json_table_and_png(tensorpack_backend, tmp_path, monkeypatch, capsys):
    from maskrcnn_serving.commands import bench

    loads = []
    monkeypatch.setattr(bench, "_open",
                        lambda settings, *a: loads.append(settings.backend) or Pipeline(tensorpack_backend))
    out = tmp_path / "out" / "model.json"
    code = cli.main([
        "bench", "model", "--model-dir", "model/demo", "--backend", "tensorpack", "--sizes", "128x96,96x160",
        "--batch-sizes", "1", "--iterations", "2", "--warmup", "1", "--detections", "5", "--json", str(out),
    ])
    assert code == 0 and loads == ["tensorpack"]
    report = json.loads(out.read_text())
    for key in ("img_per_s", "latency_s", "stages_s_per_image", "total_s_per_image", "results", "machine", "model"):
        assert key in report
    assert set(report["latency_s"]) >= {"p50", "p90", "p99"}
    assert set(report["stages_s_per_image"]) == {"decode", "preprocess", "queue", "model", "postprocess", "search",
                                                 "encode"}
    assert report["detections"] == 5 and len(report["results"]) == 2
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "128x96" in table and "model ms" in table and "non-model" in table


def test_compare_model_on_the_mixed_stream_reports_each_pass_and_the_load(tensorpack_backend, tmp_path, monkeypatch,
                                                                           capsys):
    """``bench compare model --stream N``: the stream's photos one per round, twice, no warm-up; each pass and
    each side's load time in the report (the process start both share measured apart), and the first pass's
    ratio with the loads counted."""
    from maskrcnn_serving.commands import bench

    monkeypatch.setattr(bench, "_open", lambda settings, *a: Pipeline(tensorpack_backend))
    out = tmp_path / "compare.json"
    code = cli.main(["bench", "compare", "model", "--model-dir", "model/demo", "--a", "backend=tensorpack",
                     "--b", "backend=tensorpack,format=coco", "--stream", "2", "--detections", "5",
                     "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["rounds"] == 4 and report["warmup_calls"] == 0
    assert report["images"] == "mixed stream of 2 photos, seed 0 (bench/traffic.py)"
    assert len(report["passes"]) == 2 and all(one["a_s"] > 0 and one["b_s"] > 0 for one in report["passes"])
    assert report["a"]["load_s"] >= 0 and report["b"]["load_s"] >= 0 and report["process_start_s"] >= 0
    printed = capsys.readouterr().out
    assert "pass 1:" in printed and "with each side's load first" in printed and "pass 2:" in printed
    assert "the process start" in printed


def test_compare_model_refuses_a_batch_size_that_splits_the_stream_s_passes():
    with pytest.raises(SystemExit, match="divide --stream"):
        cli.main(["bench", "compare", "model", "--model-dir", "model/demo", "--a", "backend=tensorpack",
                  "--b", "backend=optimized", "--stream", "3", "--batch-size", "2"])


def test_compare_rle_finds_identical_output_and_a_speedup(tmp_path, capsys):
    out = tmp_path / "rle.json"
    code = cli.main(["bench", "compare", "rle", "--masks", "6", "--size", "120x90", "--rounds", "2",
                     "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["identical"] is True and report["rounds"] == 2
    assert report["a"]["encoder"] == "legacy" and report["b"]["encoder"] == "seed"
    assert report["speedup_a_over_b"] > 1.0
    assert "identical" in capsys.readouterr().out


def test_bench_http_command_writes_json_and_png(scripted_server, tmp_path, capsys):
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


def test_bench_http_against_the_real_server(live_server, example_images, tmp_path):
    """The session's gunicorn server (demo model): every request of a short sweep answered 200 in coco format."""
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
