"""Load: 8 concurrent clients for a bounded time against each of the session's real servers (2 workers; behind
nginx and gunicorn alone), driven by benchmarks/soak.py (the same driver as the documented long soak).

Proves: zero 5xx and zero connection failures, every answer equal to the sequential answer for its image, each
worker's resident memory after the warm-up grows by less than ``RSS_GROWTH_BOUND_MB``, and the p99 latency of the
second half of the run stays within ``P99_DRIFT_FACTOR`` of the first half's (generous: the CI machine is shared).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak  # noqa: E402 - benchmarks/ is not a package

CLIENTS = 8
WARMUP_SECONDS = 5.0
MEASURED_SECONDS = 20.0
RSS_GROWTH_BOUND_MB = 50.0
P99_DRIFT_FACTOR = 2.5


@pytest.fixture(scope="module")
def bodies(example_images) -> list[bytes]:
    # format=coco keeps answers under the session server's 64 kB response limit; the masks are still checked.
    return [json.dumps({**json.loads(body), "format": "coco"}).encode() for body in soak.request_bodies(example_images)]


@pytest.fixture(params=["nginx", "none"], ids=["nginx", "gunicorn"])
def server(request):
    return request.getfixturevalue("live_server" if request.param == "nginx" else "gunicorn_server")


def test_concurrent_load_is_correct_bounded_and_stable(server, bodies):
    live_server = server
    expected = soak.expected_answers(live_server.url, bodies)
    assert sum(len(answer["annotations"]) for answer in expected) > 0
    report = soak.run_load(live_server.url, bodies, expected, CLIENTS, MEASURED_SECONDS, live_server.process.pid,
                           warmup_seconds=WARMUP_SECONDS, windows=2, sample_every=1.0)
    print("\n" + report.summary())
    assert report.requests >= 2 * CLIENTS
    assert report.statuses == {"200": report.requests}
    assert report.server_errors == report.transport_errors == report.wrong_answers == 0
    assert len(report.rss_growth_mb) == 2, report.rss_trace[:2]
    assert max(report.rss_growth_mb.values()) < RSS_GROWTH_BOUND_MB, report.rss_growth_mb
    first, second = report.windows
    assert second["p99_ms"] <= P99_DRIFT_FACTOR * first["p99_ms"] + 250, report.windows
    assert live_server.alive()
