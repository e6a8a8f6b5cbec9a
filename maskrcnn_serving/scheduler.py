"""The one place where images are grouped into forward calls (like Triton's dynamic batching).

Request threads :meth:`Scheduler.run` their prepared images and block until each has been through the network.
One model thread per backend takes the oldest queued image and forms its batch: the queued images with the same
:class:`PredictOptions` and the same :attr:`PreparedImage.batch_key` (the optimized backend's size bucket), up to
the backend's ``max_batch_size``. It waits at most ``max_delay`` seconds from the oldest image's arrival for the
batch to fill; while a batch runs, new images queue up and form the next batch without further delay, so batches
grow with the load and an idle server adds at most ``max_delay`` of latency (none for a backend of batch size 1).

Deadlines: an image whose request's deadline passes while it is queued is dropped before it runs; a request thread
gives up waiting at its deadline (504) and its images still queued are dropped. A running forward call cannot be
interrupted, so an overrunning request frees the model within one batch.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from maskrcnn_serving.backends.base import PredictOptions, PreparedImage
from maskrcnn_serving.deadline import NO_DEADLINE, Deadline, exceeded
from maskrcnn_serving.errors import SchedulerClosedError
from maskrcnn_serving.structures import Detections

ForwardFn = Callable[[Sequence[PreparedImage], PredictOptions], list[Detections]]


@dataclass(frozen=True)
class Forwarded:
    """One image's result: its detections and the forward call it ran in (``batch_id``, wall seconds, size)."""

    detections: Detections
    batch_id: int
    batch_seconds: float
    batch_size: int


@dataclass(eq=False)  # identity comparison: deque.remove must not compare images
class _Queued:
    image: PreparedImage
    options: PredictOptions
    deadline: Deadline
    arrived: float
    future: Future = field(default_factory=Future)

    @property
    def group(self) -> tuple:
        return self.options, self.image.batch_key


@dataclass(frozen=True)
class BatchStats:
    """Counters since start: forward calls, images, and the largest batch formed."""

    batches: int
    images: int
    largest_batch: int

    @property
    def mean_batch_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0


class Scheduler:
    """Runs ``forward`` (usually ``backend.forward``) on its own thread over batches formed from every caller's
    images; see the module docstring."""

    def __init__(self, forward: ForwardFn, max_batch_size: int = 1, max_delay: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_delay < 0:
            raise ValueError("max_delay must be >= 0")
        self._forward = forward
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self._queue: deque[_Queued] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._batch_ids = itertools.count()
        self._batches = self._images = self._largest = 0
        self._thread = threading.Thread(target=self._run, name="model-scheduler", daemon=True)
        self._thread.start()

    @classmethod
    def for_backend(cls, backend, max_delay: float = 0.0) -> Scheduler:
        """A scheduler over ``backend.forward`` with the backend's batch size."""
        return cls(backend.forward, backend.max_batch_size, max_delay)

    def run(
        self,
        images: Iterable[PreparedImage],
        options: Sequence[PredictOptions],
        deadline: Deadline = NO_DEADLINE,
        in_flight: int | None = None,
    ) -> list[Forwarded]:
        """Run each image with its options (one entry per image); blocks until all ran, in order. Raises what the
        forward call raised, or :class:`~maskrcnn_serving.errors.DeadlineExceeded` at the deadline.

        ``images`` may be lazy (a generator that prepares them): at most ``in_flight`` of them (default: all) are
        taken from it and queued or running at a time, the next one as soon as one has its result, so a request of
        many images holds a bounded number of prepared images while the queue still holds the next batch."""
        limit = in_flight if in_flight is not None else max(1, len(options))
        if limit < 1:
            raise ValueError("in_flight must be >= 1")
        source = zip(images, options, strict=True)
        pending: deque[_Queued] = deque()
        results: list[Forwarded] = []
        try:
            while True:
                self._enqueue(pending, source, limit - len(pending), deadline)
                if not pending:
                    return results
                results.append(pending[0].future.result(deadline.remaining()))
                pending.popleft()
        except (FutureTimeout, CancelledError):
            started = bool(results) or any(item.future.running() or item.future.done() for item in pending)
            raise exceeded("the model was still running" if started else
                           "it was still waiting for the model, busy with earlier requests") from None
        finally:
            for item in pending:
                item.future.cancel()  # a no-op for images that ran or are running; the others are dropped

    def _enqueue(self, pending: deque[_Queued], source: Iterator, count: int, deadline: Deadline) -> None:
        """Take up to ``count`` images from ``source`` (preparing them on the caller's thread) and queue them."""
        now = time.monotonic()
        queued = [_Queued(image, opts, deadline, now) for image, opts in itertools.islice(source, count)]
        if not queued:
            return
        with self._condition:
            if self._closed:
                raise SchedulerClosedError("The scheduler is closed.")
            self._queue.extend(queued)
            self._condition.notify_all()
        pending.extend(queued)

    @property
    def stats(self) -> BatchStats:
        with self._condition:
            return BatchStats(self._batches, self._images, self._largest)

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the model thread."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ model thread
    def _drop_dead(self) -> None:
        """Remove images whose request gave up (cancelled) or whose deadline passed (failed with 504)."""
        for item in [item for item in self._queue if item.future.cancelled() or item.deadline.expired]:
            self._queue.remove(item)
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(exceeded("it was still waiting for the model, busy with earlier requests"))

    def _next_batch(self) -> list[_Queued] | None:
        """Block until a batch is ready (full, or its oldest image waited ``max_delay``); None once closed and
        idle."""
        with self._condition:
            while True:
                self._drop_dead()
                if not self._queue:
                    if self._closed:
                        return None
                    self._condition.wait()
                    continue
                oldest = self._queue[0]
                matching = [item for item in self._queue if item.group == oldest.group][: self.max_batch_size]
                wait = oldest.arrived + self.max_delay - time.monotonic()
                if len(matching) >= self.max_batch_size or wait <= 0 or self._closed:
                    for item in matching:
                        self._queue.remove(item)
                    return matching
                expiries = [left for item in self._queue if (left := item.deadline.remaining()) is not None]
                self._condition.wait(min([wait, *expiries]))

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)
            del batch  # not held while waiting for the next one: a request bounds the prepared images it holds

    def _run_batch(self, batch: list[_Queued]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        batch_id = next(self._batch_ids)
        started = time.perf_counter()
        try:
            results = self._forward([item.image for item in live], live[0].options)
            if len(results) != len(live):
                raise RuntimeError(f"forward returned {len(results)} results for {len(live)} images")
        except BaseException as exc:  # hand every failure to the waiting requests, keep serving
            for item in live:
                item.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        with self._condition:
            self._batches += 1
            self._images += len(live)
            self._largest = max(self._largest, len(live))
        for item, detections in zip(live, results, strict=True):
            item.future.set_result(Forwarded(detections, batch_id, seconds, len(live)))
