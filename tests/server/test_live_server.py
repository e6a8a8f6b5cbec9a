"""The server under a real gunicorn (the session's ``live_server``: 2 workers on the demo model): readiness,
errors from the app and from gunicorn itself, response limits, metrics across workers, concurrency."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image


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


