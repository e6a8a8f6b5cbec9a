"""Every error of the package, in one place: a class per error code, each with its HTTP status, and the one mapping
of any exception to what the client gets.

* :class:`ModelLoadError`: a model directory that cannot be served (the CLI prints it, ``serve`` exits with 2).
* :class:`ServingError` and its subclasses: what a client sees. Each class fixes ``status`` and ``code``; the
  message says what to fix (messages needed in several places are made by factories on their class:
  :meth:`RequestTooLarge.over_limit`, :meth:`ClientTimeout.stalled`, :meth:`InternalError.unhandled`). Every
  error body is :func:`error_body`.
* :func:`to_serving_error`: the error answered for any exception -- ours, werkzeug's (the Flask app's unknown routes
  and methods), an HTTP status answered by gunicorn or nginx themselves (:class:`HttpStatusError`: gunicorn's error
  pages, nginx's error pages), an exhausted resource, a failed read of the request body, a fault. The Flask app
  (:mod:`maskrcnn_serving.server.app`), gunicorn's error pages (:mod:`maskrcnn_serving.server.gunicorn_worker`),
  the nginx config (:mod:`maskrcnn_serving.server.front`) and the body reader
  (:mod:`maskrcnn_serving.server.guards`) all answer through it, so a code has exactly one status everywhere.
* The package's other exceptions, which no client sees as such: :class:`FrontError` (``serve`` cannot run its HTTP
  front), :class:`MalformedChunkedBody` (raised inside gunicorn's body reader as the ``OSError`` it expects; the body
  read answers it 400), :class:`DatabaseError`, :class:`DimensionMismatch` and :class:`DatabaseUnavailable` (the
  instance index; one that reaches a client is a 503 ``search_unavailable``), :class:`SchedulerClosedError` (work
  handed to a closed scheduler).
"""

from __future__ import annotations

import json
import sys


class ModelLoadError(Exception):
    """The model directory, its config or its checkpoint cannot be served. The message says what to fix."""


class ServingError(Exception):
    """An error answered to the client as ``{"error": {"code", "message"}}`` with ``status``. A subclass declares
    both as class keywords (``class Gone(ServingError, status=410, code="gone")``); ``code`` is stable, the message
    is for humans."""

    status: int = 500
    code: str = "internal_error"

    def __init_subclass__(cls, status: int | None = None, code: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
        if code is not None:
            cls.code = code

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServingError, status=400, code="invalid_request"):
    """400: a bad option value, an empty request list, or another request the client must change."""


class InvalidJson(BadRequest, code="invalid_json"):
    """400: the body is not valid JSON."""


class InvalidBase64(BadRequest, code="invalid_base64"):
    """400: ``img_data`` is not valid base64."""


class MissingField(BadRequest, code="missing_field"):
    """400: ``img_id`` or ``img_data`` is missing."""


class InvalidField(BadRequest, code="invalid_field"):
    """400: a field has the wrong JSON type."""


class NotAnImage(BadRequest, code="not_an_image"):
    """400: the bytes are not an image in an accepted format, or the image is truncated or corrupt."""


class SearchNotConfigured(BadRequest, code="search_not_configured"):
    """400: the request asks for neighbours, and the server was started without an instance index (``--index``)."""


class MalformedBody(BadRequest, code="malformed_body"):
    """400: the HTTP body is malformed or cut short (bad chunk framing, an early close)."""


class BadHttpRequest(BadRequest, code="bad_http_request"):
    """400: HTTP that the server cannot parse (answered by gunicorn before the app sees it)."""


class Forbidden(ServingError, status=403, code="forbidden"):
    """403: a request gunicorn refuses by policy (e.g. proxy headers from an address it does not trust)."""


class NotFound(ServingError, status=404, code="not_found"):
    """404: no such route."""


class MethodNotAllowed(ServingError, status=405, code="method_not_allowed"):
    """405: the route exists for another method."""


class ClientTimeout(ServingError, status=408, code="client_timeout"):
    """408: the client stopped sending the request body."""

    @classmethod
    def stalled(cls) -> ClientTimeout:
        """The answer to a request that stopped arriving (nginx's 408 page, a stalled body read by a worker)."""
        return cls("The request stopped arriving before it was complete (MODEL_SERVER_CLIENT_TIMEOUT seconds without "
                   "data).")


class PayloadTooLarge(ServingError, status=413, code="payload_too_large"):
    """413: a body over the limit, declared or read (werkzeug's own 413 maps here too)."""


