"""Instance search in the real server: ``serve --index`` with 2 workers sharing one Milvus Lite database while
``index build`` writes to it beside them; the ``neighbours`` / ``same_class`` / ``embeddings`` options, thumbnails
by id (checked: planted bytes never reach a client), and a clear 400 on a server without an index. The database
faults are tests/reliability/test_faults.py's."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import requests

from maskrcnn_serving.search import database
from maskrcnn_serving.search.index import THUMBNAIL_QUALITY, InstanceIndex
from testsupport.hostile import planted_thumbnails


def post(url: str, data: bytes, **options) -> requests.Response:
    return requests.post(f"{url}/invocations", data=data, params=options, timeout=60,
                         headers={"Content-Type": "image/jpeg", "Connection": "close"})


def test_both_workers_answer_neighbours_and_build_runs_beside_them(indexed_server, demo_model_dir, example_images):
    server, db, root = indexed_server
    indexed = example_images[0].read_bytes()
    for _ in range(6):  # new connections: both workers answer
        answer = post(server.url, indexed, format="boxes", neighbours=3)
        assert answer.status_code == 200, answer.text
        assert str(root) not in answer.text  # images by their names under the indexed folder, no server path
        for annotation in answer.json()["annotations"]:
            best = annotation["neighbours"][0]
            assert len(annotation["neighbours"]) == 3 and best["distance"] < 1e-4
            assert best["bbox"] == pytest.approx(annotation["bbox"], abs=1e-3)
            assert best["image"] == example_images[0].name
    assert server.log().count("instance index open") == 2

    second = root / "second"
    second.mkdir()
    shutil.copy(example_images[2], second / example_images[2].name)
    build = subprocess.run([sys.executable, "-m", "maskrcnn_serving.cli", "index", "build", "--model-dir",
                            str(demo_model_dir), "--db", db, str(second)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    answer = post(server.url, example_images[2].read_bytes(), format="boxes", neighbours=1).json()
    # the server sees them, by their names under the folder indexed
    assert {a["neighbours"][0]["image"] for a in answer["annotations"]} == {example_images[2].name}


def test_same_class_embeddings_and_thumbnails(indexed_server, example_images):
    server, _, _ = indexed_server
    answer = post(server.url, example_images[1].read_bytes(), format="coco", neighbours=4, same_class="true",
                  embeddings="true").json()
    assert len(answer["image_embedding"]) == 64
    for annotation in answer["annotations"]:
        assert {n["category_name"] for n in annotation["neighbours"]} == {annotation["category_name"]}
        assert len(annotation["embedding"]) == 69
    first = answer["annotations"][0]["neighbours"][0]["id"]
    thumbnail = requests.get(f"{server.url}/index/thumbnail/{first}", timeout=10)
    assert thumbnail.status_code == 200 and thumbnail.headers["Content-Type"] == "image/jpeg"
    assert thumbnail.content[:2] == b"\xff\xd8" and thumbnail.headers["X-Content-Type-Options"] == "nosniff"
    for bad in ("123456789012", "99999999999999999999999", "abc", "../etc/passwd", "-1"):
        missing = requests.get(f"{server.url}/index/thumbnail/{bad}", timeout=10)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", bad


def test_neighbours_without_an_index_is_a_clear_400(live_server, example_images):
    answer = post(live_server.url, example_images[0].read_bytes(), neighbours=3)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "search_not_configured"
    thumbnail = requests.get(f"{live_server.url}/index/thumbnail/1", timeout=10)
    assert thumbnail.status_code == 404 and thumbnail.json()["error"]["code"] == "not_found"


def test_planted_thumbnails_never_reach_a_client(indexed_server):
    """Every planted thumbnail of the catalogue, written into the server's index through its own database (what a
    local process with access could do): a non-image is 404 (the log says why), a JPEG is served only as its
    decoded pixels encoded again, with nosniff; none of the planted bytes come back."""
    server, db, _ = indexed_server
    index = InstanceIndex.open(db, start_database=False)
    cases = planted_thumbnails()
    try:
        rng = np.random.default_rng(7)
        vectors = rng.normal(size=(len(cases), index.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = {}
        for case, vector in zip(cases, vectors, strict=True):
            index.insert_rows([{"vector": vector.tolist(), "image": f"planted: {case.name}", "category": "planted",
                                "bbox": [0.0, 0.0, 1.0, 1.0], "category_id": 1, "score": 0.5, "height": 1,
                                "width": 1, "mask": "", "thumbnail": case.stored}])
            (hit,) = index.search(vector[None], k=1)[0]
            assert hit.image == f"planted: {case.name}"
            ids[case.name] = hit.id
        _check_planted(server, cases, ids)
    finally:
        client = database.connect(db, start=False)  # the planted rows leave the session's index
        client.delete(index.collection, filter='category == "planted"')
        client.close()
        index.close()
    assert "is not a JPEG thumbnail" in server.log()


def _check_planted(server, cases, ids) -> None:
    for case in cases:
        answer = requests.get(f"{server.url}/index/thumbnail/{ids[case.name]}", timeout=10)
        if not case.served:
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", case.name
            continue
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/jpeg", case.name
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        pixels = cv2.imdecode(np.frombuffer(base64.b64decode(case.stored), np.uint8), cv2.IMREAD_COLOR)
        encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])[1].tobytes()
        assert answer.content == encoded, case.name
        assert not case.payload or case.payload not in answer.content, case.name
