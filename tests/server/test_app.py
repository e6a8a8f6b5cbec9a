"""The Flask app: the seed-compatible contract, in-process (Flask's test client on the session's demo backend), and
its routes against docs/openapi.yaml. The same app under a real gunicorn is in test_live_server.py."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from seed_client import assert_legacy_equals_coco, seed_notebook_request, seed_notebook_rle_to_binary_mask

from maskrcnn_serving.postprocess import full_masks
from maskrcnn_serving.server.app import create_app
from maskrcnn_serving.server.runtime import ModelRunner
from maskrcnn_serving.settings import Settings

# pycocotools 2.0.11 under numpy 2 warns on every decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def runner(tensorpack_backend) -> ModelRunner:
    return ModelRunner(backend=tensorpack_backend).start(background=False)


@pytest.fixture(scope="module")
def client(runner):
    return create_app(Settings(), runner).test_client()


def post_json(client, body, query: str = "", headers=None):
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(f"/invocations{query}", data=data, content_type="application/json", headers=headers or {})


# ------------------------------------------------------------------------------------------------ contract


def test_ping_and_execution_parameters(client, runner):
    assert runner.state == "ready" and runner.warmup_seconds is not None
    response = client.get("/ping")
    assert response.status_code == 200 and response.json["status"] == "ready"
    params = client.get("/execution-parameters").json
    assert params == {"MaxConcurrentTransforms": 1, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 6}


def test_seed_request_legacy_masks_equal_coco_masks(client, tensorpack_backend, example_images):
    """Acceptance: the seed notebook's request + decoder give exactly the masks of format=coco (pycocotools),
    which are exactly the backend's full-size pasted masks."""
    import cv2

    total = 0
    for path in example_images:
        file_bytes = path.read_bytes()
        legacy = client.post("/invocations", data=seed_notebook_request(path.stem, file_bytes),
                             content_type="application/json", headers={"Accept": "application/json"})
        assert legacy.status_code == 200 and legacy.mimetype == "application/json"
        coco = post_json(client, {**json.loads(seed_notebook_request(path.stem, file_bytes)), "format": "coco"})
        total += assert_legacy_equals_coco(legacy.json, coco.json, path.stem)
        dets = tensorpack_backend.predict([cv2.imread(str(path), cv2.IMREAD_COLOR)],
                                          runner_default_options(tensorpack_backend))[0]
        full = full_masks(dets, 0.5)
        assert len(full) == len(legacy.json["annotations"])
        for mask, annotation in zip(full, legacy.json["annotations"], strict=True):
            assert np.array_equal(seed_notebook_rle_to_binary_mask(annotation["segmentation"]), mask)
        for box, annotation in zip(dets.boxes, legacy.json["annotations"], strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            assert annotation["bbox"] == [int(x1), int(y1), int(x2 - x1), int(y2 - y1)]
    assert total >= len(example_images)  # the demo model finds objects in every example


def runner_default_options(backend):
    from maskrcnn_serving.backends.base import PredictOptions

    # The server's default score threshold is TEST.RESULT_SCORE_THRESH_VIS, as in the seed tensorpack container.
    return PredictOptions(score_threshold=backend.bundle.inference.vis_score_threshold)


def test_val_public_legacy_masks_equal_coco_masks(client, fixtures_dir):
    """Acceptance on every val_public image (needs ../shared)."""
    images = sorted((fixtures_dir / "val_public" / "images").glob("*.jpg"))
    assert len(images) >= 100
    total = 0
    for path in images:
        body = json.loads(seed_notebook_request(path.name, path.read_bytes()))
        legacy = post_json(client, body)
        coco = post_json(client, {**body, "format": "coco"})
        assert legacy.status_code == coco.status_code == 200
        total += assert_legacy_equals_coco(legacy.json, coco.json, path.name)
    assert total > len(images)


def test_list_raw_and_options(client, example_images):
    first, second = (p.read_bytes() for p in example_images[:2])
    single = post_json(client, {"img_id": "a", "img_data": base64.b64encode(first).decode()}).json
    many = post_json(
        client,
        [{"img_id": "a", "img_data": base64.b64encode(first).decode()},
         {"img_id": 2, "img_data": base64.b64encode(second).decode(), "format": "boxes"}],
    ).json
    assert isinstance(many, list) and many[0] == single and many[1]["img_id"] == "2"
    assert all("segmentation" not in a for a in many[1]["annotations"])

    raw = client.post("/invocations?img_id=a", data=first, content_type="image/jpeg").json
    assert raw == single
    assert "img_id" not in client.post("/invocations", data=first, content_type="application/x-image").json

    everything = post_json(client, {"img_id": "a", "img_data": base64.b64encode(first).decode(),
                                    "score_threshold": 0.0, "format": "boxes"}).json["annotations"]
    assert len(everything) > len(single["annotations"])
    assert all(a["score"] > 0.0 for a in everything)
    scores = [a["score"] for a in everything]
    assert scores == sorted(scores, reverse=True)

    top = client.post("/invocations?max_detections=1&format=coco", data=first, content_type="image/jpeg").json
    assert len(top["annotations"]) == 1

    wanted = single["annotations"][0]["category_name"]
    filtered = post_json(client, {"img_id": 1, "img_data": base64.b64encode(first).decode(),
                                  "classes": [wanted], "score_threshold": 0.0, "format": "boxes"}).json
    assert filtered["annotations"] and {a["category_name"] for a in filtered["annotations"]} == {wanted}

    via_header = client.post("/invocations", data=first, content_type="image/jpeg",
                             headers={"X-Amzn-SageMaker-Custom-Attributes": "format=boxes&max_detections=2"}).json
    assert len(via_header["annotations"]) <= 2 and all("segmentation" not in a for a in via_header["annotations"])


def test_mask_threshold_changes_mask_area(client, example_images):
    data = example_images[0].read_bytes()

    def areas(threshold):
        answer = client.post(f"/invocations?format=coco&mask_threshold={threshold}", data=data,
                             content_type="image/jpeg").json
        return [int(mask_utils.area(a["segmentation"])) for a in answer["annotations"]]

    low, high = areas(0.2), areas(0.8)
    assert all(lo >= hi for lo, hi in zip(low, high, strict=True)) and sum(low) > sum(high)


def test_polygon_format(client, example_images):
    answer = client.post("/invocations?format=polygon", data=example_images[0].read_bytes(),
                         content_type="image/jpeg").json
    for annotation in answer["annotations"]:
        assert annotation["segmentation"] and all(len(p) >= 6 and len(p) % 2 == 0 for p in annotation["segmentation"])


def test_not_ready_and_failed_runners_answer_503(tmp_path, monkeypatch):
    loading = create_app(Settings(ready_wait=0.0), ModelRunner()).test_client()
    for response in (loading.get("/ping"), loading.post("/invocations", data=b"x", content_type="image/jpeg")):
        assert response.status_code == 503 and response.json["error"]["code"] == "not_ready"
        assert response.headers["Retry-After"]
    failed = ModelRunner(Settings(model_dir=str(tmp_path))).start(background=False)
    assert failed.state == "failed"
    client = create_app(Settings(ready_wait=30.0), failed).test_client()
    start = time.perf_counter()
    for response in (client.get("/ping"), client.post("/invocations", data=b"x", content_type="image/jpeg")):
        assert response.status_code == 503 and "failed to load" in response.json["error"]["message"]
    assert time.perf_counter() - start < 5  # a failed model is not waited for


def test_invocations_wait_for_a_loading_worker_ping_does_not(tensorpack_backend, example_images):
    runner = ModelRunner(backend=tensorpack_backend)
    client = create_app(Settings(ready_wait=60.0), runner).test_client()
    assert client.get("/ping").status_code == 503  # immediately, while loading
    timer = threading.Timer(0.5, runner.start, kwargs={"background": False})
    start = time.perf_counter()
    timer.start()
    response = client.post("/invocations", data=example_images[0].read_bytes(), content_type="image/jpeg")
    timer.join()
    assert response.status_code == 200 and response.json["annotations"]
    assert time.perf_counter() - start >= 0.5
    assert client.get("/ping").status_code == 200


def test_internal_fault_is_500_without_details(tensorpack_backend, example_images, caplog):
    class Broken:
        def run(self, images, options, deadline):
            raise RuntimeError("secret internal detail")

    runner = ModelRunner(backend=tensorpack_backend).start(background=False)
    runner.pipeline.close()
    runner.pipeline.scheduler = Broken()
    client = create_app(Settings(), runner).test_client()
    with caplog.at_level(logging.ERROR, logger="maskrcnn_serving.server"):
        response = client.post("/invocations", data=example_images[0].read_bytes(), content_type="image/jpeg",
                               headers={"X-Request-Id": "req-42"})
    assert response.status_code == 500
    assert response.json["error"]["code"] == "internal_error" and "req-42" in response.json["error"]["message"]
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in response.get_data(as_text=True)
    assert response.headers["X-Request-Id"] == "req-42"
    logged = [r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "req-42"]
    assert logged and logged[0].exc_info is not None


def test_metrics_count_requests_and_stages(client, example_images):
    client.post("/invocations", data=example_images[0].read_bytes(), content_type="image/jpeg")
    client.post("/invocations", data=b"junk", content_type="text/plain")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'maskrcnn_requests_total{route="/invocations",status="200"}' in text
    assert 'maskrcnn_requests_total{route="/invocations",status="415"}' in text
    for name in ("decode", "preprocess", "queue", "model", "postprocess", "search", "encode"):
        assert f'maskrcnn_stage_duration_seconds_count{{stage="{name}"}}' in text


# ------------------------------------------------------------------------------------------------ OpenAPI


@pytest.fixture(scope="module")
def openapi() -> dict:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml").read_text())


def _json_schema(schema):
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema: the type or null."""
    if isinstance(schema, list):
        return [_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: _json_schema(value) for key, value in schema.items() if key != "nullable"}
    if schema.get("nullable") and "type" in schema:
        converted["type"] = [schema["type"], "null"]
    return converted


def _validator(openapi: dict, schema_name: str):
    from jsonschema import Draft4Validator  # OpenAPI 3.0 schemas use draft-4's boolean exclusiveMinimum

    return Draft4Validator({"$ref": f"#/components/schemas/{schema_name}",
                            "components": _json_schema(openapi["components"])})


def test_openapi_routes_match_the_app(openapi, client):
    documented = {(path, method.upper()) for path, ops in openapi["paths"].items() for method in ops}
    served = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method)  # Flask's /static/<name> is OpenAPI's /static/{name}
        for rule in client.application.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert documented == served


def test_real_responses_follow_the_openapi_schema(openapi, client, example_images):
    data = base64.b64encode(example_images[0].read_bytes()).decode()
    image_response = _validator(openapi, "ImageResponse")
    for fmt in ("legacy", "coco", "polygon", "boxes"):
        answer = post_json(client, {"img_id": 3, "img_data": data, "format": fmt}).json
        image_response.validate(answer)
        assert answer["annotations"]
    listed = post_json(client, [{"img_id": 3, "img_data": data}, {"img_id": 4, "img_data": data}]).json
    for answer in listed:
        image_response.validate(answer)
    request_schema = _validator(openapi, "ImageRequest")
    request_schema.validate({"img_id": 3, "img_data": data, "classes": ["ring", 2], "format": "coco",
                             "score_threshold": 0.2, "mask_threshold": 0.4, "max_detections": 10})
    errors = _validator(openapi, "Error")
    for response in (post_json(client, "{"), client.post("/invocations", data=b"x", content_type="text/plain")):
        errors.validate(response.json)


# ------------------------------------------------------------------------------------------------ GET /model, the page


def test_model_metadata_says_what_a_client_needs(openapi, client, tensorpack_backend):
    from maskrcnn_serving.visualize import class_color

    answer = client.get("/model")
    assert answer.status_code == 200 and answer.mimetype == "application/json"
    _validator(openapi, "ModelMetadata").validate(answer.json)
    metadata = answer.json
    names = list(tensorpack_backend.class_names[1:])
    assert metadata["class_names"] == names == ["circle", "rectangle", "triangle", "ring"]
    for class_id, name in enumerate(names, start=1):  # the page draws in visualize's colours, computed once here
        blue, green, red = class_color(class_id)
        assert metadata["class_colors"][name] == f"#{red:02x}{green:02x}{blue:02x}"
    assert metadata["resize"] == {"short_edge": 320, "max_size": 576}  # model/demo/config.json
    assert (metadata["backend"], metadata["precision"]) == ("tensorpack", "float32")
    assert metadata["default_score_threshold"] == tensorpack_backend.bundle.inference.vis_score_threshold
    assert metadata["has_masks"] is True and metadata["embedding_dim"] == 64 + 4 + 1 == tensorpack_backend.embedding_dim
    assert metadata["search"] == {"configured": False, "available": False, "indexed": None}
    assert metadata["max_request_bytes"] == Settings().max_request_bytes


def test_model_metadata_is_503_while_loading_and_reports_an_index(runner, tmp_path):
    from maskrcnn_serving.search import database
    from maskrcnn_serving.search.index import InstanceIndex
    from maskrcnn_serving.search.service import SearchService

    loading = create_app(Settings(ready_wait=30.0), ModelRunner()).test_client()
    start = time.perf_counter()
    response = loading.get("/model")
    assert response.status_code == 503 and response.json["error"]["code"] == "not_ready"
    assert time.perf_counter() - start < 5  # answered at once: the page retries
    dim = runner.backend.embedding_dim
    index = InstanceIndex.open(str(tmp_path / "instances.db"), dim=dim, image_dim=64, create=True)
    row = {"vector": [1.0] + [0.0] * (dim - 1), "image": "a.jpg", "bbox": [0.0, 0.0, 1.0, 1.0], "category": "ring",
           "category_id": 4, "score": 0.9, "height": 1, "width": 1, "mask": "", "thumbnail": ""}
    index.insert_rows([row] * 3)
    service = SearchService(index.db, index.collection, dim, timeout=5.0)
    assert service.open()
    runner.pipeline.index = service
    try:
        assert create_app(Settings(), runner).test_client().get("/model").json["search"] == {
            "configured": True, "available": True, "indexed": 3}
    finally:
        runner.pipeline.index = None
        service.close()
        index.close()
        database.stop_local_servers()


def test_page_files_are_served_by_name_only_with_a_strict_policy(client):
    from maskrcnn_serving.server.web import CONTENT_SECURITY_POLICY, PAGE_FILES

    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    html = page.get_data(as_text=True)
    assert '<input id="file-input" type="file"' in html and 'id="score-threshold" type="range"' in html
    # Self-contained: no absolute URL to anywhere, no inline script or style for the policy to refuse.
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "<script>" not in html and " style=" not in html and "<style" not in html
    for name, content_type in PAGE_FILES.items():
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["Content-Type"] == content_type, name
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert not re.search(r"https?://", response.get_data(as_text=True)), name
    for path in ("/static/web.py", "/static/..%2fweb.py", "/static/../app.py", "/static/", "/static/app.js/x",
                 "/static/%2e%2e%2fapp.py", "/web/app.js"):
        response = client.get(path)
        assert response.status_code == 404 and response.json["error"]["code"] == "not_found", path
        assert "Content-Security-Policy" not in response.headers, path


# ------------------------------------------------------------------------------------------------ /ping, headers


def test_ping_answers_from_the_readiness_directory_under_serve(runner, tmp_path):
    """Under serve (a readiness directory), /ping says what the supervisor last published, whatever this worker's
    own state; the runner publishes its own state there as it changes."""
    from maskrcnn_serving.server import readiness

    settings = Settings(readiness_dir=str(tmp_path))
    client = create_app(settings, runner).test_client()
    response = client.get("/ping")
    assert response.status_code == 503 and response.json["error"]["message"] == readiness.NO_WORKER
    board = readiness.ReadinessBoard(tmp_path)
    board.publish(readiness.answer_of({4321: readiness.WorkerState("ready", "ready")}))
    response = client.get("/ping")
    assert response.status_code == 200 and response.json == {"status": "ready", "workers": [4321]}
    assert response.headers["Cache-Control"] == "no-store"
    loading = ModelRunner(settings)  # not started: it published "loading" for this process
    published = json.loads((tmp_path / readiness.WORKERS_DIR / f"{os.getpid()}.json").read_text())
    assert published == {"state": "loading", "message": loading.message}
    assert runner.worker_state == readiness.WorkerState("ready", "ready")


def test_every_answer_carries_the_security_headers(client, runner, example_images, tmp_path):
    """Issue 23, defect 8: nosniff and no framing on every answer (JSON, errors, /model, /metrics, thumbnails, the
    page), no-store on every error, Retry-After on a 503; the page's policy on the page's files only."""
    import cv2

    from maskrcnn_serving.search import database
    from maskrcnn_serving.search.index import InstanceIndex
    from maskrcnn_serving.search.service import SearchService
    from maskrcnn_serving.server import headers

    dim = runner.backend.embedding_dim
    index = InstanceIndex.open(str(tmp_path / "instances.db"), dim=dim, image_dim=64, create=True)
    thumbnail = base64.b64encode(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()).decode()
    index.insert_rows([{"vector": [1.0] + [0.0] * (dim - 1), "image": "a.jpg", "bbox": [0.0, 0.0, 1.0, 1.0],
                        "category": "ring", "category_id": 4, "score": 0.9, "height": 1, "width": 1, "mask": "",
                        "thumbnail": thumbnail}])
    (hit,) = index.search(np.asarray([[1.0] + [0.0] * (dim - 1)]), 1)[0]
    service = SearchService(index.db, index.collection, dim, timeout=5.0)  # as a worker searches it
    assert service.open()
    runner.pipeline.index = service
    image = example_images[0].read_bytes()
    loading = create_app(Settings(ready_wait=0.0), ModelRunner()).test_client()
    try:
        answers = {
            "ping": client.get("/ping"), "model": client.get("/model"), "metrics": client.get("/metrics"),
            "execution parameters": client.get("/execution-parameters"),
            "detections": client.post("/invocations", data=image, content_type="image/jpeg"),
            "detections with search fields": client.post("/invocations?neighbours=1&embeddings=true", data=image,
                                                         content_type="image/jpeg"),
            "thumbnail": client.get(f"/index/thumbnail/{hit.id}"), "page": client.get("/"),
            "page file": client.get("/static/app.js"),
            "400": post_json(client, "{"), "404": client.get("/nowhere"),
            "404 thumbnail": client.get("/index/thumbnail/7"),
            "405": client.post("/ping"), "413": client.post("/invocations", data=b"x" * (6 * 2**20 + 1),
                                                            content_type="image/jpeg"),
            "415": client.post("/invocations", data=b"x", content_type="text/plain"),
            "503": loading.get("/ping"), "503 invocations": loading.post("/invocations", data=image,
                                                                          content_type="image/jpeg"),
        }
    finally:
        runner.pipeline.index = None
        service.close()
        index.close()
        database.stop_local_servers()
    for name, response in answers.items():
        for header, value in headers.EVERY_ANSWER.items():
            assert response.headers.get(header) == value, (name, header)
        if response.status_code >= 400:
            assert response.headers["Cache-Control"] == "no-store", name
            assert "Content-Security-Policy" not in response.headers, name
        assert ("Retry-After" in response.headers) == (response.status_code == 503), name
    assert [answers[name].status_code for name in ("thumbnail", "detections with search fields", "413", "503")] == [
        200, 200, 413, 503]
    assert answers["thumbnail"].headers["Cache-Control"] == "max-age=3600"  # the route's own, kept
    assert answers["page"].headers["Cache-Control"] == "no-cache"
    from maskrcnn_serving.server.web import CONTENT_SECURITY_POLICY

    assert answers["page"].headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert all("Content-Security-Policy" not in answers[name].headers for name in ("model", "metrics", "thumbnail"))
