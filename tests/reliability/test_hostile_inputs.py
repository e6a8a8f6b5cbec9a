"""The hostile-input catalogue (docs/reliability.md), each case sent to the session's real gunicorn server
(``live_server``: 2 workers, demo model) with its documented answer. Afterwards: zero 5xx in the server's own
metrics, no worker replaced, ``/ping`` 200.

Where an input is served (odd pixel formats, EXIF rotation, URL-safe base64, ...), the answer must equal the answer
for a reference encoding of the pixels the server should have decoded, so "200" also means "the right image".
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import cv2
import numpy as np
import pytest
import requests
from PIL import Image

from maskrcnn_serving.settings import Limits

LIMITS = Limits()
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def scene(example_images) -> np.ndarray:
    """A small BGR crop of an example image with objects in it (small: every model call stays cheap)."""
    image = cv2.imread(str(example_images[0]), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(image[100:220, 60:260])


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def pil_bytes(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A valid small JPEG whose frame header (SOF0) is patched to declare ``width`` x ``height``."""
    data = bytearray(pil_bytes(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(pil_bytes(Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = width.to_bytes(4, "little") + height.to_bytes(4, "little")
    return bytes(data)


@dataclass
class Case:
    """One hostile input: ``request`` is the keyword arguments of ``requests.post`` to /invocations. The answer is
    ``status`` with error ``code``, or 200 with the annotations of ``same_as`` (a PNG of the pixels the server must
    decode) and, when given, ``size`` [H, W] on every legacy segmentation."""

    name: str
    request: dict
    status: int = 200
    code: str | None = None
    same_as: bytes | None = None
    options: dict = field(default_factory=dict)


def catalogue(scene: np.ndarray) -> list[Case]:
    rgb = Image.fromarray(scene[:, :, ::-1])
    gray = cv2.cvtColor(scene, cv2.COLOR_BGR2GRAY)
    gray_as_bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    scene_png = png(scene)
    scene_jpeg = pil_bytes(rgb, "JPEG", quality=95)
    encoded = b64(scene_png)
    small = {"max_detections": 5}

    def raw(data: bytes, content_type: str = "image/png", **extra) -> dict:
        return {"data": data, "headers": {"Content-Type": content_type}, **extra}

    def doc(**fields) -> dict:
        return {"json": {"img_id": "x", "img_data": encoded, **fields}}

    def text(body: str | bytes) -> dict:
        return {"data": body, "headers": JSON}

    def literal(extra: str) -> dict:  # JSON that json.dumps would not write (NaN, huge integers)
        return text('{"img_id": 1, "img_data": "' + encoded + '", ' + extra + "}")

    alpha = np.dstack([scene, np.random.default_rng(0).integers(0, 256, scene.shape[:2], dtype=np.uint8)])
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette_bgr = np.asarray(palette.convert("RGB"))[:, :, ::-1]
    cmyk_jpeg = pil_bytes(rgb.convert("CMYK"), "JPEG", quality=95)
    deep = "[" * 100_000 + "]" * 100_000
    big_blank = b64(pil_bytes(Image.new("L", (7000, 5000)), "PNG"))  # 35 M pixels, under the per-image limit
    cases = [
        # -------------------------------------------------------------------------------- bodies that are not images
        Case("empty raw body", raw(b"", "image/jpeg"), 400, "not_an_image"),
        Case("empty JSON body", text(b""), 400, "invalid_json"),
        Case("zero-byte image in JSON", doc(img_data=""), 400, "not_an_image"),
        Case("JPEG truncated in its header", raw(scene_jpeg[:300], "image/jpeg"), 400, "not_an_image"),
        Case("JPEG truncated in its data", raw(scene_jpeg[: len(scene_jpeg) // 2], "image/jpeg"), 400,
             "not_an_image"),
        Case("PNG truncated", raw(scene_png[: len(scene_png) // 2]), 400, "not_an_image"),
        Case("text as image/jpeg", raw(b"definitely not a JPEG file", "image/jpeg"), 400, "not_an_image"),
        Case("zeros as image/png", raw(bytes(4096)), 400, "not_an_image"),
        Case("GIF (unsupported format)", raw(pil_bytes(rgb, "GIF"), "image/gif"), 400, "not_an_image"),
        Case("float TIFF (no 8-bit view)", raw(cv2.imencode(".tiff", scene.astype(np.float32) / 255)[1].tobytes(),
                                               "image/tiff"), 400, "not_an_image"),
        Case("base64 of text", doc(img_data=b64(b"hello world")), 400, "not_an_image"),
        # -------------------------------------------------------------------------------------- sizes and shapes
        Case("1x1 image", raw(png(scene[:1, :1])), same_as=png(scene[:1, :1])),
        Case("1x3000 image", raw(png(np.tile(scene[:1, :200], (1, 15, 1))))),
        Case("3000x1 image", raw(png(np.tile(scene[:200, :1], (15, 1, 1))))),
        Case("2x5000 image", raw(png(np.zeros((2, 5000, 3), np.uint8)))),
        Case("decompression bomb: PNG declaring 10000x6000", raw(pil_bytes(Image.new("1", (10000, 6000)), "PNG")),
             422, "too_many_pixels"),
        Case("decompression bomb: JPEG declaring 65500x65500", raw(jpeg_declaring(65500, 65500), "image/jpeg"),
             422, "too_many_pixels"),
        Case("decompression bomb: BMP declaring 30000x30000", raw(bmp_declaring(30000, 30000), "image/bmp"),
             422, "too_many_pixels"),
        Case("16 images of 35 M pixels each in one list (over the total)",
             {"json": [{"img_id": i, "img_data": big_blank} for i in range(LIMITS.max_images)]}, 422,
             "too_many_pixels"),
        Case("BMP declaring 5000x5000 with no pixel data", raw(bmp_declaring(5000, 5000), "image/bmp"), 400,
             "not_an_image"),
        # ---------------------------------------------------------------------------------- pixel formats, EXIF
        Case("16-bit RGB PNG", raw(png(scene.astype(np.uint16) * 257)), same_as=scene_png),
        Case("16-bit grayscale PNG", raw(png(gray.astype(np.uint16) * 257)), same_as=png(gray_as_bgr)),
        Case("grayscale PNG", raw(png(gray)), same_as=png(gray_as_bgr)),
        Case("RGBA PNG (alpha dropped)", raw(png(alpha)), same_as=scene_png),
        Case("palette PNG", raw(pil_bytes(palette, "PNG")), same_as=png(palette_bgr)),
        Case("CMYK JPEG", raw(cmyk_jpeg, "image/jpeg"), same_as=png(cv2.imdecode(np.frombuffer(cmyk_jpeg, np.uint8),
                                                                                   cv2.IMREAD_COLOR))),
        Case("BMP", raw(pil_bytes(rgb, "BMP"), "image/bmp"), same_as=scene_png),
        Case("TIFF", raw(pil_bytes(rgb, "TIFF"), "image/tiff"), same_as=scene_png),
        Case("lossless WebP", raw(pil_bytes(rgb, "WEBP", lossless=True), "image/webp"), same_as=scene_png),
        Case("image/gif label on a PNG (the bytes decide)", raw(scene_png, "image/gif"), same_as=scene_png),
    ]
    for orientation, transpose in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
                                   (3, Image.Transpose.ROTATE_180)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = pil_bytes(rgb.transpose(transpose), "JPEG", quality=95, exif=exif.tobytes())
        upright = cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_COLOR)
        # The decoder must have applied the orientation: upright shape, pixels close to the scene (JPEG loss only).
        assert upright.shape == scene.shape and np.abs(upright.astype(int) - scene).mean() < 4
        cases.append(Case(f"EXIF orientation {orientation}", raw(stored, "image/jpeg"), same_as=png(upright)))
    cases += [
        # ----------------------------------------------------------------------------------------------- base64
        Case("base64 with bad padding", doc(img_data=encoded[:-2].rstrip("=") + "A"), 400, "invalid_base64"),
        Case("base64, URL-safe alphabet", doc(img_data=base64.urlsafe_b64encode(scene_png).decode()),
             same_as=scene_png),
        Case("base64 with newlines (MIME)", doc(img_data=base64.encodebytes(scene_png).decode()), same_as=scene_png),
        Case("base64 with spaces and tabs", doc(img_data=" \t".join(re.findall(".{1,60}", encoded))),
             same_as=scene_png),
        Case("base64 with non-ASCII characters", doc(img_data="\u00e9" + encoded), 400, "invalid_base64"),
        Case("base64 data: URL", doc(img_data="data:image/png;base64," + encoded), same_as=scene_png),
        # -------------------------------------------------------------------------------------------------- JSON
        Case("invalid JSON", text(b'{"img_id": 1, "img_data": '), 400, "invalid_json"),
        Case("invalid UTF-8", text(b'{"img_id": "\xff\xfe", "img_data": "x"}'), 400, "invalid_json"),
        Case("JSON string", text('"just a string"'), 400, "invalid_request"),
        Case("JSON number", text("42"), 400, "invalid_request"),
        Case("JSON null", text("null"), 400, "invalid_request"),
        Case("JSON list of numbers", text("[1, 2]"), 400, "invalid_request"),
        Case("empty JSON list", text("[]"), 400, "invalid_request"),
        Case("JSON nested 100000 deep", text(deep), 400, "invalid_json"),
        Case("img_id nested 100000 deep", text('{"img_data": "x", "img_id": ' + deep + "}"), 400, "invalid_json"),
        Case("missing img_data", {"json": {"img_id": 1}}, 400, "missing_field"),
        Case("missing img_id", {"json": {"img_data": encoded}}, 400, "missing_field"),
        Case("img_data a number", doc(img_data=12), 400, "invalid_field"),
        Case("img_data a list", doc(img_data=[encoded]), 400, "invalid_field"),
        Case("img_data null", doc(img_data=None), 400, "invalid_field"),
        Case("extra fields are ignored", doc(extra={"a": [1, 2]}, rpn=True), same_as=scene_png),
        Case("img_id an object (echoed as str)", doc(img_id={"a": [1, 2]}), same_as=scene_png),
        Case("img_id a 40 kB string", doc(img_id="i" * 40_000, max_detections=1), same_as=scene_png,
             options={"max_detections": 1}),
        Case("option a 1 MB string", doc(format="x" * 1_000_000), 400, "invalid_request"),
        Case("NaN threshold", literal('"score_threshold": NaN'), 400, "invalid_request"),
        Case("Infinity max_detections", literal('"max_detections": Infinity'), 400, "invalid_request"),
        Case("400-digit integer option", literal('"score_threshold": ' + "9" * 400), 400, "invalid_request"),
        Case("5000-digit integer", literal('"max_detections": ' + "9" * 5000), 400, "invalid_json"),
        Case("boolean threshold", doc(score_threshold=True), 400, "invalid_request"),
        Case("string threshold", doc(score_threshold="0.5"), 400, "invalid_request"),
        Case("fractional max_detections", doc(max_detections=2.5), 400, "invalid_request"),
        Case("classes an object", doc(classes={"a": 1}), 400, "invalid_request"),
        Case("classes nested list", doc(classes=[[1]]), 400, "invalid_request"),
        Case("format a number", doc(format=3), 400, "invalid_request"),
        Case("too many images in a list", {"json": [{"img_id": i, "img_data": "x"} for i in
                                                    range(LIMITS.max_images + 1)]}, 413, "too_many_images"),
        # ------------------------------------------------------------------------------- option values in range
        Case("score_threshold -0.1", doc(score_threshold=-0.1), 400, "invalid_request"),
        Case("score_threshold 1.5", doc(score_threshold=1.5), 400, "invalid_request"),
        Case("mask_threshold 0", doc(mask_threshold=0), 400, "invalid_request"),
        Case("mask_threshold 1.1", doc(mask_threshold=1.1), 400, "invalid_request"),
        Case("max_detections 0", doc(max_detections=0), 400, "invalid_request"),
        Case("max_detections 1001", doc(max_detections=1001), 400, "invalid_request"),
        Case("max_detections 10**30", doc(max_detections=10**30), 400, "invalid_request"),
        Case("unknown class name", doc(classes=["unicorn"]), 400, "invalid_request"),
        Case("class id 0 (background)", doc(classes=[0]), 400, "invalid_request"),
        Case("empty classes", doc(classes=[]), 400, "invalid_request"),
        Case("unknown format", doc(format="xml"), 400, "invalid_request"),
        Case("query option NaN", raw(scene_png, params={"score_threshold": "nan"}), 400, "invalid_request"),
        Case("query option 1e400", raw(scene_png, params={"max_detections": "1e400"}), 400, "invalid_request"),
        Case("bad option in custom attributes",
             {"data": scene_png, "headers": {"Content-Type": "image/png",
                                             "X-Amzn-SageMaker-Custom-Attributes": "max_detections=abc"}},
             400, "invalid_request"),
        Case("junk custom attributes are ignored",
             {"data": scene_png, "headers": {"Content-Type": "image/png",
                                             "X-Amzn-SageMaker-Custom-Attributes": "%%%;;==&&"}},
             same_as=scene_png),
        # ------------------------------------------------------------------------------------------ content types
        Case("text/plain", raw(scene_png, "text/plain"), 415, "unsupported_media_type"),
        Case("no content type", {"data": scene_png}, 415, "unsupported_media_type"),
        Case("multipart/form-data", raw(b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x"), 415,
             "unsupported_media_type"),
        Case("form-urlencoded", {"data": {"img_data": encoded}}, 415, "unsupported_media_type"),
        Case("content type of control characters", raw(scene_png, ";;;\x01"), 415, "unsupported_media_type"),
        Case("UTF-16 JSON with a charset", {"data": json.dumps({"img_id": 1, "img_data": encoded}).encode("utf-16"),
                                            "headers": {"Content-Type": "application/json; charset=utf-16"}},
             same_as=scene_png),
        # ------------------------------------------------------------------------------------------- body limits
        Case("declared body over the limit", raw(b"\xff" * (LIMITS.max_request_bytes + 1), "image/jpeg"), 413,
             "request_too_large"),
        Case("chunked body over the limit", raw(iter([b"\xff" * (1 << 20)] * 7), "image/jpeg"), 413,
             "request_too_large"),
        Case("chunked body within the limit", raw(iter([scene_png[:1000], scene_png[1000:]])), same_as=scene_png),
    ]
    for case in cases:
        case.options = {**small, **case.options}
    return cases


def _ids() -> list[str]:
    return [case.name for case in catalogue(np.zeros((120, 200, 3), np.uint8))]


@pytest.fixture(scope="module")
def session() -> requests.Session:
    return requests.Session()


@pytest.fixture(scope="module")
def worker_pids(live_server) -> set[int]:
    return _children(live_server.process.pid)


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return {int(p) for p in children.read().split()}


_reference_cache: dict[tuple[bytes, str], list] = {}


def reference_annotations(session, url: str, image_png: bytes, options: dict) -> list:
    key = (image_png, json.dumps(options, sort_keys=True))
    if key not in _reference_cache:
        response = session.post(f"{url}/invocations", data=image_png, params=options,
                                headers={"Content-Type": "image/png"}, timeout=120)
        assert response.status_code == 200, response.text
        _reference_cache[key] = response.json()["annotations"]
    return _reference_cache[key]


@pytest.fixture(scope="module")
def cases(scene) -> list[Case]:
    return catalogue(scene)


@pytest.mark.parametrize("index", range(len(_ids())), ids=_ids())
def test_hostile_input_gets_its_documented_answer(index, live_server, cases, session, worker_pids):
    case = cases[index]
    request = dict(case.request)
    if case.status == 200:  # keep answers small: the server's response limit is 64 kB in tests
        if "json" in request and isinstance(request["json"], dict):
            request["json"] = {**case.options, **request["json"]}
        else:
            request["params"] = {**case.options, **request.get("params", {})}
    response = session.post(f"{live_server.url}/invocations", timeout=120, **request)
    assert response.status_code == case.status, (case.name, response.text[:500])
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    if case.status != 200:
        assert set(body) == {"error"} and body["error"]["code"] == case.code, (case.name, body)
        assert len(response.content) < 4096, "error bodies are bounded"
        assert "Traceback" not in response.text and "/work/" not in response.text and ".py" not in response.text
        return
    annotations = body["annotations"]
    if case.same_as is not None:
        assert annotations == reference_annotations(session, live_server.url, case.same_as, case.options), case.name
    for annotation in annotations:
        x, y, w, h = annotation["bbox"]
        height, width = annotation["segmentation"]["size"]
        assert 0 <= x <= x + w <= width and 0 <= y <= y + h <= height
        assert sum(annotation["segmentation"]["counts"]) == height * width
    if "json" in request and isinstance(request["json"], dict):
        assert body["img_id"] == str(request["json"]["img_id"])


def _raw_exchange(url: str, payload: bytes, read_timeout: float = 30.0) -> bytes:
    """Send raw bytes on a fresh connection and read the answer until the server closes it."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=read_timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


MALFORMED_HTTP = [
    ("request line over gunicorn's limit", b"GET /ping?" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "bad_http_request"),
    ("header over gunicorn's limit", b"GET /ping HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 10000 + b"\r\n\r\n", 431,
     "headers_too_large"),
    ("binary garbage", b"\x00\x01\x02 hello\r\n\r\n", 400, "bad_http_request"),
    ("negative Content-Length", b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400,
     "bad_http_request"),
    ("Content-Length and chunked", b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\nContent-Type: image/png\r\n\r\n0\r\n\r\n", 400, "bad_http_request"),
    ("malformed chunk size", b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Type: image/png\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400, "malformed_body"),
    ("body shorter than its Content-Length", b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png"
     b"\r\nContent-Length: 100000\r\n\r\nabc", 400, "not_an_image"),  # the body is what arrived
    ("body declared over the limit, not sent", b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png"
     b"\r\nContent-Length: 99999999999\r\n\r\n", 413, "request_too_large"),  # refused before reading
    ("unknown route", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404,
     "not_found"),
    # The web page's routes serve fixed names only; no part of a path reaches the file system.
    ("page file path traversal", b"GET /static/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
     404, "not_found"),
    ("page file encoded traversal", b"GET /static/..%2f..%2fserver%2fapp.py HTTP/1.1\r\nHost: x\r\n"
     b"Connection: close\r\n\r\n", 404, "not_found"),
    ("page file not in the page", b"GET /static/web.py HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404,
     "not_found"),
    ("page file NUL byte", b"GET /static/app.js%00.png HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404,
     "not_found"),
    ("thumbnail id not a number", b"GET /index/thumbnail/notanumber HTTP/1.1\r\nHost: x\r\nConnection: close"
     b"\r\n\r\n", 404, "not_found"),
    ("thumbnail by path", b"GET /index/thumbnail/..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: x\r\nConnection: close"
     b"\r\n\r\n", 404, "not_found"),
    ("POST to the model metadata", b"POST /model HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close"
     b"\r\n\r\n", 405, "method_not_allowed"),
    ("thumbnail id over int64", b"GET /index/thumbnail/99999999999999999999999 HTTP/1.1\r\nHost: x\r\n"
     b"Connection: close\r\n\r\n", 404, "not_found"),
]


@pytest.mark.parametrize(("name", "payload", "status", "code"), MALFORMED_HTTP, ids=[m[0] for m in MALFORMED_HTTP])
def test_malformed_http_gets_a_json_4xx(name, payload, status, code, live_server):
    answer = _raw_exchange(live_server.url, payload)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), (name, answer[:300])
    assert b"application/json" in head
    assert json.loads(body)["error"]["code"] == code


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_sent_in_one_write_gets_a_readable_413(live_server, chunked):
    """Python's http.client (like curl and most SDKs) sends the whole body before reading the answer: the server
    must read (drain) an oversized body before answering 413, or the client sees a reset connection instead."""
    parsed = urlparse(live_server.url)
    body = b"\xff" * (LIMITS.max_request_bytes + (1 << 20))
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        if chunked:
            pieces = (body[i : i + (1 << 18)] for i in range(0, len(body), 1 << 18))
            connection.request("POST", "/invocations", body=pieces, headers={"Content-Type": "image/jpeg"},
                               encode_chunked=True)
        else:
            connection.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 413 and answer["error"]["code"] == "request_too_large"


def test_slow_client_is_served_and_does_not_block_others(live_server, scene, session):
    """A client trickling its body (pauses well under the read timeout) gets its answer; meanwhile other clients
    are served as usual."""
    body = json.dumps({"img_id": "slow", "img_data": b64(png(scene)), "max_detections": 5}).encode()
    parsed = urlparse(live_server.url)
    result: dict = {}

    def slow_client() -> None:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=60) as sock:
            sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
            pieces = [body[i : i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(0.5)
            result["answer"] = b"".join(iter(lambda: sock.recv(65536), b""))

    thread = threading.Thread(target=slow_client)
    start = time.monotonic()
    thread.start()
    others = []
    while thread.is_alive() and time.monotonic() - start < 30:
        tick = time.monotonic()
        assert session.get(f"{live_server.url}/ping", timeout=10).status_code == 200
        others.append(time.monotonic() - tick)
        time.sleep(0.2)
    thread.join(timeout=60)
    head, _, answer = result["answer"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    expected = reference_annotations(session, live_server.url, png(scene), {"max_detections": 5})
    assert json.loads(answer)["annotations"] == expected
    assert time.monotonic() - start >= 3.0 and max(others) < 5.0


def test_server_survived_the_catalogue(live_server, worker_pids, session):
    """Zero 5xx in the server's own counters, the same workers as before the catalogue, /ping 200."""
    assert live_server.alive()
    assert _children(live_server.process.pid) == worker_pids, "a worker died and was replaced"
    metrics = session.get(f"{live_server.url}/metrics", timeout=10).text
    server_errors = [line for line in metrics.splitlines()
                     if line.startswith("maskrcnn_requests_total") and re.search(r'status="5\d\d"', line)
                     and float(line.split()[-1]) > 0 and 'status="503"' not in line]
    assert server_errors == []
    # Metric labels come from the matched route, never the raw path: random paths cannot grow the series.
    routes = set(re.findall(r'^maskrcnn_requests_total\{route="([^"]*)"', metrics, re.MULTILINE))
    assert routes <= {"/ping", "/invocations", "/execution-parameters", "/metrics", "/model", "/", "/static/<name>",
                      "/index/thumbnail/<int:instance_id>", "unmatched"}, routes
    assert session.get(f"{live_server.url}/ping", timeout=10).status_code == 200
