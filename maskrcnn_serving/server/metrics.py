"""Prometheus metrics of the server (``GET /metrics``), correct across gunicorn worker processes.

``maskrcnn-serving serve`` gives its processes a metrics directory (``Settings.metrics_dir``, the variable
``PROMETHEUS_MULTIPROC_DIR``, which prometheus_client reads when it is first imported to choose where samples are
kept: so it is in the gunicorn master's environment from its start, see :mod:`.process`). Each worker then writes its
samples there and :func:`render` sums all of them, whichever worker answers. Without a directory (a single process,
tests) the process's default registry is used.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
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
# Instance search (servers with --index; no sample without one): 1 when every live worker can search the index, 0
# while one cannot (the lowest value over the live workers); each loss and each recovery counted.
SEARCH_AVAILABLE = Gauge("maskrcnn_search_available", "1 when instance search works in every live worker, else 0.",
                         ["collection"], multiprocess_mode="livemin")
SEARCH_CHANGES = Counter("maskrcnn_search_changes", "Instance search of a worker became unavailable or available "
                         "again.", ["collection", "to"])


def search_available(collection: str, available: bool, changed: bool = True) -> None:
    """A worker's instance search of ``collection`` works, or does not; ``changed``: it did not a moment ago (the
    change is counted), else this is the worker's first word about it."""
    SEARCH_AVAILABLE.labels(collection).set(1 if available else 0)
    if changed:
        SEARCH_CHANGES.labels(collection, "available" if available else "unavailable").inc()


def render(directory: str | None) -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type: of every process that wrote to ``directory`` (the
    settings' ``metrics_dir``), or of this process when None."""
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def forget_process(pid: int, directory: str) -> None:
    """A worker ``pid`` exited: drop its live-only samples from ``directory`` (gauges of live processes; its counts
    and histograms stay in the sums). The gunicorn master calls it when a worker exits."""
    multiprocess.mark_process_dead(pid, directory)
