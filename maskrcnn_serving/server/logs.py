"""Structured logs of the server: one JSON object per line on stderr, from the master and every worker."""

from __future__ import annotations

import json
import logging
import time
from typing import Any


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, pid, message, and any ``extra={"fields": {...}}``."""

    converter = time.gmtime  # the time is written with a Z

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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
