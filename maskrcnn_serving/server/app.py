"""The Flask app of one server worker: SageMaker's routes over the inference pipeline.

Routes: ``GET /ping`` (200 only once a worker's model is loaded AND warmed up, else 503: :mod:`.readiness`; behind
nginx, nginx answers it and it never reaches this app), ``POST /invocations``,
``GET /execution-parameters`` (Batch Transform), ``GET /metrics`` (Prometheus text), ``GET /model`` (what a client
needs to prepare requests and draw answers), and the web page (``GET /``, ``GET /static/<name>``: :mod:`.web`).
SageMaker forwards only ``/ping`` and ``/invocations``; the other routes are for local use and operators.

The app only moves bytes: ``/invocations`` reads the body (:mod:`.guards`), the HTTP codec
(:mod:`maskrcnn_serving.wire`) parses it, and the worker's :class:`~maskrcnn_serving.pipeline.Pipeline` (owned by
:class:`~.runtime.ModelRunner`) runs it and has the codec write the answer. Errors become HTTP responses in one
handler, through :func:`maskrcnn_serving.errors.to_serving_error`; every answer gets the security headers of
:mod:`.headers`; every request is measured per stage and logged as one JSON line with its request id.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from maskrcnn_serving import wire
from maskrcnn_serving.deadline import Deadline
from maskrcnn_serving.errors import InternalError, NotFound, NotReady, ServingError, error_body, to_serving_error
from maskrcnn_serving.pipeline import Pipeline, StageTimes
from maskrcnn_serving.server import headers, metrics, readiness
from maskrcnn_serving.server.guards import read_body
from maskrcnn_serving.server.runtime import ModelRunner
from maskrcnn_serving.server.web import register_page
from maskrcnn_serving.settings import Limits, MiB, Settings
from maskrcnn_serving.visualize import class_color

log = logging.getLogger("maskrcnn_serving.server")
access_log = logging.getLogger("maskrcnn_serving.access")

CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET_ROUTES = ("/ping", "/metrics")


def _request_id() -> str:
    for header in ("X-Request-Id", "X-Amzn-RequestId"):
        value = request.headers.get(header, "")
        if _REQUEST_ID_RE.match(value):
            return value
    return uuid.uuid4().hex


def _json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def hex_color(bgr: tuple[int, int, int]) -> str:
    """``"#rrggbb"`` of a BGR colour."""
    blue, green, red = bgr
    return f"#{red:02x}{green:02x}{blue:02x}"


def model_metadata(pipeline: Pipeline, limits: Limits) -> dict[str, Any]:
    """The ``GET /model`` document (docs/openapi.yaml ``ModelMetadata``): the classes (without "BG") and their
    colours as :func:`maskrcnn_serving.visualize.class_color` draws them, the test-time resize, the defaults and
    limits a client needs, the length of the instances' embeddings, and instance search: whether the server has an
    index (``configured``), whether it can be searched now (``available``: false while its database is down) and
    how many instances it holds (null when it cannot be asked)."""
    backend, index = pipeline.backend, pipeline.index
    names = list(backend.class_names[1:])
    return {
        "backend": backend.description["backend"],
        "precision": backend.description["precision"],
        "class_names": names,
        "class_colors": {name: hex_color(class_color(class_id)) for class_id, name in enumerate(names, start=1)},
        "resize": {"short_edge": pipeline.inference.short_edge_size, "max_size": pipeline.inference.max_size},
        "default_score_threshold": pipeline.default_options().score_threshold,
        "has_masks": backend.has_masks,
        "embedding_dim": backend.embedding_dim,
        "search": {"configured": index is not None, "available": index is not None and index.available,
                   "indexed": None if index is None else index.count()},
        "max_request_bytes": limits.max_request_bytes,
    }


def error_response(error: ServingError) -> Response:
    """The JSON answer of ``error`` (its headers, e.g. when a 503 may be retried, are added to every answer:
    :func:`.headers.for_status`)."""
    return Response(error_body(error.code, error.message), status=error.status, mimetype="application/json")


def create_app(settings: Settings, runner: ModelRunner | None = None) -> Flask:
    """The Flask app of one worker with the server's ``settings`` (read once, by the gunicorn master: see
    :mod:`.process`). Without ``runner``, starts loading ``settings.model_dir`` in the background."""
    if runner is None:
        runner = ModelRunner(settings).start(background=True)
    app = Flask("maskrcnn_serving", static_folder=None)  # the page's files: server/web.py, by exact name only
    app.extensions["maskrcnn_runner"] = runner
    limits = settings.limits
    deadline_seconds = settings.deadline_seconds

    @app.before_request
    def _start() -> None:
        g.request_id = _request_id()
        g.start = time.perf_counter()
        g.stages = {}
        g.log_fields = {}

    @app.after_request
    def _finish(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        elapsed = time.perf_counter() - g.get("start", time.perf_counter())
        metrics.REQUESTS.labels(route, str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(route).observe(elapsed)
        response.headers["X-Request-Id"] = g.get("request_id", "")
        response.headers.update(headers.for_status(response.status_code))
        fields = {
            "request_id": g.get("request_id"),
            "method": request.method,
            "route": route,
            "status": response.status_code,
            "duration_ms": round(elapsed * 1000, 2),
            "bytes_in": request.content_length or 0,
            "bytes_out": response.content_length or 0,
            **g.get("log_fields", {}),
        }
        if g.get("stages"):
            fields["stages_ms"] = {k: round(v * 1000, 2) for k, v in g.stages.items()}
        level = logging.DEBUG if route in _QUIET_ROUTES and response.status_code < 500 else logging.INFO
        access_log.log(level, "request", extra={"fields": fields})
        return response

    @app.errorhandler(Exception)
    def _handle_error(exc: Exception) -> Response:
        request_id = g.get("request_id", "-")
        error = to_serving_error(exc, request_id)
        response = error_response(error)
        if isinstance(exc, HTTPException):  # werkzeug's own (unknown route, wrong method): keep e.g. Allow on 405
            for name, value in exc.get_headers():
                if name.lower() != "content-type":
                    response.headers[name] = value
        elif isinstance(error, InternalError) and error is not exc:  # a fault: the details go to the log only
            log.error("unhandled error", exc_info=exc, extra={"fields": {"request_id": request_id}})
        elif error is not exc:  # out of memory: this request fails, the worker lives
            log.warning("resource exhausted", exc_info=exc, extra={"fields": {"request_id": request_id}})
        g.log_fields = {**g.get("log_fields", {}), "error_code": error.code}
        return response

    def _require_ready(wait: float) -> None:
        if not runner.wait_ready(wait):
            raise NotReady(runner.message)

    @app.get("/ping")
    def ping() -> Response:
        """What the supervisor last published (gunicorn alone: this runs on the worker's ping thread), or this
        worker's own state in an app without a readiness directory. Never waits."""
        if settings.readiness_dir:
            answer = readiness.read_answer(settings.readiness_dir)
        else:
            answer = readiness.answer_of({os.getpid(): runner.worker_state})
        if answer.status != 200:
            g.log_fields = {"error_code": NotReady.code}
        response = Response(answer.body, status=answer.status, mimetype="application/json")
        response.headers.update(headers.NO_STORE)
        return response

    @app.get("/execution-parameters")
    def execution_parameters() -> Response:
        return _json_response(
            {
                "MaxConcurrentTransforms": max(1, settings.workers),
                "BatchStrategy": "SINGLE_RECORD",
                "MaxPayloadInMB": max(1, limits.max_request_bytes // MiB),
            }
        )

    @app.get("/index/thumbnail/<int:instance_id>")
    def index_thumbnail(instance_id: int) -> Response:
        """The stored JPEG thumbnail of an indexed instance, by its id only (never a path from the request), checked
        to be a JPEG thumbnail and encoded again (never the stored bytes as they are: search/index.py); 503 while
        the index's database cannot be used."""
        _require_ready(0.0)
        index = runner.pipeline.index
        if index is None:
            raise NotFound("This server has no index.")
        thumbnail = None if instance_id >= 2**63 else index.thumbnail(instance_id, Deadline.after(deadline_seconds))
        if thumbnail is None:
            raise NotFound(f"No indexed instance {instance_id}.")
        response = Response(thumbnail, mimetype="image/jpeg")
        response.headers["Cache-Control"] = "max-age=3600"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/metrics")
    def metrics_route() -> Response:
        body, content_type = metrics.render(settings.metrics_dir)
        return Response(body, mimetype=content_type.split(";")[0], content_type=content_type)

    @app.get("/model")
    def model() -> Response:
        _require_ready(0.0)  # the page asks at once and retries while the model loads
        return _json_response(model_metadata(runner.pipeline, limits))

    register_page(app)

    @app.post("/invocations")
    def invocations() -> Response:
        deadline = Deadline.after(deadline_seconds)
        _require_ready(settings.ready_wait)
        pipeline = runner.pipeline
        times = StageTimes()
        g.stages = times.seconds  # logged even when a later stage fails
        body = read_body(request.stream, request.content_length, limits.max_request_bytes, settings.client_timeout)
        parsed = wire.parse_request(body, request.content_type, request.args, pipeline.default_options(),
                                    pipeline.backend.class_names, pipeline.limits,
                                    request.headers.get(CUSTOM_ATTRIBUTES_HEADER), pipeline.backend.has_masks)
        result = pipeline.handle(parsed, deadline, times)
        for name, seconds in result.stages.items():
            metrics.STAGE_SECONDS.labels(name).observe(seconds)
        metrics.IMAGES.inc(len(result.images))
        metrics.DETECTIONS.inc(result.detection_count)
        g.log_fields = {"images": len(result.images), "detections": result.detection_count,
                        "format": parsed.images[0].options.format}
        return Response(result.body, status=200, mimetype="application/json")

    return app
