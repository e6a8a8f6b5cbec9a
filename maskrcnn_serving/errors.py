"""Every error of the package, in one place: a class per error code, each with its HTTP status.

* :class:`ModelLoadError`: a model directory that cannot be served (the CLI prints it, ``serve`` exits with 2).
* :class:`ServingError` and its subclasses: what a client sees. Each class fixes ``status`` and ``code``; the
  message says what to fix. The Flask app (:mod:`maskrcnn_serving.server.app`), gunicorn's own error pages
  (:mod:`maskrcnn_serving.server.gunicorn_worker`) and the guards raise or look up these classes, so a code has
  exactly one status everywhere, and every error body is :func:`error_body`.
"""

from __future__ import annotations

import json


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


class SearchUnavailable(BadRequest, code="search_unavailable"):
    """400: the request asks for neighbours, and the server has no instance index."""


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


class PayloadTooLarge(ServingError, status=413, code="payload_too_large"):
    """413: a body over the limit, declared or read (werkzeug's own 413 maps here too)."""


class RequestTooLarge(PayloadTooLarge, code="request_too_large"):
    """413: the request body is over ``MODEL_SERVER_MAX_REQUEST_BYTES``."""


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


class BadGateway(ServingError, status=502, code="bad_gateway"):
    """502: the HTTP front (nginx) could not get an answer from a server worker (it died or was restarting)."""


class NotReady(ServingError, status=503, code="not_ready"):
    """503: the model is still loading or warming up (or failed to load; the message says which)."""


class DeadlineExceeded(ServingError, status=504, code="deadline_exceeded"):
    """504: the request did not finish within its deadline (the worker is fine; other requests are unaffected)."""


MAX_MESSAGE_CHARS = 2000  # messages quote client values; a 1 MB bogus option must not come back as a 1 MB error

# The error class of a bare HTTP status (werkzeug's exceptions, gunicorn's error pages); anything else that is a 4xx
# is a BadHttpRequest, anything else that is a 5xx an InternalError.
_BY_STATUS: dict[int, type[ServingError]] = {
    400: BadHttpRequest, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed, 408: ClientTimeout, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 431: HeadersTooLarge, 500: InternalError, 502: BadGateway, 503: NotReady,
    504: DeadlineExceeded,
}


def error_for_status(status: int) -> type[ServingError]:
    """The error class answered for a bare HTTP ``status``."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return BadHttpRequest if status < 500 else InternalError


def error_body(code: str, message: str) -> bytes:
    """The JSON body of every error response (the message is cut at ``MAX_MESSAGE_CHARS``)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + " ... (truncated)"
    return json.dumps({"error": {"code": code, "message": message}}).encode()
