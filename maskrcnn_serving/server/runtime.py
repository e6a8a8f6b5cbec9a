"""The model lifecycle of one server worker: load the backend, build its pipeline, warm up, report readiness.

State: ``loading`` -> ``warming_up`` -> ``ready``, or ``failed`` (the message says why; the worker keeps answering
503 with it, so the cause is visible in both the logs and the responses). Loading runs on a background thread so
that ``/ping`` answers 503 at once instead of hanging while it happens. Under ``serve`` every change of state is
published in the readiness directory (:mod:`.readiness`), which ``/ping`` is answered from.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import cv2
import numpy as np

from maskrcnn_serving.backends.base import Backend, load_backend
from maskrcnn_serving.pipeline import Pipeline
from maskrcnn_serving.request import RequestOptions
from maskrcnn_serving.scheduler import Scheduler
from maskrcnn_serving.server import metrics
from maskrcnn_serving.server.guards import apply_memory_headroom, configure_memory_return
from maskrcnn_serving.server.readiness import WorkerReadiness, WorkerState
from maskrcnn_serving.settings import Settings

if TYPE_CHECKING:
    from maskrcnn_serving.search.service import SearchService

log = logging.getLogger("maskrcnn_serving.server")


def warmup_image(short_edge: int) -> np.ndarray:
    """A deterministic textured BGR image at the model's test size (short edge x 4/3 of it)."""
    height, width = short_edge, int(short_edge * 4 / 3)
    yy, xx = np.mgrid[0:height, 0:width]
    base = ((xx * 255) // max(1, width - 1)).astype(np.uint8)
    image = np.dstack([base, ((yy * 255) // max(1, height - 1)).astype(np.uint8), 255 - base])
    image[height // 4 : height // 2, width // 4 : width // 2] = (40, 200, 40)
    return image


def warm_up(pipeline: Pipeline) -> None:
    """What a worker runs before ``/ping`` says ready: the backend's own warm-up (every graph traced, every
    compilation done), then one PNG at the test size through the whole pipeline, score threshold 0 so that the mask
    head and the encoders run on real detections too (its answer is not sent anywhere, so it is not held to the
    response size limit)."""
    pipeline.backend.warm_up()
    png = cv2.imencode(".png", warmup_image(pipeline.inference.short_edge_size))[1].tobytes()
    options = RequestOptions(score_threshold=0.0, format=pipeline.default_options().format)
    for _ in pipeline.run_files([png], options):
        pass


class ModelRunner:
    """Owns the model of one worker; see the module docstring. ``backend``: an already loaded backend (tests)."""

    def __init__(self, settings: Settings | None = None, backend: Backend | None = None) -> None:
        self.settings = settings or Settings()
        self.backend = backend
        self.pipeline: Pipeline | None = None
        self.readiness = WorkerReadiness(self.settings.readiness_dir) if self.settings.readiness_dir else None
        self.state, self.message = "", ""
        self._set_state("loading", "The model is loading.")
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
        settings = self.settings
        try:
            start = time.perf_counter()
            if self.backend is None:
                self.backend = load_backend(settings.backend, settings.model_dir, settings)
            self.load_seconds = time.perf_counter() - start
            self._set_state("warming_up", "The model is loaded and running its warm-up inference.")
            log.info("model loaded", extra={"fields": {"load_seconds": round(self.load_seconds, 3),
                                                        **self.backend.description}})
            # A lone request waits for others to share its graph call only where calls can be shared.
            delay = settings.max_batch_delay_ms / 1000.0 if self.backend.max_batch_size > 1 else 0.0
            index = self._open_index() if settings.index else None
            self.pipeline = Pipeline(self.backend, Scheduler.for_backend(self.backend, delay), settings.limits, index)
            start = time.perf_counter()
            warm_up(self.pipeline)
            self.warmup_seconds = time.perf_counter() - start
            # opt-in RLIMIT_DATA, measured from the loaded, warmed-up model
            apply_memory_headroom(settings.worker_memory_headroom_mb)
            configure_memory_return(settings.memory_return_mb)  # the warm size, measured now
        except Exception as exc:  # noqa: BLE001 - any failure must be reported, the worker stays up to say so
            # Clients see the kind of failure only: the loader's message names files on the server (in the log).
            log.exception("model load failed")
            self._set_state("failed", f"The model failed to load ({type(exc).__name__}); the server log has the "
                            "details.")
            return
        self._ready.set()
        log.info("model ready", extra={"fields": {"warmup_seconds": round(self.warmup_seconds, 3)}})
        self._set_state("ready", "ready")

    def _set_state(self, state: str, message: str) -> None:
        self.state, self.message = state, message
        if self.readiness is not None:
            self.readiness.publish(self.worker_state)

    @property
    def worker_state(self) -> WorkerState:
        return WorkerState(self.state, self.message)

    def _open_index(self) -> SearchService:
        """The worker's instance search (``settings.index``). It never starts a database process (``serve`` owns the
        local one) and never fails the worker: while the database cannot be used, search is unavailable (503 for
        neighbours, detections served) and comes back by itself (:mod:`maskrcnn_serving.search.service`)."""
        from maskrcnn_serving.search.service import SearchService

        settings = self.settings
        collection = settings.index_collection
        service = SearchService(settings.index, collection, self.backend.embedding_dim, settings.index_timeout,
                                start_database=False,
                                on_change=lambda available: metrics.search_available(collection, available))
        if service.open():
            log.info("instance index open", extra={"fields": {"collection": collection,
                                                               "instances": service.count()}})
        metrics.search_available(collection, service.available, changed=False)
        return service

    def wait_ready(self, timeout: float) -> bool:
        """Whether the model is ready, waiting up to ``timeout`` seconds while it is still loading (not after a
        failure)."""
        if timeout > 0 and not self._settled.is_set():
            self._settled.wait(timeout)
        return self._ready.is_set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()
