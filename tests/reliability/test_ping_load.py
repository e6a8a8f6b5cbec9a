"""/ping under load (issue 23, defect 3: /ping waited behind inference, p50 2.65 s and max 16.7 s with 16 clients
sending 7000 x 7000 photos; SageMaker counts a /ping over 2 s as a failure). The first load of the catalogue
(testsupport/hostile.ping_loads) for a short time against each session server, with a health checker timing /ping
every 50 ms (testsupport/load.py); benchmarks/ping_under_load.py is the long measurement of docs/reliability.md.

Behind nginx, nginx answers /ping itself from the workers' published readiness; with gunicorn alone, a worker's
ping thread does, which no request can take (but which shares the worker's interpreter lock with the requests).
Either way every ping is 200, none waits behind the requests (the p99 is a small fraction of a request's time, where
it used to be most of it) and none takes SageMaker's 2 s. The absolute figure (p99 under ``PING_P99_SECONDS``) is
the benchmark's: on the shared CI machine a ping's time is mostly the wait for a CPU.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from maskrcnn_serving.settings import Limits
from testsupport.hostile import ping_loads
from testsupport.load import ping_under_load

LOAD_SECONDS = 12.0
SAGEMAKER_PING_SECONDS = 2.0
# /ping's p99 over a request's median time: at most this. Queued behind the requests (27302c0), it was most of it.
QUEUED_FRACTION = 0.05


@pytest.fixture(params=["nginx", "none"], ids=["nginx", "gunicorn"])
def server(request):
    return request.getfixturevalue("live_server" if request.param == "nginx" else "gunicorn_server")


@pytest.fixture(scope="module")
def huge_photos(example_images):
    photo = cv2.imread(str(example_images[0]), cv2.IMREAD_COLOR)
    return ping_loads(photo, np.ascontiguousarray(photo[100:220, 60:260]), limits=Limits())[0]


def test_ping_never_waits_behind_16_clients_sending_7000_x_7000_photos(server, huge_photos):
    report = ping_under_load(server.url, huge_photos, LOAD_SECONDS)
    print("\n" + report.summary())
    answered = report.load["status_counts"]
    assert answered.get("200", 0) >= huge_photos.clients and set(answered) == {"200"}, answered  # a real load
    assert len(report.pings) >= 50 and report.ping_statuses == {"200": len(report.pings)}
    request_seconds = report.load["latency_s"]["p50"]
    assert report.ping_seconds["p99"] < QUEUED_FRACTION * request_seconds, (report.summary(), request_seconds)
    assert report.ping_seconds["max"] < SAGEMAKER_PING_SECONDS, report.summary()
    assert server.alive()
