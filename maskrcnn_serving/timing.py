"""Per-request stage timings that code deep in the call stack can contribute to without being passed a timer.

The server opens :func:`collect_stages` around a request; any code running in that thread (the wire functions, a
backend's pre-processing) wraps work in ``with stage("name"):``. Outside a collection, ``stage`` only times nothing.
A backend that runs work on another thread (a batcher) must report its stages itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[dict[str, float] | None] = ContextVar("maskrcnn_serving_stages", default=None)


@contextmanager
def collect_stages() -> Iterator[dict[str, float]]:
    """Collect ``{stage: seconds}`` (summed over repeats) for the duration of the block."""
    stages: dict[str, float] = {}
    token = _current.set(stages)
    try:
        yield stages
    finally:
        _current.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the wall time of the block to stage ``name`` of the current collection, if any."""
    stages = _current.get()
    start = time.perf_counter()
    try:
        yield
    finally:
        if stages is not None:
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