class RequestTooLarge(PayloadTooLarge, code="request_too_large"):
    """413: the request body is over ``MODEL_SERVER_MAX_REQUEST_BYTES``."""

    @classmethod
    def over_limit(cls, limit: int, size: int | None = None) -> RequestTooLarge:
        """The answer to a body over ``limit`` bytes (nginx's 413 page, the worker's body reader, the request parser);
        ``size``: the body's length when it is known (declared)."""
        found = f"is over the limit of {limit} bytes" if size is None else f"has {size} bytes; the limit is {limit}"
        return cls(f"The request body {found}. Send a smaller image (or fewer images per request), or raise "
                   "MODEL_SERVER_MAX_REQUEST_BYTES.")


class TooManyImages(PayloadTooLarge, code="too_many_images"):
    """413: more images than ``MODEL_SERVER_MAX_IMAGES`` in one request."""


class ResponseTooLarge(PayloadTooLarge, code="response_too_large"):
    """413: the answer would be over ``MODEL_SERVER_MAX_RESPONSE_BYTES``."""


class UnsupportedMediaType(ServingError, status=415, code="unsupported_media_type"):
    """415: a Content-Type (or an image format) the server does not accept."""


class UnsupportedImageFormat(UnsupportedMediaType, code="unsupported_image_format"):
    """415: an image format (TIFF) or variant (animated WebP; arithmetic-coded, lossless or 12-bit JPEG) that the
    decoding gate recognizes and refuses on purpose (docs/security.md says why)."""


class TooManyPixels(ServingError, status=422, code="too_many_pixels"):
    """422: the image (or the request's images together) would decode to more pixels than allowed."""


class ImageTooComplex(ServingError, status=422, code="image_too_complex"):
    """422: the images would cost more CPU to decode than a request may use (a JPEG with an absurd number of scans)."""


class InsufficientMemory(ServingError, status=422, code="insufficient_memory"):
    """422: processing this image needs more memory than this worker may use."""


class HeadersTooLarge(ServingError, status=431, code="headers_too_large"):
    """431: request headers over gunicorn's limits."""


class InternalError(ServingError):
    """500: a server fault; the message names the request id under which the log has the details."""

    @classmethod
    def unhandled(cls, request_id: str | None) -> InternalError:
        """The answer to a fault: no detail of it, only where the log has them (``request_id``, when there is one)."""
        if request_id is None:
            return cls("Internal server error.")
        return cls(f"Internal server error; the server log has the details under request id {request_id}.")


class BadGateway(ServingError, status=502, code="bad_gateway"):
    """502: the HTTP front (nginx) could not get an answer from a server worker (it died or was restarting)."""


class NotReady(ServingError, status=503, code="not_ready"):
    """503: the model is still loading or warming up (or failed to load; the message says which)."""


class SearchUnavailable(ServingError, status=503, code="search_unavailable"):
    """503: the server has an instance index, but its database is down, stalled or too slow right now; the server
    keeps trying to reach it and answers at once meanwhile. Requests without ``neighbours`` are unaffected."""

    @classmethod
    def outage(cls) -> SearchUnavailable:
        """The answer while the index's database cannot be used (no detail: those are in the server's log)."""
        return cls("Instance search is unavailable right now: the index's database is not answering. Retry later, "
                   "or send the request without neighbours (detections are still served).")


class DeadlineExceeded(ServingError, status=504, code="deadline_exceeded"):
    """504: the request did not finish within its deadline (the worker is fine; other requests are unaffected)."""


class HttpStatusError(Exception):
    """An HTTP error status answered by another part of the server, not raised by our code: one of gunicorn's error
    pages (a request it refuses before the app sees it) or of nginx's; :func:`to_serving_error` gives the error
    the client gets for it. ``message``: what the part says (shown to the client as it is, so never a 5xx's
    details)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------- the package's other exceptions


class FrontError(RuntimeError):
    """``serve`` cannot run the HTTP front it was asked for (nginx missing, or its config refused); ``serve`` exits
    with 2 and this message (maskrcnn_serving/server/front.py)."""


class MalformedChunkedBody(OSError):
    """Chunked framing over its limits, or a malformed trailer section. An ``OSError`` because it is raised inside
    gunicorn's body reader, whose caller expects framing errors as ``IOError``; the body read answers it 400
    ``malformed_body`` like gunicorn's own (maskrcnn_serving/server/gunicorn_worker.py)."""


class DatabaseError(Exception):
    """The ``--db`` value cannot be used; the message says why. Nothing was written (maskrcnn_serving/search/)."""


class DimensionMismatch(DatabaseError):
    """The collection holds vectors of another length than this model's."""


