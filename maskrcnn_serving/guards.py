"""Per-request guards: what keeps one request's trouble inside that request instead of taking a worker down.

* **Deadline.** Every ``/invocations`` request gets ``deadline_seconds()`` (default 90 % of
  ``MODEL_SERVER_TIMEOUT``, i.e. 63 s of the default 70). The model runs on a helper thread of
  :class:`DeadlinePredictor`; the request thread waits for it at most until the deadline and then answers
  504 ``deadline_exceeded`` as JSON, while the worker, its other threads and its other requests carry on. A request
  still queued for the model when its deadline passes is dropped before the model runs. (gunicorn's ``gthread``
  workers are not killed for a slow request -- their main loop keeps the heartbeat -- so without this a stuck request
  would hang until the client gives up; the seed's ``gevent`` workers were killed, with every request on them.)
* **Memory.** ``MODEL_SERVER_WORKER_MEMORY_HEADROOM_MB`` (off by default) caps each worker's data segment at its
  size after the warm-up plus the headroom (``RLIMIT_DATA``), so an allocation that would push the container into the
  kernel's OOM killer (which kills a whole worker, or the master) fails inside the one request that made it.
  :func:`translate_resource_error` turns such failures (``MemoryError``, OpenCV's "insufficient memory", TensorFlow's
  ``ResourceExhaustedError``) into a 422 ``insufficient_memory`` JSON answer. The first line of defence stays the
  pixel limit (``MODEL_SERVER_MAX_IMAGE_PIXELS``), checked from the image header before anything is decoded.
* **Slow clients.** :class:`ClientTimeout` (408) is raised when the body stops arriving for
  ``MODEL_SERVER_CLIENT_TIMEOUT`` seconds (the socket timeout set by :mod:`maskrcnn_serving.gunicorn_worker`).
"""

from __future__ import annotations

import contextvars
import logging
import os
import resource
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import ContextVar
from typing import Any

import numpy as np

from maskrcnn_serving.http_errors import InvalidRequest, ServingError

log = logging.getLogger("maskrcnn_serving.guards")

DEFAULT_TIMEOUT_SECONDS = 70.0  # the seed's MODEL_SERVER_TIMEOUT
DEADLINE_FRACTION = 0.9

_deadline: ContextVar[float | None] = ContextVar("maskrcnn_serving_deadline", default=None)


class DeadlineExceeded(ServingError):
    """504: the request could not finish within its deadline (the worker is fine; other requests are unaffected)."""

    status = 504
    code = "deadline_exceeded"


class InsufficientMemory(ServingError):
    """422: processing this image needs more memory than this worker may use."""

    status = 422
    code = "insufficient_memory"


class ClientTimeout(ServingError):
    """408: the client stopped sending the request body."""

    status = 408
    code = "client_timeout"


def body_read_error(exc: OSError) -> ServingError:
    """The answer when reading the request body fails: 408 when the client stalled (the socket timeout), 400 when
    the body is malformed or cut short (gunicorn raises a bad chunk size or an early close as ``IOError``)."""
    if isinstance(exc, TimeoutError):
        return ClientTimeout(
            "The request body stopped arriving before it was complete (MODEL_SERVER_CLIENT_TIMEOUT seconds without "
            "data)."
        )
    return InvalidRequest(f"The request body is malformed or incomplete ({type(exc).__name__}).", code="malformed_body")


def _env_float(environ: Mapping[str, str], name: str) -> float | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number.") from None


def deadline_seconds(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds a request may take: ``MODEL_SERVER_REQUEST_DEADLINE`` (0 disables it), else 90 % of
    ``MODEL_SERVER_TIMEOUT`` (at least 1 s below it), so that the JSON error always beats the invocation timeout."""
    environ = os.environ if environ is None else environ
    explicit = _env_float(environ, "MODEL_SERVER_REQUEST_DEADLINE")
    if explicit is not None:
        return explicit if explicit > 0 else None
    timeout = _env_float(environ, "MODEL_SERVER_TIMEOUT") or DEFAULT_TIMEOUT_SECONDS
    return max(0.5, min(timeout * DEADLINE_FRACTION, timeout - 1.0))


def start_request(seconds: float | None) -> None:
    """Start the deadline of the request handled by the current thread (None: no deadline)."""
    _deadline.set(None if seconds is None else time.monotonic() + seconds)


def remaining() -> float | None:
    """Seconds left before the current request's deadline (may be negative), None without a deadline."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def _exceeded(what: str) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"The request did not finish within its deadline ({what}). Send a smaller image or fewer images per "
        "request, or raise MODEL_SERVER_TIMEOUT / MODEL_SERVER_REQUEST_DEADLINE."
    )


