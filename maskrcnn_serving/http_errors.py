"""Every error a client can cause, and its HTTP status: the ONE place where errors become responses.

The wire layer and the server raise :class:`ServingError` subclasses; the Flask app turns each into
``{"error": {"code": <machine-readable str>, "message": <what to fix>}}`` with the status of its class. Anything
else that escapes a handler is a server fault: logged with the request id, answered 500 with no details.
"""

from __future__ import annotations

import json

from werkzeug.exceptions import HTTPException


class ServingError(Exception):
    """An error the client can fix (or a transient state, for 503). ``code`` is stable; ``message`` is for humans."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidRequest(ServingError):
    """400: malformed JSON or base64, a missing or mistyped field, a bad option value, bytes that are not an image."""

    status = 400
    code = "invalid_request"


class PayloadTooLarge(ServingError):
    """413: the request body, the number of images or the response is over its configured limit."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServingError):
    """415: a Content-Type the server does not accept."""

    status = 415
    code = "unsupported_media_type"


class TooManyPixels(ServingError):
    """422: the image header declares more pixels than the decompression-bomb guard allows."""

    status = 422
    code = "too_many_pixels"


class NotReady(ServingError):
    """503: the model is still loading or warming up (or failed to load; the message says which)."""

    status = 503
    code = "not_ready"


INTERNAL_ERROR_CODE = "internal_error"


MAX_MESSAGE_CHARS = 2000  # messages quote client values; a 1 MB bogus option must not come back as a 1 MB error


def error_body(code: str, message: str) -> bytes:
    """The JSON body of every error response (the message is cut at ``MAX_MESSAGE_CHARS``)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + " ... (truncated)"
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def from_http_exception(exc: HTTPException) -> tuple[int, str, str]:
    """(status, code, message) for werkzeug's own errors (unknown route, wrong method, body over Flask's limit)."""
    status = exc.code or 500
    names = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    code = names.get(status, (exc.name or "error").lower().replace(" ", "_"))
    message = exc.description or exc.name or "error"
    return status, code, message
