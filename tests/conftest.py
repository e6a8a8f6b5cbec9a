"""Shared test fixtures: the bundled demo model (one backend per session) and ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pymilvus configures logging when first imported (logging.config.dictConfig, which closes every existing handler):
# imported here, before pytest's capture and log handlers exist, not in the middle of a test.
import pymilvus  # noqa: E402, F401

# Bound before any test replaces it (cli_uses_session_backends): the session's backends are always really loaded.
from maskrcnn_serving.backends.base import load_backend as real_load_backend  # noqa: E402

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
    return real_load_backend("tensorpack", DEMO_MODEL_DIR, environ={})


@pytest.fixture(scope="session")
def optimized_backend():
    """The demo model on the optimized backend (float32, no XLA), built once per test session."""
    from maskrcnn_serving.settings import Settings

    return real_load_backend("optimized", DEMO_MODEL_DIR, Settings(precision="float32", max_batch_size=4), environ={})


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "val_public" / "annotations.json").is_file():
        pytest.skip(f"needs the trained fixtures in {FIXTURES} (../shared beside the repo)")
    return FIXTURES


@pytest.fixture(scope="session")
def tensorpack_val_report(tensorpack_backend, fixtures_dir) -> dict:
    """``evaluate`` of the demo model on the tensorpack backend over val_public (200 images): the reference that
    both backends' acceptance tests compare with, computed once per session."""
    from maskrcnn_serving.evaluation import evaluate
    from maskrcnn_serving.pipeline import Pipeline

    val = fixtures_dir / "val_public"
    return evaluate(Pipeline(tensorpack_backend), val / "annotations.json", val / "images", progress=False)


@pytest.fixture(scope="session")
def r101_model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A random small R101-depth model (3 classes, made confident) stored with channel-first fc6 rows as an npz and
    with channel-last rows as a TF checkpoint; see checkpoint_factory.fc6_row_order_model_dirs."""
    from checkpoint_factory import R101_BLOCKS, fc6_row_order_model_dirs

    return fc6_row_order_model_dirs(tmp_path_factory.mktemp("r101_fc6_first"), tmp_path_factory.mktemp("r101_fc6_last"),
                                    blocks=R101_BLOCKS, seed=5, step=3)


@pytest.fixture(scope="session")
def r101_tensorpack_backend(r101_model_dirs):
    """The channel-first R101 model on the tensorpack backend (its graph takes ~20 s to build: built once)."""
    return real_load_backend("tensorpack", r101_model_dirs[0], environ={})


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, example_images):
    """The session's real server: ``maskrcnn-serving serve`` (nginx in front of gunicorn, 2 workers, demo model) on
    127.0.0.1, as the images run it; see tests/live_server.py. Stopped at the end of the session."""
    from live_server import nginx_missing, start_live_server, stop_live_server

    if nginx_missing():
        pytest.skip(nginx_missing())
    log_path = tmp_path_factory.mktemp("live_server") / "server.log"
    server = start_live_server(DEMO_MODEL_DIR, log_path, example_images[0].read_bytes(), front="nginx")
    yield server
    stop_live_server(server)


@pytest.fixture(scope="session")
def gunicorn_server(tmp_path_factory, example_images):
    """The same server with gunicorn alone (``--front none``: what ``serve`` runs where nginx is not installed),
    for the hostile-input catalogue and the load test. Stopped at the end of the session."""
    from live_server import start_live_server, stop_live_server

    log_path = tmp_path_factory.mktemp("gunicorn_server") / "server.log"
    server = start_live_server(DEMO_MODEL_DIR, log_path, example_images[0].read_bytes(), front="none")
    yield server
    stop_live_server(server)


@pytest.fixture(scope="session")
def built_images():
    """``build(folder) -> BuiltImage``: each serving image built once per session by build_tools/build_local.sh
    (tests/image_server.py). Skips where the images cannot be built (no root, buildah or debootstrap)."""
    from image_server import build_image, images_unavailable

    reason = images_unavailable()
    if reason:
        pytest.skip(reason)
    built = {}

    def build(folder: str):
        if folder not in built:
            built[folder] = build_image(folder)
        return built[folder]

    return build


@pytest.fixture(scope="session")
def image_server(built_images, tmp_path_factory, example_images):
    """The session's server inside the tensorpack image (container-serving), run as SageMaker runs it with the
    venv servers' settings as environment variables (tests/image_server.py). Stopped at the end of the session."""
    from image_server import ImageServer
    from live_server import SERVER_ENVIRONMENT, probe_startup, stop_live_server

    image = built_images("container-serving")
    log_path = tmp_path_factory.mktemp("image_server") / "server.log"
    server = ImageServer(image.name, log_path, env=SERVER_ENVIRONMENT).start()
    live = probe_startup(server, example_images[0].read_bytes(), front=ImageServer.front)
    yield live
    stop_live_server(live)


@pytest.fixture
def cli_uses_session_backends(monkeypatch, request):
    """CLI commands load their model through ``load_backend``; hand them the session's demo backend of the same
    name instead of building a second copy."""
    import maskrcnn_serving.backends.base as base

    monkeypatch.setattr(base, "load_backend", lambda name, *args, **kwargs: request.getfixturevalue(f"{name}_backend"))


@pytest.fixture(scope="session")
def run_batched():
    """``run(backend, images, options) -> (detections, stats)``: the images through a scheduler (the one place
    batches form), all queued at once so that they share forward calls where the backend allows."""
    from maskrcnn_serving.backends.base import PredictOptions
    from maskrcnn_serving.scheduler import Scheduler

    def run(backend, images, options=None):
        options = options or PredictOptions()
        with Scheduler.for_backend(backend) as scheduler:
            results = scheduler.run([backend.preprocess(image) for image in images], [options] * len(images))
            return [r.detections for r in results], scheduler.stats

    return run


@pytest.fixture
def scripted_server():
    """A minimal Flask app on 127.0.0.1: 200 with a 1000-byte body, except 500 for images whose id ends in "-3-0"
    (the 4th body) and 413 for raw bodies. Yields its URL; shut down after the test."""
    import threading

    from flask import Flask, Response, request
    from werkzeug.serving import make_server

    app = Flask("scripted")
    seen = []

    @app.post("/invocations")
    def invocations():
        if request.mimetype != "application/json":
            return Response(b"too large", status=413)
        document = request.get_json()
        seen.append(document)
        if document["img_id"].endswith("-3-0"):
            return Response(b'{"error": "scripted"}', status=500, mimetype="application/json")
        return Response(b"x" * 1000, mimetype="application/json")

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster for the session (``ray start --head``, this machine's 2 CPUs; testsupport/ray_cluster.py),
    started at first use and stopped at the end."""
    from testsupport.ray_cluster import ray_head

    with ray_head(cpus=2) as head:
        yield head
