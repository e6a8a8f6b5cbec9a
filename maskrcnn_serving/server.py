"""The HTTP server (Flask, run by gunicorn through ``maskrcnn-serving serve``): SageMaker's serving contract.

Routes: ``GET /ping`` (200 only once the model is loaded AND warmed up, else 503), ``POST /invocations``,
``GET /execution-parameters`` (Batch Transform), ``GET /metrics`` (Prometheus text).

The server only moves bytes: :mod:`maskrcnn_serving.wire` parses and encodes, a :class:`Predictor` runs the model,
errors become HTTP responses in one handler (:mod:`maskrcnn_serving.http_errors`), and every request is measured
per stage and logged as one JSON line with its request id.

Each gunicorn worker builds one app and one :class:`ModelRunner`: the model loads and warms up on a background
thread so that ``/ping`` can answer 503 (instead of hanging) while that happens.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from maskrcnn_serving import metrics, wire
from maskrcnn_serving.guards import (
    DeadlinePredictor,
    apply_memory_headroom,
    body_read_error,
    deadline_seconds,
    start_request,
    translate_resource_error,
)
from maskrcnn_serving.http_errors import (
    INTERNAL_ERROR_CODE,
    NotReady,
    PayloadTooLarge,
    ServingError,
    error_body,
    from_http_exception,
)
from maskrcnn_serving.structures import Detections
from maskrcnn_serving.timing import collect_stages, stage

log = logging.getLogger("maskrcnn_serving.server")
access_log = logging.getLogger("maskrcnn_serving.access")

CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET_ROUTES = ("/ping", "/metrics")
DEFAULT_READY_WAIT = 10.0


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer.") from None


@dataclass(frozen=True)
class ServerSettings:
    """What one worker needs to know. ``from_env`` reads the ``MODEL_SERVER_*`` variables (the CLI sets them)."""

    model_dir: str | None = None
    backend: str = "tensorpack"
    limits: wire.Limits = field(default_factory=wire.Limits)
    workers: int = 1
    # Seconds an /invocations request waits for a worker still loading (another worker may already answer /ping).
    ready_wait: float = DEFAULT_READY_WAIT
    warmup: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerSettings:
        environ = os.environ if environ is None else environ
        defaults = wire.Limits()
        return cls(
            model_dir=environ.get("SM_MODEL_DIR") or None,
            backend=environ.get("MODEL_SERVER_BACKEND") or "tensorpack",
            limits=wire.Limits(
                max_request_bytes=_env_int(environ, "MODEL_SERVER_MAX_REQUEST_BYTES", defaults.max_request_bytes),
                max_response_bytes=_env_int(environ, "MODEL_SERVER_MAX_RESPONSE_BYTES", defaults.max_response_bytes),
                max_image_pixels=_env_int(environ, "MODEL_SERVER_MAX_IMAGE_PIXELS", defaults.max_image_pixels),
                max_images=_env_int(environ, "MODEL_SERVER_MAX_IMAGES", defaults.max_images),
            ),
            workers=_env_int(environ, "MODEL_SERVER_WORKERS", 1),
            ready_wait=float(environ.get("MODEL_SERVER_READY_WAIT") or DEFAULT_READY_WAIT),
        )


class Predictor(Protocol):
    """The single entry point the server calls to run the model; must be safe to call from several threads."""

    def predict(self, images: Sequence[np.ndarray], options: Any) -> list[Detections]: ...


class SerializedPredictor:
    """Runs a backend one call at a time (backends are single-threaded per instance).

    A batching backend plugs in here instead: anything with a thread-safe ``predict(images, options)`` (e.g. a
    dynamic batcher that merges concurrent calls into one ``max_batch_size > 1`` backend call) can replace it
    through :func:`make_predictor`.
    """

    def __init__(self, backend) -> None:
        self._backend = backend
        self._lock = threading.Lock()

    def predict(self, images, options):
        with self._lock:
            return self._backend.predict(images, options)


def make_predictor(backend) -> Predictor:
    """The predictor the server uses for ``backend``, bounded by each request's deadline: one call at a time, or,
    for a backend that batches (``max_batch_size`` > 1), a dynamic batcher that merges concurrent requests."""
    batch_size = getattr(backend, "max_batch_size", 1) or 1
    if batch_size > 1:
        from maskrcnn_serving.batching import DynamicBatcher

        # Up to two batches of requests may wait: one forming while the previous one runs.
        return DeadlinePredictor(DynamicBatcher.for_backend(backend), concurrency=2 * batch_size,
                                 chunk_size=batch_size)
    return DeadlinePredictor(SerializedPredictor(backend), concurrency=1, chunk_size=batch_size)


def warmup_image(short_edge: int) -> np.ndarray:
    """A deterministic textured BGR image at the model's test size (short edge x 4/3 of it)."""
    height, width = short_edge, int(short_edge * 4 / 3)
    yy, xx = np.mgrid[0:height, 0:width]
    base = ((xx * 255) // max(1, width - 1)).astype(np.uint8)
    image = np.dstack([base, ((yy * 255) // max(1, height - 1)).astype(np.uint8), 255 - base])
    image[height // 4 : height // 2, width // 4 : width // 2] = (40, 200, 40)
    return image


class ModelRunner:
    """Owns the model of one worker: loads it, runs one warm-up inference, then serves ``predict``.

    State: ``loading`` -> ``warming_up`` -> ``ready``, or ``failed`` (the message says why; the worker keeps
    answering 503 with it, so the cause is visible in both the logs and the responses).
    """

    def __init__(self, backend_name: str = "tensorpack", model_dir: str | None = None, backend=None) -> None:
        self.backend_name = backend_name
        self.model_dir = model_dir
        self.backend = backend
        self.predictor: Predictor | None = None
        self.state = "loading"
        self.message = "The model is loading."
        self.load_seconds: float | None = None
        self.warmup_seconds: float | None = None
        self._ready = threading.Event()
        self._settled = threading.Event()  # ready or failed
        self._thread: threading.Thread | None = None

    def start(self, background: bool = True) -> ModelRunner:
        """Load (unless a backend was given) and warm up, on a daemon thread when ``background``."""
        if background:
            self._thread = threading.Thread(target=self._settle, name="model-loader", daemon=True)
            self._thread.start()
        else:
            self._settle()
        return self

    def _settle(self) -> None:
        try:
            self._load_and_warm_up()
        finally:
            self._settled.set()

    def _load_and_warm_up(self) -> None:
        try:
            start = time.perf_counter()
            if self.backend is None:
                from maskrcnn_serving.backends.base import load_backend

                # Several workers share one GPU: TensorFlow must allocate GPU memory on demand instead of taking
                # it all at start-up (read when TF initializes the GPU, i.e. during this load; for TF1 sessions and
                # TF2 alike). An explicit TF_FORCE_GPU_ALLOW_GROWTH=false from the user wins.
                os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
                self.backend = load_backend(self.backend_name, self.model_dir)
            self.load_seconds = time.perf_counter() - start
            self.state, self.message = "warming_up", "The model is loaded and running its warm-up inference."
            log.info("model loaded", extra={"fields": {"load_seconds": round(self.load_seconds, 3)}})
            self.predictor = make_predictor(self.backend)
            start = time.perf_counter()
            self._warm_up()
            self.warmup_seconds = time.perf_counter() - start
            apply_memory_headroom()  # opt-in RLIMIT_DATA, measured from the loaded, warmed-up model
        except Exception as exc:  # noqa: BLE001 - any failure must be reported, the worker stays up to say so
            # Clients see the kind of failure only: the loader's message names files on the server (in the log).
            self.state = "failed"
            self.message = f"The model failed to load ({type(exc).__name__}); the server log has the details."
            log.exception("model load failed")
            return
        self.state, self.message = "ready", "ready"
        log.info("model ready", extra={"fields": {"warmup_seconds": round(self.warmup_seconds, 3)}})
        self._ready.set()

    def _warm_up(self) -> None:
        from maskrcnn_serving.backends.base import PredictOptions

        config = self.backend.bundle.config
        # Threshold 0 so that the mask head and the encoders run on real detections too.
        dets = self.predictor.predict([warmup_image(config.short_edge_size)], PredictOptions(score_threshold=0.0))
        options = wire.RequestOptions(score_threshold=0.0, format="legacy" if self.has_masks else "boxes")
        wire.encode_annotations(dets[0], options, wire.paste_patches(dets[0], options))

    def wait_ready(self, timeout: float) -> bool:
        """Whether the model is ready, waiting up to ``timeout`` seconds while it is still loading (not after a
        failure)."""
        if timeout > 0 and not self._settled.is_set():
            self._settled.wait(timeout)
        return self._ready.is_set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def config(self):
        return self.backend.bundle.config

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.backend.class_names

    @property
    def has_masks(self) -> bool:
        return bool(self.backend.bundle.architecture.is_mask_rcnn)

    def default_options(self) -> wire.RequestOptions:
        """The seed tensorpack container's behaviour: score threshold ``TEST.RESULT_SCORE_THRESH_VIS``, mask
        threshold 0.5, ``TEST.RESULTS_PER_IM`` detections, legacy format (boxes for a model without masks)."""
        return wire.RequestOptions(
            score_threshold=float(self.config["TEST.RESULT_SCORE_THRESH_VIS"]),
            mask_threshold=0.5,
            max_detections=None,
            classes=None,
            format="legacy" if self.has_masks else "boxes",
        )


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, and any ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Structured (JSON lines) logs on stderr for the server process and its workers."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    handler.formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _request_id() -> str:
    for header in ("X-Request-Id", "X-Amzn-RequestId"):
        value = request.headers.get(header, "")
        if _REQUEST_ID_RE.match(value):
            return value
    return uuid.uuid4().hex


def _json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def _error_response(status: int, code: str, message: str) -> Response:
    response = Response(error_body(code, message), status=status, mimetype="application/json")
    if status == 503:
        response.headers["Retry-After"] = "5"
    return response


def create_app(settings: ServerSettings | None = None, runner: ModelRunner | None = None) -> Flask:
    """The Flask app of one worker. Without ``runner``, starts loading ``settings.model_dir`` in the background."""
    settings = settings or ServerSettings.from_env()
    if runner is None:
        runner = ModelRunner(settings.backend, settings.model_dir).start(background=True)
    app = Flask("maskrcnn_serving")
    app.extensions["maskrcnn_runner"] = runner
    limits = settings.limits
    request_deadline = deadline_seconds()

    @app.before_request
    def _start() -> None:
        start_request(request_deadline)
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
        if isinstance(exc, ServingError):
            g.log_fields = {**g.get("log_fields", {}), "error_code": exc.code}
            return _error_response(exc.status, exc.code, exc.message)
        if isinstance(exc, HTTPException):
            response = _error_response(*from_http_exception(exc))
            for name, value in exc.get_headers():  # e.g. Allow on 405
                if name.lower() != "content-type":
                    response.headers[name] = value
            return response
        resource_error = translate_resource_error(exc)  # out of memory: this request fails, the worker lives
        if resource_error is not None:
            log.warning("resource exhausted", exc_info=exc, extra={"fields": {"request_id": g.get("request_id")}})
            return _handle_error(resource_error)
        request_id = g.get("request_id", "-")
        log.error("unhandled error", exc_info=exc, extra={"fields": {"request_id": request_id}})
        message = f"Internal server error; the server log has the details under request id {request_id}."
        return _error_response(500, INTERNAL_ERROR_CODE, message)

    def _require_ready(wait: float) -> None:
        if not runner.wait_ready(wait):
            raise NotReady(runner.message)

    @app.get("/ping")
    def ping() -> Response:
        _require_ready(0.0)  # health checks get an immediate answer
        return _json_response({"status": "ready", "worker_pid": os.getpid()})

    @app.get("/execution-parameters")
    def execution_parameters() -> Response:
        return _json_response(
            {
                "MaxConcurrentTransforms": max(1, settings.workers),
                "BatchStrategy": "SINGLE_RECORD",
                "MaxPayloadInMB": max(1, limits.max_request_bytes // wire.MiB),
            }
        )

    @app.get("/metrics")
    def metrics_route() -> Response:
        body, content_type = metrics.render()
        return Response(body, mimetype=content_type.split(";")[0], content_type=content_type)

    @app.post("/invocations")
    def invocations() -> Response:
        _require_ready(settings.ready_wait)
        with collect_stages() as stages:
            g.stages = stages
            body = _read_body(limits.max_request_bytes)
            parsed = wire.parse_request(
                body,
                request.content_type,
                request.args,
                runner.default_options(),
                runner.class_names,
                limits,
                request.headers.get(CUSTOM_ATTRIBUTES_HEADER),
                runner.has_masks,
            )
            with stage("decode"):
                images = wire.decode_images(parsed.images, limits.max_image_pixels)
            detections = _run_model(runner, parsed.images, images, stages)
            default_max = int(runner.config["TEST.RESULTS_PER_IM"])
            with stage("postprocess"):
                selected = [
                    wire.filter_detections(dets, item.options, default_max)
                    for dets, item in zip(detections, parsed.images, strict=True)
                ]
                patches = [
                    wire.paste_patches(dets, item.options) for dets, item in zip(selected, parsed.images, strict=True)
                ]
            with stage("encode"):
                responses = [
                    wire.image_response(item.img_id, wire.encode_annotations(dets, item.options, item_patches))
                    for dets, item, item_patches in zip(selected, parsed.images, patches, strict=True)
                ]
                payload = wire.encode_response(responses, parsed.is_list, limits)
        for name, seconds in stages.items():
            metrics.STAGE_SECONDS.labels(name).observe(seconds)
        count = sum(len(d) for d in selected)
        metrics.IMAGES.inc(len(images))
        metrics.DETECTIONS.inc(count)
        g.log_fields = {"images": len(images), "detections": count, "format": parsed.images[0].options.format}
        return Response(payload, status=200, mimetype="application/json")

    return app


def _read_body(limit: int) -> bytes:
    """The request body, refusing (413) before reading when the declared length is over ``limit``."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"The request body has {declared} bytes; the limit is {limit}. Send a smaller image (or fewer images per "
            "request), or raise MODEL_SERVER_MAX_REQUEST_BYTES.",
            code="request_too_large",
        )
    try:
        return request.stream.read(limit + 1)
    except OSError as exc:  # a stalled client (gunicorn_worker's socket timeout), a malformed chunk, an early close
        raise body_read_error(exc) from None


def _run_model(
    runner: ModelRunner, items: Sequence[wire.ImageRequest], images: Sequence[np.ndarray], stages: dict[str, float]
) -> list[Detections]:
    """Run the model once per distinct (score threshold, detection count) among the request's images.

    With a class filter, the model is asked for at least ``TEST.RESULTS_PER_IM`` detections so that filtering
    happens on the full list; ``max_detections`` is applied after it.
    """
    from maskrcnn_serving.backends.base import PredictOptions

    default_max = int(runner.config["TEST.RESULTS_PER_IM"])
    groups: dict[PredictOptions, list[int]] = {}
    for index, item in enumerate(items):
        opts = item.options
        graph_max = opts.max_detections
        if opts.classes is not None:
            graph_max = max(opts.max_detections or default_max, default_max)
        groups.setdefault(PredictOptions(opts.score_threshold, graph_max), []).append(index)
    results: list[Detections | None] = [None] * len(items)
    for predict_options, indices in groups.items():
        before = stages.get("preprocess", 0.0)
        start = time.perf_counter()
        outputs = runner.predictor.predict([images[i] for i in indices], predict_options)
        # A backend may report its own pre-processing (timing.stage("preprocess")); the rest is the model.
        model_seconds = time.perf_counter() - start - (stages.get("preprocess", 0.0) - before)
        stages["model"] = stages.get("model", 0.0) + model_seconds
        for index, dets in zip(indices, outputs, strict=True):
            results[index] = dets
    return results  # type: ignore[return-value]
