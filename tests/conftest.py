"""Shared test fixtures: the bundled demo model (one backend per session) and ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = REPO / "model" / "demo"
EXAMPLE_IMAGES = REPO / "examples" / "images"
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    return DEMO_MODEL_DIR


@pytest.fixture(scope="session")
def example_images() -> list[Path]:
    return sorted(EXAMPLE_IMAGES.glob("*.jpg"))


@pytest.fixture(scope="session")
def tensorpack_backend():
    """The demo model on the tensorpack backend, built once per test session."""
    from maskrcnn_serving.backends.base import load_backend

    return load_backend("tensorpack", DEMO_MODEL_DIR, environ={})


@pytest.fixture(scope="session")
def optimized_backend():
    """The demo model on the optimized backend (float32, no XLA), built once per test session."""
    from maskrcnn_serving.backends.base import load_backend

    return load_backend("optimized", DEMO_MODEL_DIR, environ={}, precision="float32", xla=False, max_batch_size=4)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "val_public" / "annotations.json").is_file():
        pytest.skip(f"needs the trained fixtures in {FIXTURES} (../shared beside the repo)")
    return FIXTURES


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, example_images):
    """The one real server of the session: ``maskrcnn-serving serve`` (gunicorn, 2 workers, demo model) on
    127.0.0.1; see tests/live_server.py. Stopped at the end of the session."""
    from live_server import start_live_server, stop_live_server

    log_path = tmp_path_factory.mktemp("live_server") / "server.log"
    server = start_live_server(DEMO_MODEL_DIR, log_path, example_images[0].read_bytes())
    yield server
    stop_live_server(server.process)
