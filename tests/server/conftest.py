"""Fixtures of the server tests: a second real server with an instance index (tests of search and of the page)."""

from __future__ import annotations

import pytest
from indexes import build_index

from testsupport.hostile import SEARCH_SERVER_MAX_RESPONSE_BYTES
from testsupport.server import ServerProcess


@pytest.fixture(scope="session")
def indexed_server(tmp_path_factory, demo_model_dir, example_images):
    """``serve --index`` (2 workers, the demo model, answers up to 512 KiB) on an index of the first two example
    images; yields the server, the database folder and a scratch folder."""
    root = tmp_path_factory.mktemp("search_server")
    db = str(root / "instances.db")
    build_index(root / "first", example_images[:2], demo_model_dir, [db])  # the server takes the database over
    # (the limit the search cases of the hostile catalogue are sized for, far above the other tests' answers)
    flags = ["--index", db, "--max-response-bytes", str(SEARCH_SERVER_MAX_RESPONSE_BYTES)]
    server = ServerProcess(demo_model_dir, root / "server.log", workers=2, flags=flags).start()
    try:
        server.wait_ready(timeout=240)
        yield server, db, root
    finally:
        server.stop()


