"""A dynamic batcher: concurrent requests in one worker process share graph calls (like Triton's dynamic batching).

Request threads call :meth:`DynamicBatcher.submit` (one image) or :meth:`DynamicBatcher.submit_many` (the images
of one request) and block until their batch has run. One background thread forms batches: it takes the oldest
queued image, waits at most ``max_delay`` seconds from that image's arrival for more images with the same
:class:`PredictOptions` (a graph call takes one score threshold and one detection limit), up to
``max_batch_size``, then runs them in one ``predict`` call. While a batch runs, new requests queue up and form the
next batch without further delay, so batches grow with the load and an idle server adds at most ``max_delay`` of
latency.

The server uses one per worker for backends that batch (``max_batch_size`` > 1, e.g. the optimized backend with
``MASKRCNN_MAX_BATCH_SIZE``); ``MASKRCNN_MAX_BATCH_DELAY_MS`` sets the delay. gunicorn's threads per worker
(``MODEL_SERVER_THREADS``) bound how many requests can be waiting to be batched.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from maskrcnn_serving.backends.base import PredictOptions
from maskrcnn_serving.structures import Detections

DEFAULT_MAX_DELAY_MS = 10.0

PredictFn = Callable[[Sequence[np.ndarray], PredictOptions], list[Detections]]


class BatcherClosedError(RuntimeError):
    """The batcher was closed; no new work is accepted."""


@dataclass(eq=False)  # identity comparison: deque.remove must not compare images
class _Pending:
    image: np.ndarray
    options: PredictOptions
    arrived: float
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class BatchStats:
    """Counters since start: graph calls, images, and the largest batch formed."""

    batches: int
    images: int
    largest_batch: int

    @property
    def mean_batch_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0


class DynamicBatcher:
    """Collect images from many threads into batches for ``predict(images, options) -> list[Detections]``.

    ``predict`` is usually ``backend.predict`` of a backend that batches (e.g. the optimized backend with
    ``max_batch_size`` >= the batcher's). It is only ever called from the batcher's own thread.
    """

    def __init__(self, predict: PredictFn, max_batch_size: int = 8, max_delay: float = 0.01) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_delay < 0:
            raise ValueError("max_delay must be >= 0")
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self._queue: deque[_Pending] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._batches = self._images = self._largest = 0
        self._thread = threading.Thread(target=self._run, name="dynamic-batcher", daemon=True)
        self._thread.start()

    def submit(self, image: np.ndarray, options: PredictOptions | None = None, timeout: float | None = None):
        """Detect objects in one BGR uint8 image; blocks until its batch ran. Raises what ``predict`` raised."""
        return self.submit_many([image], options, timeout)[0]

    def submit_many(
        self, images: Sequence[np.ndarray], options: PredictOptions | None = None, timeout: float | None = None
    ) -> list[Detections]:
        """Detect objects in the images of one request; they may be batched with other requests' images.
        ``timeout`` (seconds) bounds the wait for the whole request (TimeoutError; the images still run)."""
        options = options or PredictOptions()
        now = time.monotonic()
        pending = [_Pending(image, options, now) for image in images]
        with self._condition:
            if self._closed:
                raise BatcherClosedError("The batcher is closed.")
            self._queue.extend(pending)
            self._condition.notify_all()
        deadline = None if timeout is None else now + timeout
        results = []
        for item in pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            results.append(item.future.result(remaining))
        return results

    def predict(self, images: Sequence[np.ndarray], options: PredictOptions | None = None) -> list[Detections]:
        """The server's ``Predictor`` interface: :meth:`submit_many` without a timeout."""
        return self.submit_many(images, options)

    @classmethod
    def for_backend(cls, backend, environ: Mapping[str, str] | None = None) -> DynamicBatcher:
        """A batcher over ``backend.predict`` with the backend's ``max_batch_size`` and a delay of
        ``MASKRCNN_MAX_BATCH_DELAY_MS`` milliseconds (default 10)."""
        environ = os.environ if environ is None else environ
        delay_ms = float(environ.get("MASKRCNN_MAX_BATCH_DELAY_MS") or DEFAULT_MAX_DELAY_MS)
        return cls(backend.predict, max_batch_size=backend.max_batch_size, max_delay=delay_ms / 1000.0)

    @property
    def stats(self) -> BatchStats:
        with self._condition:
            return BatchStats(self._batches, self._images, self._largest)

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the batching thread."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_batch(self) -> list[_Pending] | None:
        """Block until a batch is ready (full, or its oldest image waited ``max_delay``); None once closed and idle."""
        with self._condition:
            while True:
                if not self._queue:
                    if self._closed:
                        return None
                    self._condition.wait()
                    continue
                oldest = self._queue[0]
                matching = [p for p in self._queue if p.options == oldest.options][: self.max_batch_size]
                remaining = oldest.arrived + self.max_delay - time.monotonic()
                if len(matching) >= self.max_batch_size or remaining <= 0 or self._closed:
                    for item in matching:
                        self._queue.remove(item)
                    self._batches += 1
                    self._images += len(matching)
                    self._largest = max(self._largest, len(matching))
                    return matching
                self._condition.wait(remaining)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self._predict([item.image for item in live], live[0].options)
                if len(results) != len(live):
                    raise RuntimeError(f"predict returned {len(results)} results for {len(live)} images")
            except BaseException as exc:  # hand every failure to the waiting requests, keep serving
                for item in live:
                    item.future.set_exception(exc)
                continue
            for item, result in zip(live, results, strict=True):
                item.future.set_result(result)
