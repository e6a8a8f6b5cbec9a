"""The web page of ``maskrcnn-serving serve``: ``GET /`` to drop a photo and see its masks (issue 14).

The page is three static files, package data in ``server/web/`` (``index.html``, ``app.js``, ``style.css``): plain
HTML, CSS and JavaScript, no build step, nothing loaded from outside the server. It talks to the server through
``GET /model`` (class names and colours, the test resize) and ``POST /invocations``, like any other client.

The files are read once, when the app is built, and served from memory: ``GET /`` is ``index.html`` and
``GET /static/<name>`` one of :data:`PAGE_FILES` by exact name, so no part of a request ever becomes a file path.
Every page response carries a strict Content-Security-Policy (scripts, styles, images and connections from this server
only; images may also be ``blob:`` and ``data:`` URLs, which only the page itself can make: its icon is an empty
``data:`` URL); the headers of every answer (``nosniff``, no framing) are the app's (:mod:`.headers`).
"""

from __future__ import annotations

from importlib import resources

from flask import Flask, Response

from maskrcnn_serving.errors import NotFound

# name -> Content-Type: the only files the page routes serve.
PAGE_FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def read_page_files() -> dict[str, bytes]:
    """The page's files from the package data, by name."""
    folder = resources.files("maskrcnn_serving.server").joinpath("web")
    return {name: folder.joinpath(name).read_bytes() for name in PAGE_FILES}


def register_page(app: Flask) -> None:
    """Add ``GET /`` and ``GET /static/<name>`` to ``app``, serving the page's files from memory."""
    files = read_page_files()

    def serve(name: str) -> Response:
        response = Response(files[name], content_type=PAGE_FILES[name])
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["Cache-Control"] = "no-cache"  # a new version of the server shows its new page at once
        return response

    @app.get("/")
    def page() -> Response:
        return serve("index.html")

    @app.get("/static/<name>")
    def page_file(name: str) -> Response:
        if name not in files:
            raise NotFound(f"No such page file; the page has {', '.join(PAGE_FILES)}.")
        return serve(name)
