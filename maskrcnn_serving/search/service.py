"""The instance index as the server uses it: a dependency that can fail, and is treated as one.

The server's workers never call :class:`~maskrcnn_serving.search.index.InstanceIndex` directly, but through one
:class:`SearchService` each:

* **Bounded.** Every database call of a request runs on the service's own threads; the request waits for it at most
  ``timeout`` seconds (``MODEL_SERVER_INDEX_TIMEOUT``), and never past its own deadline. A database that is stalled
  (e.g. SIGSTOP), slow or gone cannot hold a request thread longer than that: the call is abandoned (its thread ends
  when pymilvus's own timeout, the same ``timeout``, fires).
* **A circuit.** The first failure -- an error, or a call over ``timeout`` -- marks search unavailable. From then
  on, a request that asks for neighbours (or a thumbnail) is answered 503 ``search_unavailable`` at once, before any
  of its work and without calling the database; requests without neighbours are not affected.
* **Recovery by itself.** While search is unavailable, one thread (the watcher) reconnects at once, then every
  second or so (backing off to ``MAX_RETRY_SECONDS``), and loads the collections again, since a restarted database
  holds them released; once that works, search is available again. For a local Milvus Lite folder it only
  connects: ``serve`` restarts the database process itself
  (:func:`maskrcnn_serving.search.database.keep_local_server`).
* **The truth.** While search is available, the watcher asks the database every ``HEARTBEAT_SECONDS`` whether it
  answers with both collections loaded, so an outage is noticed without traffic. :attr:`SearchService.available`
  (``GET /model``'s ``search.available``) and ``on_change`` (the server's metrics) say whether search works now.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

import numpy as np

from maskrcnn_serving.deadline import NO_DEADLINE, Deadline, exceeded
from maskrcnn_serving.errors import DatabaseError, SearchUnavailable
from maskrcnn_serving.search.index import InstanceIndex, Neighbour

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_SECONDS = 1.0  # between reconnection attempts after the first (at once), doubling up to:
MAX_RETRY_SECONDS = 5.0
HEARTBEAT_SECONDS = 2.0  # between two checks that an available database still answers
CALL_THREADS = 8  # database calls of requests in flight at once (a worker has a few request threads)


class SearchService:
    """The index ``collection`` of ``db`` for the server; see the module docstring. ``dim``: the model's vector
    length (an index of another length is refused). ``timeout``: seconds a database call may take.
    ``start_database``: whether this process may start a local database process (the server's workers: no).
    ``on_change(available)``: called on every change of availability after :meth:`open` said the first state.
    :meth:`open` before use."""

    def __init__(
        self,
        db: str,
        collection: str,
        dim: int | None,
        timeout: float,
        start_database: bool = False,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.db, self.collection, self.dim, self.timeout = db, collection, dim, timeout
        self.start_database = start_database
        self._on_change = on_change
        self._index: InstanceIndex | None = None
        self._available = threading.Event()
        self._closed = threading.Event()
        self._wake = threading.Event()  # search was lost: the watcher starts reconnecting at once
        self._first_attempt = threading.Event()  # the watcher's first attempt to open the index is over
        self._announced_down = False  # on_change(False) was said (or open() returned False): say on_change(True)
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._calls = ThreadPoolExecutor(max_workers=CALL_THREADS, thread_name_prefix="index-call")

    # ------------------------------------------------------------------------------------------ lifecycle
    def open(self, wait: float | None = None) -> bool:
        """Start the watcher, which opens the index at once, and wait for its first attempt at most ``wait``
        seconds (default ``timeout``): a database that is down or stalled does not hold back the worker that opens
        it while its model loads; search then starts unavailable and becomes available when the index opens.
        Returns whether search is available."""
        self._wake.set()
        self._watcher = threading.Thread(target=self._watch, name="index-watcher", daemon=True)
        self._watcher.start()
        self._first_attempt.wait(self.timeout if wait is None else wait)
        with self._lock:
            available = self._available.is_set()
            if not available:
                self._announced_down = True
        if not available and not self._first_attempt.is_set():
            log.warning("instance search unavailable", extra={"fields": {
                "db": self.db, "reason": f"the index did not open within {self.timeout:g} s; still trying"}})
        return available

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._calls.shutdown(wait=False, cancel_futures=True)
        if self._index is not None:
            self._index.close()

    @property
    def available(self) -> bool:
        return self._available.is_set()

    def check_available(self) -> None:
        """Raise :class:`SearchUnavailable` (503) at once while search is unavailable."""
        if not self._available.is_set():
            raise SearchUnavailable.outage()

    # ------------------------------------------------------------------------------------------ calls
    def search(
        self, vectors: np.ndarray, k: int, category_ids: Sequence[int] | None = None, deadline: Deadline = NO_DEADLINE
    ) -> list[list[Neighbour]]:
        """:meth:`InstanceIndex.search`, bounded; raises :class:`SearchUnavailable` or
        :class:`~maskrcnn_serving.errors.DeadlineExceeded`."""
        return self._run(lambda index: index.search(vectors, k, category_ids), deadline, "searching the index")

    def thumbnail(self, instance_id: int, deadline: Deadline = NO_DEADLINE) -> bytes | None:
        """:meth:`InstanceIndex.thumbnail` (checked JPEG bytes, None for an unknown id), bounded."""
        return self._run(lambda index: index.thumbnail(instance_id), deadline, "reading a thumbnail")

    def count(self) -> int | None:
        """Instances in the index; None while search is unavailable (never raises, never waits past ``timeout``)."""
        try:
            return self._run(lambda index: index.count(), NO_DEADLINE, "counting the index")
        except SearchUnavailable:
            return None

    def _run(self, operation: Callable[[InstanceIndex], T], deadline: Deadline, doing: str) -> T:
        """``operation(index)`` on a call thread, waited for at most ``timeout`` and until the deadline."""
        self.check_available()
        index = self._index
        remaining = deadline.remaining()
        limit = self.timeout if remaining is None else min(self.timeout, remaining)
        if limit <= 0:
            raise exceeded(f"it was still {doing}")
        try:
            future = self._calls.submit(operation, index)
        except RuntimeError:  # closed
            raise SearchUnavailable.outage() from None
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            future.cancel()
            if limit < self.timeout:  # the request's own deadline came first: the database may be fine...
                if self._available.is_set():
                    raise exceeded(f"it was still {doing}") from None
                raise SearchUnavailable.outage() from None  # ...unless another call found it down meanwhile
            self._lost(f"{doing} took more than {self.timeout:g} s")
        except DatabaseError as exc:
            self._lost(str(exc))
        raise SearchUnavailable.outage()

    # ------------------------------------------------------------------------------------------ the circuit
    def _open_index(self) -> InstanceIndex:
        return InstanceIndex.open(self.db, self.collection, dim=self.dim, timeout=self.timeout,
                                  start_database=self.start_database, reconnect=False)

    def _lost(self, reason: str) -> None:
        """Search is unavailable from now on (logged once per outage); the watcher reconnects."""
        with self._lock:
            was_available = self._available.is_set()
            self._available.clear()
            self._announced_down = self._announced_down or was_available
        self._wake.set()
        if was_available:
            log.warning("instance search unavailable", extra={"fields": {"db": self.db, "reason": reason}})
            if self._on_change is not None:
                self._on_change(False)

    def _watch(self) -> None:
        """The watcher: a heartbeat while search is available, attempts to open or reconnect while it is not (the
        first one at once)."""
        delay = RETRY_SECONDS
        attempts = 0
        while True:
            woken = self._wake.wait(HEARTBEAT_SECONDS if self._available.is_set() else delay)
            self._wake.clear()
            if self._closed.is_set():
                return
            if self._available.is_set():
                try:
                    self._index.check_loaded()
                except DatabaseError as exc:
                    self._lost(f"the heartbeat failed: {exc}")
                continue
            if not woken:
                delay = min(2 * delay, MAX_RETRY_SECONDS)
            attempts += 1
            try:
                if self._index is None:
                    self._index = self._open_index()
                else:
                    self._index.reconnect()
                self._index.check_loaded()
            except DatabaseError as exc:
                if attempts == 1 and not self._first_attempt.is_set():
                    log.warning("instance search unavailable", extra={"fields": {
                        "db": self.db, "reason": f"cannot open the index: {exc}"}})
                else:
                    log.debug("instance index still unavailable: %s", exc)
                self._first_attempt.set()
                continue
            with self._lock:
                self._available.set()
                announce, self._announced_down = self._announced_down, False
            self._first_attempt.set()
            if announce:
                log.info("instance search available again", extra={"fields": {"db": self.db, "attempts": attempts}})
            attempts, delay = 0, RETRY_SECONDS
            if announce and self._on_change is not None:
                self._on_change(True)
