"""The security headers of every answer of the server, whoever writes it: the Flask app, gunicorn's own error
pages (:mod:`.gunicorn_worker`) and nginx's (``nginx.conf.template``, rendered by :mod:`.front`).

Answers echo client input (error messages quote options and ids; thumbnails are bytes from the index), so none may
be sniffed into something a browser runs, be framed by another site, or be kept by a cache when it is an error:

* ``X-Content-Type-Options: nosniff`` and ``X-Frame-Options: DENY`` (what the page's ``frame-ancestors 'none'``
  says, for browsers without CSP level 2) on every answer;
* the web page's Content-Security-Policy on its files, the server's only HTML (:mod:`.web` sets it);
* ``Cache-Control: no-store`` on every error (and on ``/ping``, whose answer changes with the workers), and
  ``Retry-After`` on every 503 (the server is not ready, or stopping).
"""

from __future__ import annotations

EVERY_ANSWER: dict[str, str] = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}
NO_STORE: dict[str, str] = {"Cache-Control": "no-store"}
RETRY_AFTER_SECONDS = 5


def for_status(status: int) -> dict[str, str]:
    """The headers every answer of ``status`` gets."""
    if status < 400:
        return dict(EVERY_ANSWER)
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else {}
    return {**EVERY_ANSWER, **NO_STORE, **retry}


def nginx_directives(status: int, extra: dict[str, str] | None = None) -> str:
    """``add_header`` directives for an nginx location that answers ``status`` itself, with ``extra`` headers
    (``always``: nginx adds headers to error statuses only with it)."""
    wanted = {**for_status(status), **(extra or {})}
    return " ".join(f'add_header {name} "{value}" always;' for name, value in wanted.items())
