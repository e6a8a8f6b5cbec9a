"""server/logs.py: one JSON object per line, with the record's fields, in UTC; ``configure_logging`` makes it the
only handler of a process (checked in a child process, whose logging the test may take over)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from maskrcnn_serving.server.logs import JsonLogFormatter


def _record(message: str, *args, fields: dict | None = None, exc_info=None) -> logging.LogRecord:
    record = logging.getLogger("maskrcnn_serving.test").makeRecord(
        "maskrcnn_serving.test", logging.WARNING, __file__, 1, message, args, exc_info)
    if fields is not None:
        record.fields = fields
    return record


def test_a_record_is_one_json_object_with_its_fields():
    record = _record("served %d images", 3, fields={"request_id": "r1", "path": Path("/a")})
    entry = json.loads(JsonLogFormatter().format(record))
    assert entry == {"time": entry["time"], "level": "WARNING", "logger": "maskrcnn_serving.test", "pid": os.getpid(),
                     "message": "served 3 images", "request_id": "r1", "path": "/a"}  # not JSON: as text
    utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    assert entry["time"] == f"{utc}.{int(record.msecs):03d}Z"
    assert json.loads(JsonLogFormatter().format(_record("plain")))["message"] == "plain"  # no fields


def test_an_exception_stays_on_one_line():
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        line = JsonLogFormatter().format(_record("failed", exc_info=sys.exc_info()))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["exception"].startswith("Traceback") and "ValueError: broken\nacross lines" in entry["exception"]


def test_configure_logging_makes_json_lines_on_stderr_in_utc():
    script = (
        "import logging, time\n"
        "logging.basicConfig(format='plain %(message)s')\n"
        "from maskrcnn_serving.server.logs import configure_logging\n"
        "configure_logging('debug')\n"
        "logging.getLogger('maskrcnn_serving.x').debug('first', extra={'fields': {'n': 1}})\n"
        "print(time.strftime('%Y-%m-%dT%H:%M', time.gmtime()), flush=True)\n"
        "print(len(logging.getLogger().handlers))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True,
                            env={**os.environ, "TZ": "Pacific/Kiritimati"})  # UTC+14: local time is never UTC
    utc_minute, handlers = result.stdout.split()
    entry = json.loads(result.stderr.strip())  # one line, the basicConfig handler replaced
    assert handlers == "1"
    assert (entry["level"], entry["logger"], entry["message"]) == ("DEBUG", "maskrcnn_serving.x", "first")
    assert entry["n"] == 1
    assert entry["time"][:16] in (utc_minute, _minute_before(utc_minute))


def _minute_before(minute: str) -> str:
    return (datetime.datetime.fromisoformat(minute) - datetime.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
