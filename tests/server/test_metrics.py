"""server/metrics.py: the exposition of this process's metrics, and the sum over every process that wrote to a
metrics directory (real child processes, as gunicorn's workers write them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from maskrcnn_serving.server import metrics


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not in:\n{text}"
    return float(match.group(1))


def test_without_a_directory_this_process_is_exposed():
    before = _value(metrics.render(None)[0].decode(), "maskrcnn_images_total")
    metrics.IMAGES.inc(2)
    body, content_type = metrics.render(None)
    assert content_type == CONTENT_TYPE_LATEST
    assert _value(body.decode(), "maskrcnn_images_total") == before + 2
    for name in ("maskrcnn_requests_total", "maskrcnn_request_duration_seconds", "maskrcnn_stage_duration_seconds",
                 "maskrcnn_detections_total"):
        assert f"# TYPE {name.removesuffix('_total')}" in body.decode(), name


def _worker(directory: str, images: int, stage_seconds: float) -> int:
    """A process that records like a worker, with ``directory`` set before prometheus_client loads; its pid."""
    script = ("import os\n"
              "from maskrcnn_serving.server import metrics\n"
              f"metrics.IMAGES.inc({images})\n"
              "metrics.REQUESTS.labels('/invocations', '200').inc()\n"
              f"metrics.STAGE_SECONDS.labels('model').observe({stage_seconds})\n"
              "print(os.getpid())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True,
                            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory})
    return int(result.stdout)


def test_every_process_of_the_directory_is_summed_also_after_it_exits(tmp_path):
    directory = str(tmp_path)
    first = _worker(directory, 2, 0.2)
    _worker(directory, 3, 0.02)
    text = metrics.render(directory)[0].decode()
    assert _value(text, "maskrcnn_images_total") == 5
    assert _value(text, 'maskrcnn_requests_total{route="/invocations",status="200"}') == 2
    assert _value(text, 'maskrcnn_stage_duration_seconds_count{stage="model"}') == 2
    assert _value(text, 'maskrcnn_stage_duration_seconds_bucket{le="0.025",stage="model"}') == 1
    assert _value(text, 'maskrcnn_stage_duration_seconds_sum{stage="model"}') == pytest.approx(0.22)
    metrics.forget_process(first, directory)  # what the gunicorn master does when a worker exits
    assert metrics.render(directory)[0].decode() == text  # its counts stay in the sums
