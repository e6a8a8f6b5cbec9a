"""Native output kept out of the terminal: what C++ code (TensorFlow's start-up notices, oneDNN, "failed call to
cuInit") writes to file descriptor 2 before any Python log level applies is caught at the descriptor and shown only
when it explains a failure. Used by the CLI and by the gunicorn master that ``serve`` starts."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

# How much of the captured native output a failed command shows.
NATIVE_LOG_TAIL_BYTES = 16384
_terminal_streams: list = []


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[Callable[[], str]]:
    """Send what native code writes to file descriptor 2 into a temporary file, while Python's ``sys.stderr``
    (progress bars, messages, logs set up inside the block) writes to the terminal. Yields a function that returns
    the captured tail. The terminal stream stays open afterwards: handlers created inside may still hold it."""
    sys.stderr.flush()
    terminal = os.dup(2)
    capture = tempfile.TemporaryFile()
    python_stderr = sys.stderr
    sys.stderr = open(terminal, "w", buffering=1, encoding=python_stderr.encoding, errors="replace")  # noqa: SIM115
    _terminal_streams.append(sys.stderr)  # kept open for good: log handlers made inside may still write to it
    os.dup2(capture.fileno(), 2)

    def tail() -> str:
        capture.flush()
        capture.seek(max(0, capture.seek(0, os.SEEK_END) - NATIVE_LOG_TAIL_BYTES))
        return capture.read().decode(errors="replace")

    try:
        yield tail
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        sys.stderr = python_stderr
        capture.close()
