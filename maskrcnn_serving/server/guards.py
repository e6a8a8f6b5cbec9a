"""Per-request guards: what keeps one request's trouble inside that request instead of taking a worker down.

* **Deadline.** Every ``/invocations`` request gets ``Settings.deadline_seconds`` (default 90 % of
  ``MODEL_SERVER_TIMEOUT``, i.e. 63 s of the default 70) as a :class:`~maskrcnn_serving.deadline.Deadline` that
  every pipeline stage checks; the model queue (:mod:`maskrcnn_serving.scheduler`) drops images whose deadline
  passed and the request thread stops waiting at it, answering 504 ``deadline_exceeded`` while the worker, its
  other threads and its other requests carry on. (gunicorn's ``gthread`` workers are not killed for a slow request
  -- their main loop keeps the heartbeat -- so without this a stuck request would hang until the client gives up.)
* **Memory.** ``MODEL_SERVER_WORKER_MEMORY_HEADROOM_MB`` (off by default) caps each worker's data segment at its
  size after the warm-up plus the headroom (``RLIMIT_DATA``), so an allocation that would push the container into the
  kernel's OOM killer (which kills a whole worker, or the master) fails inside the one request that made it, and
  :func:`maskrcnn_serving.errors.to_serving_error` answers such failures (``MemoryError``, OpenCV's "insufficient
  memory", TensorFlow's ``ResourceExhaustedError``) 422 ``insufficient_memory``. The first line of defence stays the
  pixel limit (``MODEL_SERVER_MAX_IMAGE_PIXELS``), checked before anything is decoded.
* **Memory given back.** After a request, a worker that holds more than its warm size (measured after the warm-up)
  plus ``MODEL_SERVER_MEMORY_RETURN_MB`` asks the allocator to give its free pages back to the kernel
  (:class:`MemoryReturn`, glibc's ``malloc_trim``): a large image's buffers are freed when the request ends, but
  glibc keeps much of that memory in its arenas (a worker stayed 2-6 GB above its warm size after hostile
  requests); docs/reliability.md has the measurements of this and of the alternatives.
* **Request bodies.** :func:`read_body` reads at most the body limit; a body declared or found over it is drained
  (bounded in bytes and time, like nginx's lingering close) before the 413, so that a client that sends its whole
  body before reading (Python's ``http.client``, curl) gets the JSON error instead of a reset connection. A body
  that stops arriving for ``MODEL_SERVER_CLIENT_TIMEOUT`` seconds (the socket timeout of
  :mod:`maskrcnn_serving.server.gunicorn_worker`) is a 408, a malformed or cut one a 400 (``to_serving_error`` with
  ``reading_body``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import threading
import time
from typing import BinaryIO

from maskrcnn_serving.errors import RequestTooLarge, to_serving_error

log = logging.getLogger("maskrcnn_serving.guards")

# An oversized body is read and thrown away up to this many bytes (then the connection is closed unread).
DRAIN_MAX_BYTES = 64 << 20
_DRAIN_CHUNK = 1 << 16


def drain(stream: BinaryIO, max_bytes: int, max_seconds: float) -> int:
    """Read and discard what is left of a body, until its end, ``max_bytes`` or ``max_seconds``; the bytes read."""
    drained, stop_at = 0, time.monotonic() + max_seconds
    try:
        while drained < max_bytes and time.monotonic() < stop_at:
            chunk = stream.read(min(_DRAIN_CHUNK, max_bytes - drained))
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass  # a stalled or broken client: the connection is closed after the answer anyway
    return drained


def read_body(stream: BinaryIO, declared: int | None, limit: int, drain_seconds: float) -> bytes:
    """The request body, at most ``limit`` bytes; 413 (after draining) when it is declared or found larger, 408 when
    it stalls, 400 when it is malformed or cut short (gunicorn raises a bad chunk size or an early close as
    ``IOError``)."""
    try:
        if declared is not None and declared > limit:
            drain(stream, DRAIN_MAX_BYTES, drain_seconds)
            raise RequestTooLarge.over_limit(limit, declared)
        body = stream.read(limit + 1)
    except OSError as exc:  # a stalled client (the socket timeout), a malformed chunk, an early close
        raise to_serving_error(exc, reading_body=True) from None
    if len(body) > limit:
        drain(stream, DRAIN_MAX_BYTES, drain_seconds)
        raise RequestTooLarge.over_limit(limit)
    return body


# ----------------------------------------------------------------------------------------------------- memory


def _data_segment_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmData not found in /proc/self/status")


def apply_memory_headroom(headroom_mb: float) -> int | None:
    """Cap this process's data segment (``RLIMIT_DATA``) at its current size plus ``headroom_mb``
    (``MODEL_SERVER_WORKER_MEMORY_HEADROOM_MB``); call it once the model is loaded and warmed up.

    Returns the limit in bytes, or None for a headroom of 0 (no limit). Allocations beyond the limit fail with
    ``MemoryError`` / OpenCV's insufficient-memory error inside the request that made them.
    """
    if headroom_mb <= 0:
        return None
    limit = _data_segment_bytes() + int(headroom_mb * 2**20)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    log.info("worker memory limit set", extra={"fields": {"rlimit_data_bytes": limit, "headroom_mb": headroom_mb}})
    return limit


def resident_bytes() -> int:
    """This process's resident memory (RSS), from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim():
    """glibc's ``malloc_trim`` (None with another C library, or under an allocator preloaded in its place)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class MemoryReturn:
    """Gives free memory back to the kernel after a request once the worker holds more than its warm size +
    ``margin_mb`` (0: never). :meth:`set_warm` records the warm size (after the warm-up); :meth:`after_request` is
    called by the worker once an answer is sent. What a trim cannot give back (caches sized by the largest request
    so far) raises the next trigger to that size + the margin, so trims follow growth instead of running after
    every request; one trim at a time."""

    def __init__(self, margin_mb: float) -> None:
        self.margin = int(margin_mb * 2**20)
        self.warm_limit: int | None = None
        self.limit: int | None = None
        self.trims = 0
        self._trim = _malloc_trim() if margin_mb > 0 else None
        self._lock = threading.Lock()

    def set_warm(self) -> None:
        if self._trim is not None:
            self.limit = self.warm_limit = resident_bytes() + self.margin

    def after_request(self) -> None:
        if self.limit is None:
            return
        before = resident_bytes()
        if before <= self.limit or not self._lock.acquire(blocking=False):
            return
        try:
            start = time.perf_counter()
            self._trim(0)
            after = resident_bytes()
            self.trims += 1
            self.limit = max(self.warm_limit, after + self.margin)
            log.info("memory returned", extra={"fields": {
                "rss_mb_before": round(before / 2**20), "rss_mb_after": round(after / 2**20),
                "trim_ms": round((time.perf_counter() - start) * 1000, 1)}})
        finally:
            self._lock.release()


# The worker's (one per process; configured by the model runner after its warm-up).
memory_return = MemoryReturn(0)


def configure_memory_return(margin_mb: float) -> MemoryReturn:
    """Set up this worker's :data:`memory_return` with its warm size as measured now (``MODEL_SERVER_MEMORY_RETURN_MB``
    over it; 0: never)."""
    global memory_return
    memory_return = MemoryReturn(margin_mb)
    memory_return.set_warm()
    return memory_return
