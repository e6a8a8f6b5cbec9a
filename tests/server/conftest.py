"""Fixtures of the server tests: a second real server with an instance index (tests of search and of the page)."""

from __future__ import annotations

import pytest
from indexes import build_index

from testsupport.server import ServerProcess


@pytest.fixture(scope="session")
def indexed_server(tmp_path_factory, demo_model_dir, example_images):
    """``serve --index`` (2 workers, the demo model) on an index of the first two example images; yields the
    server, the database folder and a scratch folder."""
    root = tmp_path_factory.mktemp("search_server")
    db = str(root / "instances.db")
    build_index(root / "first", example_images[:2], demo_model_dir, [db])  # the server takes the database over
    server = ServerProcess(demo_model_dir, root / "server.log", workers=2, flags=["--index", db]).start()
    try:
        server.wait_ready(timeout=240)
        yield server, db, root
    finally:
        server.stop()


