"""The Milvus server path (``--db http://host:19530``) against a real Milvus server: Milvus standalone 2.3.5 from the
PyPI package ``milvus==2.3.5``, in a venv of its own (testsupport/milvus_server.py), one server for this module.

``index build``, ``index search`` and ``index export`` give what they give on Milvus Lite; a collection of another
dimension is refused clearly; ``serve --index http://...`` answers ``neighbours=K``, and when the Milvus server is
stopped or stalled (SIGSTOP) with requests in flight it answers neighbours 503 (detections still 200, nothing past
the deadline), then comes back by itself when the server does."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import pytest
import requests
from indexes import build_index

from maskrcnn_serving import cli
from maskrcnn_serving.search import database
from maskrcnn_serving.search.index import InstanceIndex
from maskrcnn_serving.server import process
from maskrcnn_serving.settings import Settings
from testsupport.milvus_server import MilvusServer, MilvusUnavailable
from testsupport.server import ServerProcess, free_port

INDEX_TIMEOUT_SECONDS = 2.0
DEADLINE_SECONDS = 8.0
RECOVERY_SECONDS = 120.0  # the Milvus server's own restart (10-20 s here) and the worker's reconnection


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    server = MilvusServer(tmp_path_factory.mktemp("milvus"), free_port())
    try:
        server.start()
    except MilvusUnavailable as exc:
        server.close()
        pytest.skip(str(exc))
    yield server
    server.close()


@pytest.fixture(scope="module")
def indexed(milvus, tmp_path_factory, example_images, demo_model_dir):
    """The first three example images indexed into the Milvus server (collection ``built``) and into a Milvus Lite
    folder, by the same command; yields (images folder, Lite folder)."""
    root = tmp_path_factory.mktemp("milvus_index")
    lite = str(root / "instances.db")
    images = build_index(root / "images", example_images[:3], demo_model_dir, [milvus.url, lite], "built")
    return images, lite


def _search(db: str, demo_model_dir, query, out) -> list[dict]:
    assert cli.main(["index", "search", "--model-dir", str(demo_model_dir), "--db", db, "--collection", "built",
                     str(query), "--k", "3", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_build_search_and_export_give_what_milvus_lite_gives(milvus, indexed, demo_model_dir, tmp_path):
    images, lite = indexed
    query = sorted(images.iterdir())[1]
    on_server = _search(milvus.url, demo_model_dir, query, tmp_path / "server.json")
    on_lite = _search(lite, demo_model_dir, query, tmp_path / "lite.json")
    database.stop_local_servers()
    assert on_server[0]["instances"], "the demo model finds objects in the example image"
    for served, local in zip(on_server[0]["instances"], on_lite[0]["instances"], strict=True):
        assert served["neighbours"][0]["image"] == query.name  # stored relative to the folder indexed
        assert served["neighbours"][0]["distance"] < 1e-4  # every indexed instance finds itself first
        assert [(n["image"], n["bbox"]) for n in served["neighbours"]] == [
            (n["image"], n["bbox"]) for n in local["neighbours"]]
        assert [n["distance"] for n in served["neighbours"]] == pytest.approx(
            [n["distance"] for n in local["neighbours"]], abs=1e-4)
    exported = {}
    for name, db in (("server", milvus.url), ("lite", lite)):
        out = tmp_path / f"{name}.jsonl"
        assert cli.main(["index", "export", "--db", db, "--collection", "built", "--jsonl", str(out)]) == 0
        exported[name] = sorted((r["image"], r["category_name"], tuple(round(v, 2) for v in r["bbox"]))
                                for r in map(json.loads, out.read_text().splitlines()))
    database.stop_local_servers()
    assert exported["server"] == exported["lite"] and exported["server"]


def test_a_collection_of_another_dimension_is_refused(milvus, demo_model_dir, example_images, capsys):
    InstanceIndex.open(milvus.url, "other_model", dim=7, image_dim=3, create=True).close()
    with pytest.raises(SystemExit) as refused:
        cli.main(["index", "search", "--model-dir", str(demo_model_dir), "--db", milvus.url, "--collection",
                  "other_model", str(example_images[0])])
    assert "holds vectors of 7 values; this model's have 69" in str(refused.value)
    error = process.check_model(Settings(model_dir=str(demo_model_dir), index=milvus.url,
                                         index_collection="other_model"))
    assert error is not None and "holds vectors of 7 values; this model's have 69" in error


def test_serve_answers_neighbours_and_survives_the_milvus_server_stopping(milvus, indexed, demo_model_dir, tmp_path):
    images, _ = indexed
    env = {"MODEL_SERVER_INDEX_TIMEOUT": str(INDEX_TIMEOUT_SECONDS),
           "MODEL_SERVER_REQUEST_DEADLINE": str(DEADLINE_SECONDS)}
    server = ServerProcess(demo_model_dir, tmp_path / "server.log", workers=1, env=env,
                           flags=["--index", milvus.url, "--index-collection", "built"]).start()
    query = sorted(images.iterdir())[0]
    body = cv2.imencode(".png", cv2.imread(str(query)))[1].tobytes()

    def post(**options) -> tuple[requests.Response, float]:
        start = time.monotonic()
        answer = requests.post(f"{server.url}/invocations", data=body, params={"format": "boxes", **options},
                               headers={"Content-Type": "image/png"}, timeout=60)
        return answer, time.monotonic() - start

    def model() -> dict:
        return requests.get(f"{server.url}/model", timeout=10).json()["search"]

    try:
        server.wait_ready(timeout=300)
        answer, _ = post(neighbours=3)
        assert answer.status_code == 200, answer.text
        annotations = answer.json()["annotations"]
        assert annotations and all(len(a["neighbours"]) == 3 for a in annotations)
        best = annotations[0]["neighbours"][0]
        assert best["image"] == query.name and best["distance"] < 1e-4  # stored relative to the folder indexed
        assert model() == {"configured": True, "available": True, "indexed": milvus_count(milvus)}
        assert requests.get(f"{server.url}/index/thumbnail/{best['id']}", timeout=10).status_code == 200

        # Stopped mid-run: neighbour and plain requests in flight while the Milvus server goes away.
        with ThreadPoolExecutor(max_workers=8) as pool:
            searches = [pool.submit(post, neighbours=3) for _ in range(6)]
            plains = [pool.submit(post) for _ in range(2)]
            time.sleep(0.3)
            milvus.stop_server()
            searched, served = [f.result() for f in searches], [f.result() for f in plains]
        for answer, seconds in searched:  # 504: waited for the model behind the others past its deadline
            code = {200: None, 503: "search_unavailable", 504: "deadline_exceeded"}[answer.status_code]
            assert code is None or answer.json()["error"]["code"] == code, answer.text
            assert seconds < DEADLINE_SECONDS + 1.0, (answer.status_code, seconds)
        assert all(answer.status_code == 200 and seconds < DEADLINE_SECONDS for answer, seconds in served), served
        answer, seconds = post(neighbours=3)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "search_unavailable", answer.text
        assert seconds < DEADLINE_SECONDS
        plain, seconds = post()
        assert plain.status_code == 200 and seconds < DEADLINE_SECONDS
        assert len(plain.json()["annotations"]) == len(annotations)
        answer, seconds = post(neighbours=3)
        assert answer.status_code == 503 and seconds < 1.0  # the circuit: at once, no database call
        thumbnail = requests.get(f"{server.url}/index/thumbnail/{best['id']}", timeout=10)
        assert thumbnail.status_code == 503 and thumbnail.json()["error"]["code"] == "search_unavailable"
        assert model() == {"configured": True, "available": False, "indexed": None}

        milvus.start()
        start = time.monotonic()
        while (answer := post(neighbours=3)[0]).status_code != 200:
            assert answer.status_code == 503 and time.monotonic() - start < RECOVERY_SECONDS, answer.text
            time.sleep(1.0)
        assert answer.json()["annotations"][0]["neighbours"][0] == best
        assert model()["available"] is True
        print(f"search back {time.monotonic() - start:.1f} s after the Milvus server was healthy again")

        # Stalled (SIGSTOP: its connections stay open, nothing answers) with requests in flight, for less than
        # Milvus's own session lease, then resumed.
        os.kill(milvus.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(max_workers=6) as pool:
                searches = [pool.submit(post, neighbours=3) for _ in range(4)]
                plains = [pool.submit(post) for _ in range(2)]
                searched, served = [f.result() for f in searches], [f.result() for f in plains]
            for answer, seconds in searched:
                code = {503: "search_unavailable", 504: "deadline_exceeded"}[answer.status_code]
                assert answer.json()["error"]["code"] == code and seconds < DEADLINE_SECONDS + 1.0, answer.text
            assert 503 in [answer.status_code for answer, _ in searched]
            assert all(answer.status_code == 200 and seconds < DEADLINE_SECONDS for answer, seconds in served)
            assert model() == {"configured": True, "available": False, "indexed": None}
        finally:
            os.kill(milvus.pid, signal.SIGCONT)
        start = time.monotonic()
        while (answer := post(neighbours=3)[0]).status_code != 200:
            assert answer.status_code == 503 and time.monotonic() - start < RECOVERY_SECONDS, answer.text
            time.sleep(1.0)
        assert answer.json()["annotations"][0]["neighbours"][0] == best
        assert "unhandled error" not in server.log()
        print(f"search back {time.monotonic() - start:.1f} s after the stalled Milvus server resumed")
    finally:
        server.stop()


def milvus_count(milvus: MilvusServer) -> int:
    index = InstanceIndex.open(milvus.url, "built")
    try:
        return index.count()
    finally:
        index.close()
