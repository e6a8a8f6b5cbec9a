"""The HTTP server: the seed-compatible contract (in-process Flask client on the session's demo backend), and the
same app under a real gunicorn (``live_server``: errors, readiness, concurrency)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_serving.server import ModelRunner, ServerSettings, create_app

# pycocotools 2.0.11 under numpy 2 warns on every decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def seed_notebook_request(img_id, file_bytes: bytes) -> str:
    """The request body exactly as the seed notebook builds it (SM-NB; spec-facts A.5)."""
    return json.dumps({"img_id": img_id, "img_data": base64.b64encode(file_bytes).decode("utf-8")})


def seed_notebook_rle_to_binary_mask(rle: dict) -> np.ndarray:
    """The seed notebook's decoding logic (spec-facts A.7, SM-NB cell 39), rewritten from its description:
    alternating runs of zeros and ones, starting with zeros, laid out flat and reshaped in C order to ``size``."""
    height, width = rle["size"]
    flat = np.zeros(height * width, dtype=np.uint8)
    position, value = 0, 0
    for count in rle["counts"]:
        if value:
            flat[position : position + count] = 1
        position += count
        value = 1 - value
    assert position == height * width
    return flat.reshape((height, width))


def assert_legacy_equals_coco(legacy: dict, coco: dict, img_id: str) -> int:
    """Every detection's mask from the seed-format answer equals pycocotools' decoding of the coco answer."""
    assert legacy["img_id"] == coco["img_id"] == img_id
    assert len(legacy["annotations"]) == len(coco["annotations"])
    for old, new in zip(legacy["annotations"], coco["annotations"], strict=True):
        assert (old["category_id"], old["category_name"], old["score"]) == (
            new["category_id"], new["category_name"], new["score"]
        )
        assert isinstance(new["segmentation"]["counts"], str)
        assert old["segmentation"]["size"] == new["segmentation"]["size"]
        seed_mask = seed_notebook_rle_to_binary_mask(old["segmentation"])
        coco_mask = mask_utils.decode({"size": new["segmentation"]["size"], "counts": new["segmentation"]["counts"]})
        assert np.array_equal(seed_mask, coco_mask)
        assert all(isinstance(v, int) for v in old["bbox"])
    return len(legacy["annotations"])


@pytest.fixture(scope="module")
def runner(tensorpack_backend) -> ModelRunner:
    return ModelRunner(backend=tensorpack_backend).start(background=False)


@pytest.fixture(scope="module")
def client(runner):
    return create_app(ServerSettings(), runner).test_client()


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
        full = dets.masks(0.5)
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
    return PredictOptions(score_threshold=float(backend.bundle.config["TEST.RESULT_SCORE_THRESH_VIS"]))


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
    loading = create_app(ServerSettings(ready_wait=0.0), ModelRunner()).test_client()
    for response in (loading.get("/ping"), loading.post("/invocations", data=b"x", content_type="image/jpeg")):
        assert response.status_code == 503 and response.json["error"]["code"] == "not_ready"
        assert response.headers["Retry-After"]
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    failed = ModelRunner("tensorpack", str(tmp_path)).start(background=False)
    assert failed.state == "failed"
    assert os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"  # workers sharing a GPU never take all of it
    client = create_app(ServerSettings(ready_wait=30.0), failed).test_client()
    start = time.perf_counter()
    for response in (client.get("/ping"), client.post("/invocations", data=b"x", content_type="image/jpeg")):
        assert response.status_code == 503 and "failed to load" in response.json["error"]["message"]
    assert time.perf_counter() - start < 5  # a failed model is not waited for


def test_invocations_wait_for_a_loading_worker_ping_does_not(tensorpack_backend, example_images):
    runner = ModelRunner(backend=tensorpack_backend)
    client = create_app(ServerSettings(ready_wait=60.0), runner).test_client()
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
        def predict(self, images, options):
            raise RuntimeError("secret internal detail")

    runner = ModelRunner(backend=tensorpack_backend).start(background=False)
    runner.predictor = Broken()
    client = create_app(ServerSettings(), runner).test_client()
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
    for name in ("decode", "preprocess", "model", "postprocess", "encode"):  # the tensorpack backend reports preprocess
        assert f'maskrcnn_stage_duration_seconds_count{{stage="{name}"}}' in text


def test_serve_refuses_a_model_dir_it_cannot_load(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maskrcnn_serving.cli", "serve", "--model-dir", str(tmp_path), "--host", "127.0.0.1",
         "--port", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "cannot load the model" in result.stderr and str(tmp_path) in result.stderr


# ------------------------------------------------------------------------------------------------ real gunicorn


def _png_declaring(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_ping_is_503_until_warm_up_then_200(live_server):
    pings = [(t, s, body) for t, route, s, body in live_server.startup.responses if route == "/ping"]
    statuses = [s for _, s, _ in pings]
    assert 503 in statuses and statuses[-1] == 200
    first_ok = statuses.index(200)
    assert all(s == 503 for s in statuses[:first_ok])
    for _, status, body in pings:
        if status == 503:
            assert body["error"]["code"] == "not_ready"
    invocations = [(s, body) for _, route, s, body in live_server.startup.responses if route == "/invocations"]
    assert any(s == 503 and body["error"]["code"] == "not_ready" for s, body in invocations)
    assert "model ready" in live_server.log()


def _error_cases(image: bytes) -> list[tuple[str, dict, int, str]]:
    encoded = base64.b64encode(image).decode()
    json_headers = {"Content-Type": "application/json"}
    return [
        ("invalid JSON", {"data": b'{"img_id": 1, "img_data": ', "headers": json_headers}, 400, "invalid_json"),
        ("invalid base64", {"json": {"img_id": 1, "img_data": "abcde"}}, 400, "invalid_base64"),
        ("missing img_data", {"json": {"img_id": 1}}, 400, "missing_field"),
        ("missing img_id", {"json": {"img_data": encoded}}, 400, "missing_field"),
        ("img_data not a string", {"json": {"img_id": 1, "img_data": 12}}, 400, "invalid_field"),
        ("bad option", {"json": {"img_id": 1, "img_data": encoded, "score_threshold": "high"}}, 400,
         "invalid_request"),
        ("bad query option", {"data": image, "headers": {"Content-Type": "image/jpeg"},
                              "params": {"format": "svg"}}, 400, "invalid_request"),
        ("not an image", {"json": {"img_id": 1, "img_data": base64.b64encode(b"hello world").decode()}}, 400,
         "not_an_image"),
        ("corrupt image", {"data": image[:200], "headers": {"Content-Type": "image/jpeg"}}, 400, "not_an_image"),
        ("body over the limit", {"data": b"\xff" * (6 * 2**20 + 1), "headers": {"Content-Type": "image/jpeg"}},
         413, "request_too_large"),
        ("content type", {"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("no content type", {"data": b"hello"}, 415, "unsupported_media_type"),
        ("too many pixels", {"data": _png_declaring(10000, 6000), "headers": {"Content-Type": "image/png"}}, 422,
         "too_many_pixels"),
    ]


def test_error_classes_get_their_status_and_json_body(live_server, example_images):
    image = example_images[0].read_bytes()
    session = requests.Session()
    for name, kwargs, status, code in _error_cases(image):
        response = session.post(f"{live_server.url}/invocations", timeout=60, **kwargs)
        assert response.status_code == status, (name, response.text)
        assert response.headers["Content-Type"] == "application/json", name
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, name
        assert body["error"]["code"] == code, (name, body)
        assert "Traceback" not in response.text
    for method, path, status in (("GET", "/nowhere", 404), ("GET", "/invocations", 405), ("POST", "/ping", 405)):
        response = session.request(method, f"{live_server.url}{path}", timeout=10)
        assert response.status_code == status and "error" in response.json()
    assert live_server.alive()
    assert session.get(f"{live_server.url}/ping", timeout=10).status_code == 200


def test_response_over_the_limit_is_413_with_advice(live_server, example_images):
    body = {"img_id": 1, "img_data": base64.b64encode(example_images[0].read_bytes()).decode(),
            "score_threshold": 0.0, "max_detections": 100}
    response = requests.post(f"{live_server.url}/invocations", json=body, timeout=60)
    assert response.status_code == 413, len(response.content)
    error = response.json()["error"]
    assert error["code"] == "response_too_large" and "format=coco" in error["message"]
    smaller = requests.post(f"{live_server.url}/invocations", json={**body, "format": "coco", "max_detections": 30},
                            timeout=60)
    assert smaller.status_code == 200 and len(smaller.json()["annotations"]) == 30


def test_metrics_aggregate_all_workers(live_server, example_images):
    session = requests.Session()
    for _ in range(4):
        session.post(f"{live_server.url}/invocations", data=example_images[1].read_bytes(),
                     headers={"Content-Type": "image/jpeg"}, timeout=60)
    texts = [session.get(f"{live_server.url}/metrics", timeout=10).text for _ in range(4)]
    for text in texts:  # whichever worker answers, it reports the requests of both
        line = next(ln for ln in text.splitlines()
                    if ln.startswith('maskrcnn_requests_total{route="/invocations",status="200"}'))
        assert float(line.split()[-1]) >= 4
        assert 'maskrcnn_stage_duration_seconds_count{stage="model"}' in text


def small_images(example_images: list[Path]) -> list[bytes]:
    """48x240 bands through the examples. The model resizes to its short edge (320) capped by its long edge (576),
    so a wide band is a small network input (96x576): the concurrency test costs ~0.1 s per request."""
    import cv2

    bands = []
    for index, path in enumerate(example_images):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        height, width = image.shape[:2]
        top, left = height // 2 - 24 + 8 * index, (index * 29) % (width - 240)
        bands.append(cv2.imencode(".png", image[top : top + 48, left : left + 240])[1].tobytes())
    return bands


def test_concurrent_clients_get_the_sequential_answers(live_server, example_images):
    """8 concurrent clients x 50 requests against 2 workers: every answer 200 and equal to the sequential one."""
    images = small_images(example_images)
    bodies = [json.dumps({"img_id": i, "img_data": base64.b64encode(data).decode()}) for i, data in enumerate(images)]
    url = f"{live_server.url}/invocations"
    headers = {"Content-Type": "application/json"}
    session = requests.Session()
    expected = [session.post(url, data=body, headers=headers, timeout=60) for body in bodies]
    assert all(r.status_code == 200 for r in expected)
    expected_json = [r.json() for r in expected]
    assert sum(len(e["annotations"]) for e in expected_json) > 0

    def client(index: int) -> list[tuple[int, int, dict | None]]:
        own = requests.Session()
        results = []
        for request_number in range(50):
            image_index = (index + request_number) % len(bodies)
            response = own.post(url, data=bodies[image_index], headers=headers, timeout=120)
            results.append((image_index, response.status_code, response.json() if response.ok else None))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = [item for chunk in pool.map(client, range(8)) for item in chunk]
    elapsed = time.perf_counter() - start
    assert len(outcomes) == 400
    assert [status for _, status, _ in outcomes] == [200] * 400
    for image_index, _, answer in outcomes:
        assert answer == expected_json[image_index]
    print(f"\n400 concurrent requests in {elapsed:.1f} s ({400 / elapsed:.1f} req/s)")
    assert live_server.alive()


# ------------------------------------------------------------------------------------------------ OpenAPI


@pytest.fixture(scope="module")
def openapi() -> dict:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml").read_text())


def _validator(openapi: dict, schema_name: str):
    from jsonschema import Draft4Validator  # OpenAPI 3.0 schemas use draft-4's boolean exclusiveMinimum

    return Draft4Validator({"$ref": f"#/components/schemas/{schema_name}", "components": openapi["components"]})


def test_openapi_routes_match_the_app(openapi, client):
    documented = {(path, method.upper()) for path, ops in openapi["paths"].items() for method in ops}
    served = {
        (rule.rule, method)
        for rule in client.application.url_map.iter_rules()
        if rule.endpoint != "static"
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
