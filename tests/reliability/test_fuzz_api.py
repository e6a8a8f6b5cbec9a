"""Schemathesis against the server's OpenAPI document (docs/openapi.yaml), on the session's real gunicorn server.

Every operation gets generated requests -- valid ones built from the schema and invalid ones (negative testing:
wrong types, out-of-range options, missing fields, random bytes as images) -- and every answer must be a documented
status with a JSON body matching the documented schema, and never a 5xx. The server must still answer /ping
afterwards.

CI runs a bounded number of examples per operation (below). The long run:
``MASKRCNN_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/reliability/test_fuzz_api.py``
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
EXAMPLES = int(os.environ.get("MASKRCNN_FUZZ_EXAMPLES", "0")) or 25

if not OPENAPI.is_file():  # pragma: no cover - the document is part of the repository
    pytest.skip(f"{OPENAPI} is missing", allow_module_level=True)

schemathesis.serializer.alias("application/x-image", "application/octet-stream")  # raw bytes, as image/jpeg
schema = schemathesis.openapi.from_path(OPENAPI)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def http() -> requests.Session:
    return requests.Session()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found, in bounded time
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_and_never_answers_5xx(case, live_server, http):
    case.call_and_validate(base_url=live_server.url, session=http, checks=CHECKS, timeout=120)


def test_server_answers_ping_after_the_api_fuzzing(live_server, http):
    assert live_server.alive()
    assert http.get(f"{live_server.url}/ping", timeout=10).status_code == 200
