"""errors.py: one status per code, the message factories, and ``to_serving_error``, the one mapping of any exception
(ours, werkzeug's, gunicorn's and nginx's statuses, exhausted resources, a failed body read, a fault) to what the
client gets. Every exception class of the package is declared in errors.py."""

from __future__ import annotations

import ast
import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest
from werkzeug import exceptions as werkzeug_exceptions

from maskrcnn_serving import errors
from maskrcnn_serving.errors import (
    ClientTimeout,
    HttpStatusError,
    InternalError,
    MalformedChunkedBody,
    RequestTooLarge,
    ServingError,
    TooManyPixels,
    to_serving_error,
)

PACKAGE = Path(errors.__file__).parent


def _serving_errors() -> list[type[ServingError]]:
    found, pending = [], [ServingError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_code_has_one_status():
    statuses: dict[str, set[int]] = {}
    for cls in _serving_errors():
        statuses.setdefault(cls.code, set()).add(cls.status)
    assert {code: s for code, s in statuses.items() if len(s) > 1} == {}
    assert statuses["request_too_large"] == {413} and statuses["bad_http_request"] == {400}


def test_our_errors_are_answered_as_they_are():
    error = TooManyPixels("too many")
    assert to_serving_error(error) is error
    assert to_serving_error(error, request_id="r", reading_body=True) is error


def test_resource_errors_become_422_and_others_stay_500():
    assert to_serving_error(MemoryError()).status == 422
    assert to_serving_error(MemoryError()).code == "insufficient_memory"
    assert to_serving_error(ValueError("x")).status == 500
    assert to_serving_error(RuntimeError("out of memory?")).code == "internal_error"


def test_real_allocation_failures_are_422():
    """OpenCV's and Python's own out-of-memory errors, provoked for real under a data-segment limit (as the
    worker's memory headroom sets it), in a child process so that the limit stays there."""
    script = (
        "import resource, numpy as np, cv2\n"
        "from maskrcnn_serving.errors import to_serving_error\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, resource.getrlimit(resource.RLIMIT_DATA)[1]))\n"
        "codes = []\n"
        "for allocate in (lambda: cv2.resize(np.zeros((8, 8, 3), np.uint8), (30000, 30000)),\n"
        "                 lambda: bytearray(2 << 30)):\n"
        "    try:\n"
        "        allocate()\n"
        "    except Exception as exc:\n"
        "        codes.append((type(exc).__module__ + '.' + type(exc).__name__, to_serving_error(exc).code))\n"
        "print(codes)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout.strip() == "[('cv2.error', 'insufficient_memory'), ('builtins.MemoryError', " \
        "'insufficient_memory')]", result.stderr[-2000:]


def test_tensorflow_out_of_memory_is_422():
    tf = pytest.importorskip("tensorflow")
    with pytest.raises(tf.errors.ResourceExhaustedError) as raised:
        tf.zeros([1 << 38])  # 1 TiB: TensorFlow's allocator refuses it
    assert to_serving_error(raised.value).code == "insufficient_memory"


def test_body_read_errors():
    assert to_serving_error(TimeoutError(), reading_body=True).status == 408
    malformed = to_serving_error(OSError("Invalid chunk size"), reading_body=True)
    assert malformed.status == 400 and malformed.code == "malformed_body"
    framing = to_serving_error(MalformedChunkedBody("The chunk-size line is over 4096 bytes."), reading_body=True)
    assert framing.code == "malformed_body" and "MalformedChunkedBody" in framing.message
    # the same exceptions anywhere else are a server fault, not the client's
    for exc in (TimeoutError(), OSError("No such file")):
        assert to_serving_error(exc).code == "internal_error"


def test_faults_are_500_without_their_details():
    fault = to_serving_error(KeyError("/srv/secret/path"), request_id="req-7")
    assert isinstance(fault, InternalError) and fault.status == 500
    assert "req-7" in fault.message and "secret" not in fault.message
    assert to_serving_error(KeyError("x")).message == "Internal server error."


@pytest.mark.parametrize(("exception", "status", "code"), [
    (werkzeug_exceptions.NotFound(), 404, "not_found"),
    (werkzeug_exceptions.MethodNotAllowed(["GET"]), 405, "method_not_allowed"),
    (werkzeug_exceptions.RequestEntityTooLarge(), 413, "payload_too_large"),
    (werkzeug_exceptions.UnsupportedMediaType(), 415, "unsupported_media_type"),
    (werkzeug_exceptions.ImATeapot(), 400, "bad_http_request"),  # any other 4xx
    (werkzeug_exceptions.InternalServerError(), 500, "internal_error"),
])
def test_werkzeug_exceptions_by_status(exception, status, code):
    error = to_serving_error(exception)
    assert (error.status, error.code) == (status, code)
    assert error.message == exception.description


@pytest.mark.parametrize(("status", "answered", "code"), [
    (400, 400, "bad_http_request"), (403, 403, "forbidden"), (408, 408, "client_timeout"),
    (411, 400, "bad_http_request"), (414, 400, "bad_http_request"), (431, 431, "headers_too_large"),
    (494, 431, "headers_too_large"),  # nginx's own status for a header field over its buffers
    (501, 400, "bad_http_request"), (505, 400, "bad_http_request"),  # the client's transfer coding, HTTP version
    (500, 500, "internal_error"), (502, 502, "bad_gateway"), (503, 503, "not_ready"), (504, 504, "deadline_exceeded"),
    (599, 500, "internal_error"),
])
def test_statuses_answered_by_gunicorn_or_nginx(status, answered, code):
    error = to_serving_error(HttpStatusError(status, "what the server part says"))
    assert (error.status, error.code, error.message) == (answered, code, "what the server part says")


def test_message_factories():
    declared = RequestTooLarge.over_limit(10, size=30)
    found = RequestTooLarge.over_limit(10)
    for error in (declared, found):
        assert (error.status, error.code) == (413, "request_too_large")
        assert "MODEL_SERVER_MAX_REQUEST_BYTES" in error.message and "10" in error.message
    assert "30 bytes" in declared.message and "30" not in found.message
    stalled = ClientTimeout.stalled()
    assert (stalled.status, stalled.code) == (408, "client_timeout")
    assert "MODEL_SERVER_CLIENT_TIMEOUT" in stalled.message
    assert json.loads(errors.error_body(stalled.code, stalled.message)) == {
        "error": {"code": "client_timeout", "message": stalled.message}}


_BUILTIN_EXCEPTIONS = {name for name, value in vars(builtins).items()
                       if isinstance(value, type) and issubclass(value, BaseException)}


def _exception_classes(tree: ast.Module, known: set[str]) -> set[str]:
    """The classes of ``tree`` deriving from a built-in exception, from a class named in ``known`` or from a
    library's ``...Error`` / ``...Exception`` (as ``module.Name``)."""
    def is_exception(base: ast.expr) -> bool:
        if isinstance(base, ast.Name):
            return base.id in _BUILTIN_EXCEPTIONS or base.id in known
        return isinstance(base, ast.Attribute) and base.attr.endswith(("Error", "Exception"))

    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and any(is_exception(base) for base in node.bases)}


def test_every_exception_class_of_the_package_is_declared_in_errors_py():
    """errors.py's first line says "Every error": no other module defines an exception class (an AST scan)."""
    errors_tree = ast.parse((PACKAGE / "errors.py").read_text())
    declared: set[str] = set()
    while (found := _exception_classes(errors_tree, declared)) != declared:  # subclasses of subclasses
        declared = found
    assert {"ModelLoadError", "ServingError", "RequestTooLarge", "HttpStatusError", "FrontError",
            "MalformedChunkedBody", "DatabaseError", "DimensionMismatch", "SchedulerClosedError"} <= declared
    elsewhere = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in PACKAGE.rglob("*.py") if path != PACKAGE / "errors.py"
        for name in _exception_classes(ast.parse(path.read_text(), str(path)), declared)
    }
    assert elsewhere == set()