class DeadlinePredictor:
    """Runs ``inner.predict`` on a helper thread and gives up waiting for it at the request's deadline.

    At most ``concurrency`` calls run at once (1 for a backend that runs one call at a time); a request waits for a
    slot only until its deadline, so requests queued behind a slow one fail with 504 without running the model.
    The images of one request go to the model ``chunk_size`` at a time (the backend's batch size) with the deadline
    checked before each chunk, so an overrunning request frees the model within one chunk: a running graph call
    cannot be interrupted, but the rest of the request is not computed for nobody.
    """

    def __init__(self, inner: Any, concurrency: int = 1, chunk_size: int = 1) -> None:
        self._inner = inner
        self._chunk_size = max(1, int(chunk_size))
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="model")

    def predict(self, images: Sequence[np.ndarray], options: Any) -> list:
        left = remaining()
        if left is None:
            return self._inner.predict(images, options)
        if left <= 0 or not self._slots.acquire(timeout=left):
            raise _exceeded("it was still waiting for the model, busy with earlier requests")
        try:
            # The copied context carries the deadline, and the stage timings the backend records land in this
            # request's collection.
            future = self._pool.submit(contextvars.copy_context().run, self._run_and_release, images, options)
        except BaseException:
            self._slots.release()
            raise
        try:
            return future.result(timeout=max(0.0, remaining() or 0.0))
        except FutureTimeout:
            raise _exceeded("the model was still running") from None

    def _run_and_release(self, images: Sequence[np.ndarray], options: Any) -> list:
        try:
            results: list = []
            for start in range(0, len(images), self._chunk_size):
                if start and (remaining() or 0.0) <= 0:
                    raise _exceeded("the model was still running")
                results.extend(self._inner.predict(images[start : start + self._chunk_size], options))
            return results
        finally:
            self._slots.release()


# ----------------------------------------------------------------------------------------------------- memory


def translate_resource_error(exc: BaseException) -> ServingError | None:
    """The JSON error for an exhausted resource (None for anything else, which stays a 500)."""
    if isinstance(exc, MemoryError) or _is_cv2_out_of_memory(exc) or _is_tf_resource_exhausted(exc):
        return InsufficientMemory(
            "Processing this image needs more memory than this worker may use. Send a smaller image (fewer pixels) "
            "or fewer images per request."
        )
    return None


def _is_cv2_out_of_memory(exc: BaseException) -> bool:
    import cv2

    return isinstance(exc, cv2.error) and getattr(exc, "code", None) == cv2.Error.StsNoMem


def _is_tf_resource_exhausted(exc: BaseException) -> bool:
    # Checked by name: the server must not import TensorFlow just to classify an error.
    return any(cls.__name__ == "ResourceExhaustedError" for cls in type(exc).__mro__)


def _data_segment_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmData not found in /proc/self/status")


def apply_memory_headroom(environ: Mapping[str, str] | None = None) -> int | None:
    """Cap this process's data segment (``RLIMIT_DATA``) at its current size plus
    ``MODEL_SERVER_WORKER_MEMORY_HEADROOM_MB``; call it once the model is loaded and warmed up.

    Returns the limit in bytes, or None when the variable is unset or 0 (no limit). Allocations beyond the limit
    fail with ``MemoryError`` / OpenCV's insufficient-memory error inside the request that made them.
    """
    environ = os.environ if environ is None else environ
    headroom_mb = _env_float(environ, "MODEL_SERVER_WORKER_MEMORY_HEADROOM_MB")
    if not headroom_mb or headroom_mb <= 0:
        return None
    limit = _data_segment_bytes() + int(headroom_mb * 2**20)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    log.info("worker memory limit set", extra={"fields": {"rlimit_data_bytes": limit, "headroom_mb": headroom_mb}})
    return limit