class DatabaseUnavailable(DatabaseError):
    """The database did not answer: down, stalled or slower than the call's time limit (maskrcnn_serving/search/).
    Not a mistake in ``--db``: the same call may succeed later."""


class SchedulerClosedError(RuntimeError):
    """The scheduler was closed; no new work is accepted (maskrcnn_serving/scheduler.py)."""


# ------------------------------------------------------------------------------------------- exceptions -> HTTP

MAX_MESSAGE_CHARS = 2000  # messages quote client values; a 1 MB bogus option must not come back as a 1 MB error

# The error class of a bare HTTP status (werkzeug's exceptions, gunicorn's and nginx's error pages); any other 4xx
# is a BadHttpRequest, any other 5xx an InternalError. 501 (a transfer coding the server does not implement) and 505
# (an HTTP version it does not speak) are the client's errors: 400. 494 is nginx's own status for a header field
# over its buffers.
_BY_STATUS: dict[int, type[ServingError]] = {
    400: BadHttpRequest, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed, 408: ClientTimeout, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 431: HeadersTooLarge, 494: HeadersTooLarge, 500: InternalError, 501: BadHttpRequest,
    502: BadGateway, 503: NotReady, 504: DeadlineExceeded, 505: BadHttpRequest,
}


def _error_class(status: int) -> type[ServingError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return BadHttpRequest if status < 500 else InternalError


def to_serving_error(exc: BaseException, request_id: str | None = None, reading_body: bool = False) -> ServingError:
    """The error the client gets for ``exc``.

    * a :class:`ServingError`: itself;
    * an HTTP status answered elsewhere -- werkzeug's ``HTTPException`` (its ``code`` and ``description``), an
      :class:`HttpStatusError` (gunicorn's and nginx's pages) -- the class of that status (``_BY_STATUS``) with its
      message;
    * ``reading_body`` (``exc`` came from reading the request body, where an ``OSError`` is the client's): a
      ``TimeoutError`` is a stalled client (408, :meth:`ClientTimeout.stalled`), any other ``OSError`` a malformed
      or cut body (400 ``malformed_body``: bad chunk framing, an early close);
    * an exhausted resource (``MemoryError``, OpenCV's out-of-memory error, TensorFlow's ``ResourceExhaustedError``):
      422 ``insufficient_memory``, this request fails and the worker lives;
    * a :class:`DatabaseError` (the instance index's database failed under a request): 503 ``search_unavailable``,
      without the details (they name the database's address; the search path logs them);
    * anything else: a fault, 500 with no detail (:meth:`InternalError.unhandled`, naming ``request_id``).
    """
    if isinstance(exc, ServingError):
        return exc
    status_error = _http_status(exc)
    if status_error is not None:
        status, message = status_error
        return _error_class(status)(message)
    if reading_body and isinstance(exc, TimeoutError):
        return ClientTimeout.stalled()
    if reading_body and isinstance(exc, OSError):
        return MalformedBody(f"The request body is malformed or incomplete ({type(exc).__name__}).")
    if isinstance(exc, DatabaseError):
        return SearchUnavailable.outage()
    if _exhausts_resources(exc):
        return InsufficientMemory("Processing this image needs more memory than this worker may use. Send a smaller "
                                  "image (fewer pixels) or fewer images per request.")
    return InternalError.unhandled(request_id)


def _http_status(exc: BaseException) -> tuple[int, str] | None:
    """(status, message) of an HTTP error status answered outside our code, else None. werkzeug is checked only
    when it is loaded (an exception cannot be of one of its classes otherwise): the model path does not import it."""
    if isinstance(exc, HttpStatusError):
        return exc.status, exc.message
    werkzeug = sys.modules.get("werkzeug.exceptions")
    if werkzeug is not None and isinstance(exc, werkzeug.HTTPException):
        return exc.code or 500, exc.description or exc.name or "error"
    return None


def _exhausts_resources(exc: BaseException) -> bool:
    """An allocation failed: Python's, OpenCV's (checked only when OpenCV is loaded, like werkzeug above), or
    TensorFlow's (checked by name: nothing here may import TensorFlow to classify an error)."""
    if isinstance(exc, MemoryError):
        return True
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and isinstance(exc, cv2.error) and getattr(exc, "code", None) == cv2.Error.StsNoMem:
        return True
    return any(cls.__name__ == "ResourceExhaustedError" for cls in type(exc).__mro__)


def error_body(code: str, message: str) -> bytes:
    """The JSON body of every error response (the message is cut at ``MAX_MESSAGE_CHARS``)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + " ... (truncated)"
    return json.dumps({"error": {"code": code, "message": message}}).encode()
