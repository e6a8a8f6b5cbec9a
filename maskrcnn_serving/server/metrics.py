"""Prometheus metrics of the server (``GET /metrics``), correct across gunicorn worker processes.

With several workers, ``maskrcnn-serving serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before any
worker starts; each worker then writes its samples there and ``/metrics`` aggregates all of them, whichever worker
answers. Without that variable (a single process, tests) the process's default registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter("maskrcnn_requests", "HTTP requests by route and status.", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "maskrcnn_request_duration_seconds", "Wall time of a request, by route.", ["route"], buckets=_LATENCY_BUCKETS
)
STAGE_SECONDS = Histogram(
    "maskrcnn_stage_duration_seconds",
    "Wall time per request spent in each stage of the pipeline: decode (base64 + image decode), preprocess "
    "(resize), queue (waiting for the model), model (the forward calls that ran the request's images), "
    "postprocess (class filter + mask pasting), encode (RLE / polygons + JSON).",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
IMAGES = Counter("maskrcnn_images", "Images run through the model.")
DETECTIONS = Counter("maskrcnn_detections", "Detections returned to clients.")


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of every worker's metrics, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
