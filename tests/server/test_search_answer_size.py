"""Answers that only their search fields make too large, on the real server with an instance index (issue 23,
defect 7): the search cases of the hostile catalogue (testsupport/hostile.search_size_cases), each with its documented
answer; a 413 comes from the answer's floor ("at least"), before any mask is pasted, and every answer carries the
security headers. The order of the work (before the search, before the masks) is proven in tests/test_pipeline.py."""

from __future__ import annotations

import cv2
import pytest
import requests

from maskrcnn_serving.server import headers
from maskrcnn_serving.settings import Limits
from testsupport.hostile import SEARCH_SERVER_MAX_RESPONSE_BYTES, search_size_cases

LIMITS = Limits(max_response_bytes=SEARCH_SERVER_MAX_RESPONSE_BYTES)


@pytest.fixture(scope="module")
def cases(example_images):
    return search_size_cases(cv2.imread(str(example_images[0]), cv2.IMREAD_COLOR), LIMITS)


def _names() -> list[str]:
    import numpy as np

    return [case.name for case in search_size_cases(np.zeros((8, 8, 3), np.uint8), LIMITS, large_images=False)]


@pytest.mark.parametrize("index", range(len(_names())), ids=_names())
def test_an_answer_too_large_with_its_search_fields_gets_its_documented_answer(index, cases, indexed_server):
    server, _, _ = indexed_server
    case = cases[index]
    response = requests.post(f"{server.url}/invocations", timeout=120, **case.request)
    assert response.status_code == case.status, (case.name, response.text[:300])
    for header, value in headers.for_status(case.status).items():
        assert response.headers.get(header) == value, (case.name, header)
    if case.status != 200:
        error = response.json()["error"]
        assert error["code"] == case.code and case.message in error["message"], (case.name, error)
    else:
        annotations = response.json()["annotations"]
        assert annotations and len(response.content) <= SEARCH_SERVER_MAX_RESPONSE_BYTES
        if "neighbours" in case.request["params"]:
            assert all(len(a["neighbours"]) == 3 and len(a["embedding"]) == 69 for a in annotations)
