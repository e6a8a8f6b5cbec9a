"""The instance index on a real Milvus Lite database: storing, resuming, searching (with the class filter inside the
database), thumbnails (checked when stored and served), exports, the dimension check, bad database values, and the
shared database process (on a private unix socket; reconnected and reloaded after a restart)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from maskrcnn_serving.search import database
from maskrcnn_serving.search.database import DatabaseError
from maskrcnn_serving.search.index import DimensionMismatch, InstanceIndex
from testsupport.hostile import planted_thumbnails

DIM, IMAGE_DIM = 6, 3


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def annotation(category_id: int, name: str, x: float) -> dict:
    return {"bbox": [x, 2.0, 10.0, 8.0], "category_id": category_id, "category_name": name, "score": 0.9,
            "segmentation": {"size": [40, 60], "counts": "PP0"}}


@pytest.fixture
def index(tmp_path):
    index = InstanceIndex.open(str(tmp_path / "inst.db"), "things", dim=DIM, image_dim=IMAGE_DIM, create=True)
    yield index
    index.close()
    database.stop_local_servers()


def add(index, name: str, vectors, labels) -> int:
    image = np.random.default_rng(len(name)).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    annotations = [annotation(label, ["BG", "cat", "dog"][label], 5.0 * i) for i, label in enumerate(labels)]
    return index.add_image(name, image, annotations, unit(vectors), unit([[1, 0, 0]])[0])


def test_store_search_filter_and_read_back(index, tmp_path):
    assert add(index, "data/a.jpg", [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], [1, 2]) == 2
    assert add(index, "data/b.jpg", [[1, 0.2, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], [2, 1]) == 2
    assert index.count() == 4 and index.image_count() == 2 and index.dim == DIM
    assert index.has_image("data/a.jpg") and not index.has_image("data/c.jpg")
    nearest = index.search(unit([[1, 0, 0, 0, 0, 0]]), k=2)[0]
    assert [n.image for n in nearest] == ["data/a.jpg", "data/b.jpg"]
    assert nearest[0].distance == pytest.approx(0.0, abs=1e-6) and 0 < nearest[1].distance < 0.05
    assert nearest[0].bbox == [0.0, 2.0, 10.0, 8.0] and nearest[0].category_name == "cat"
    same_class = index.search(unit([[1, 0, 0, 0, 0, 0]]), k=3, category_ids=[2])[0]
    assert {n.category_name for n in same_class} == {"dog"} and len(same_class) == 2  # filtered in the database
    thumbnail = index.thumbnail(nearest[0].id)
    assert thumbnail[:2] == b"\xff\xd8" and index.thumbnail(10**9) is None
    exported = tmp_path / "out.jsonl"
    assert index.export_jsonl(exported) == 4
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert {line["image"] for line in lines} == {"data/a.jpg", "data/b.jpg"}
    assert all(len(line["vector"]) == DIM and line["segmentation"]["size"] == [40, 60] for line in lines)


def test_an_interrupted_image_is_indexed_again_without_duplicates(index):
    add(index, "data/a.jpg", [[1, 0, 0, 0, 0, 0]], [1])
    # a build that stopped after writing an image's instances, before its image row
    stale = {"vector": unit([[0, 0, 0, 1, 0, 0]])[0].tolist(), "image": "data/half.jpg", "bbox": [0.0, 0.0, 1.0, 1.0],
             "category": "cat", "category_id": 1, "score": 0.5, "height": 40, "width": 60, "mask": "", "thumbnail": ""}
    index.insert_rows([stale, stale])
    assert index.count() == 3 and not index.has_image("data/half.jpg")
    add(index, "data/half.jpg", [[0, 1, 0, 0, 0, 0]], [2])
    assert index.count() == 2 and index.has_image("data/half.jpg")
    assert {n.image for n in index.search(unit([[0, 1, 0, 0, 0, 0]]), k=5)[0]} == {"data/a.jpg", "data/half.jpg"}


def test_a_model_of_another_dimension_is_refused(index):
    with pytest.raises(DimensionMismatch, match="6 values; this model's have 9"):
        InstanceIndex.open(index.db, "things", dim=9)
    with pytest.raises(DatabaseError, match="no index 'others'"):
        InstanceIndex.open(index.db, "others", dim=DIM)


@pytest.mark.parametrize("kind", ["a file", "a foreign folder", "a missing parent", "an unknown scheme", "empty"])
def test_bad_database_values_are_clear_errors_and_write_nothing(tmp_path, kind):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    value = {"a file": str(tmp_path / "notes.txt"), "a foreign folder": str(tmp_path / "photos"),
             "a missing parent": str(tmp_path / "nowhere" / "inst.db"), "an unknown scheme": "ftp://host/inst",
             "empty": ""}[kind]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(DatabaseError):
        InstanceIndex.open(value, "things", dim=DIM, image_dim=IMAGE_DIM, create=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_an_unreachable_server_is_a_clear_error():
    with pytest.raises(DatabaseError, match="cannot reach"):
        InstanceIndex.open("http://127.0.0.1:9", "things", dim=DIM)


def test_processes_share_one_database_process(index, tmp_path):
    """A second process uses the folder while this one holds it open (Milvus Lite itself would refuse it)."""
    add(index, "data/a.jpg", [[1, 0, 0, 0, 0, 0]], [1])
    code = (f"from maskrcnn_serving.search.index import InstanceIndex\n"
            f"index = InstanceIndex.open({index.db!r}, 'things', dim={DIM})\n"
            f"print(index.count(), index.has_image('data/a.jpg'))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr
    assert other.stdout.split() == ["1", "True"]
    assert index.count() == 1  # still connected after the other process left


def test_ids_are_the_images_own_so_a_second_write_leaves_one_copy(index):
    from maskrcnn_serving.search.index import image_row_id, instance_id

    add(index, "data/a.jpg", [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], [1, 2])
    ids = sorted(n.id for n in index.search(unit([[1, 0, 0, 0, 0, 0]]), k=5)[0])
    assert ids == sorted([instance_id("data/a.jpg", 0), instance_id("data/a.jpg", 1)])
    assert 0 <= min(ids) and max(ids) < 2**53  # exact as JSON numbers in a browser
    add(index, "data/a.jpg", [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], [1, 2])  # a re-run, a retried task
    add(index, "data/b.jpg", [[0, 0, 1, 0, 0, 0]], [1])
    assert index.count() == 3 and index.image_count() == 2
    assert sorted(n.id for n in index.search(unit([[1, 0, 0, 0, 0, 0]]), k=5)[0]) == sorted(
        [*ids, instance_id("data/b.jpg", 0)])
    assert index.indexed(["data/a.jpg", "data/c.jpg", "data/b.jpg"]) == {"data/a.jpg", "data/b.jpg"}
    assert image_row_id("data/a.jpg") != image_row_id("data/b.jpg") != instance_id("data/b.jpg", 0)


def test_an_id_another_image_holds_is_never_overwritten(index):
    """Ids are hashes: when an image's id is held by another image (forced here), the image takes the id's next
    alternative, the same one every time it is written; written once its own id is free, it leaves no copy under
    the alternative."""
    from maskrcnn_serving.search.index import ImageRows, image_row_id, image_rows, instance_id

    add(index, "data/a.jpg", [[1, 0, 0, 0, 0, 0]], [1])
    a_thumbnail = index.thumbnail(instance_id("data/a.jpg", 0))
    image = np.zeros((40, 60, 3), np.uint8)
    own = image_rows("data/b.jpg", image, [annotation(2, "dog", 0.0)], unit([[0, 1, 0, 0, 0, 0]]),
                     unit([[1, 0, 0]])[0])
    clashing = ImageRows(own.name, [{**own.instances[0], "id": instance_id("data/a.jpg", 0)}],  # the two names'
                         {**own.image, "id": image_row_id("data/a.jpg")})  # hashes collide, instance and image
    for _ in range(2):  # written twice: the same alternative ids, nothing doubled, a's rows untouched
        assert index.write(clashing) == 1
        assert index.count() == 2 and index.image_count() == 2
        found = {n.image: n.id for n in index.search(unit([[1, 1, 0, 0, 0, 0]]), k=5)[0]}
        assert found == {"data/a.jpg": instance_id("data/a.jpg", 0), "data/b.jpg": instance_id("data/b.jpg", 0, 1)}
        assert index.thumbnail(instance_id("data/a.jpg", 0)) == a_thumbnail
    assert index.write(own) == 1  # its own ids: the rows under the alternatives are gone
    assert index.count() == 2 and index.image_count() == 2
    found = {n.image: n.id for n in index.search(unit([[1, 1, 0, 0, 0, 0]]), k=5)[0]}
    assert found == {"data/a.jpg": instance_id("data/a.jpg", 0), "data/b.jpg": instance_id("data/b.jpg", 0)}


@pytest.mark.parametrize("name", ["/srv/photos/a.jpg", "../a.jpg", "data/../../a.jpg", ""])
def test_an_absolute_or_escaping_name_is_never_stored(index, name):
    with pytest.raises(ValueError, match="relative path"):
        add(index, name, [[1, 0, 0, 0, 0, 0]], [1])
    assert index.count() == 0


def test_an_index_built_before_names_were_relative_keeps_working(tmp_path, monkeypatch):
    """Such an index has database-assigned ids and absolute paths: it is read as it is (an image found by its path,
    so a re-run does not index it again), written as it was, and answers a path as its file name only."""
    from pymilvus import MilvusClient

    create_schema = MilvusClient.create_schema
    monkeypatch.setattr(MilvusClient, "create_schema", lambda **kw: create_schema(**{**kw, "auto_id": True}))
    db = str(tmp_path / "old.db")
    old = InstanceIndex.open(db, "things", dim=DIM, image_dim=IMAGE_DIM, create=True)
    monkeypatch.undo()
    try:
        row = {"vector": unit([[1, 0, 0, 0, 0, 0]])[0].tolist(), "image": "/srv/photos/a.jpg", "bbox": [0.0, 0, 4, 4],
               "category": "cat", "category_id": 1, "score": 0.9, "height": 40, "width": 60, "mask": "",
               "thumbnail": ""}
        old.insert_rows([row])
        database.connect(db).insert("things_images", [{"vector": [1.0, 0, 0], "image": "/srv/photos/a.jpg",
                                                       "height": 40, "width": 60, "instances": 1}])
        reopened = InstanceIndex.open(db, "things", dim=DIM)
        assert reopened.indexed(["/srv/photos/a.jpg", "a.jpg"]) == {"/srv/photos/a.jpg"}
        assert add(reopened, "b.jpg", [[0, 1, 0, 0, 0, 0]], [2]) == 1  # the database gives the ids, as before
        found = reopened.search(unit([[1, 0.1, 0, 0, 0, 0]]), k=2)[0]
        assert [n.image for n in found] == ["a.jpg", "b.jpg"]  # the machine's path does not reach a client
        assert reopened.records([found[0].id])[0]["image"] == "/srv/photos/a.jpg"  # stored as it was
        assert reopened.count() == 2 and reopened.image_count() == 2
    finally:
        old.close()
        database.stop_local_servers()


# ------------------------------------------------------------------------------ the database process (issue 23)


def _listening_tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def test_the_database_listens_on_a_private_unix_socket_only(index):
    """No TCP port (nothing for another local user to find or reach) and no world-readable address file: a unix
    socket in a directory of mode 0700 owned by this user; the database folder it created is private too."""
    folder = database.check_local_path(index.db)
    pid = database.server_pid(folder)
    run = database.run_directory(folder)
    assert run == folder.with_name(folder.name + ".run")
    info = run.lstat()
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert stat.S_ISSOCK((run / "milvus.sock").lstat().st_mode)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not list(folder.parent.glob("*.endpoint"))
    assert _socket_inodes(pid) and not _socket_inodes(pid) & _listening_tcp_inodes()


OTHER_USER = 65534  # nobody
SYSTEM_PYTHON = Path("/usr/bin/python3")  # one any user may run (this venv's interpreter may be in a private home)


@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON.exists(),
                    reason="needs root (to act as another local user, uid 65534) and /usr/bin/python3")
def test_another_local_user_cannot_reach_the_database():
    """The adversarial pass's local user, with the database in a folder anyone may enter: a socket there that is
    open to all is reachable (the check works), the database's is not (its run directory is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="maskrcnn-other-user-", dir="/tmp"))
    base.chmod(0o755)
    probe_code = ("import socket, sys\n"
                  "s = socket.socket(socket.AF_UNIX)\n"
                  "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\nsys.exit(0)\n")

    def connects_as_other_user(path: Path) -> int:
        return subprocess.run([str(SYSTEM_PYTHON), "-c", probe_code, str(path)], user=OTHER_USER, group=OTHER_USER,
                              timeout=60, capture_output=True, check=False).returncode

    try:
        open_socket = socket.socket(socket.AF_UNIX)
        open_socket.bind(str(base / "open.sock"))
        open_socket.listen()
        (base / "open.sock").chmod(0o777)
        index = InstanceIndex.open(str(base / "inst.db"), "things", dim=DIM, image_dim=IMAGE_DIM, create=True)
        sock = database.run_directory(database.check_local_path(index.db)) / "milvus.sock"
        assert connects_as_other_user(base / "open.sock") == 0
        assert connects_as_other_user(sock) == 3
        index.close()
        open_socket.close()
    finally:
        database.stop_local_servers()
        shutil.rmtree(base, ignore_errors=True)


def test_a_run_directory_that_is_not_the_users_own_is_refused(tmp_path):
    """A symbolic link where the run directory goes (it could point at another user's socket) is refused, and so
    is, when the tests run as root, a directory of another user."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "a.db.run").symlink_to(elsewhere)
    with pytest.raises(DatabaseError, match="not a directory of this user"):
        InstanceIndex.open(str(tmp_path / "a.db"), "things", dim=DIM, image_dim=IMAGE_DIM, create=True)
    if os.geteuid() == 0:
        (tmp_path / "b.db.run").mkdir(mode=0o700)
        os.chown(tmp_path / "b.db.run", 65534, 65534)
        with pytest.raises(DatabaseError, match="not a directory of this user"):
            InstanceIndex.open(str(tmp_path / "b.db"), "things", dim=DIM, image_dim=IMAGE_DIM, create=True)


def test_a_folder_too_deep_for_a_socket_path_gets_a_private_directory_elsewhere(tmp_path):
    deep = tmp_path.joinpath(*["d" * 30] * 4)
    deep.mkdir(parents=True)
    folder = deep / "inst.db"
    run = database.run_directory(folder)
    assert len(os.fsencode(folder.with_name("inst.db.run") / "milvus.sock")) > database.MAX_SOCKET_PATH
    assert run.parent.name == f"maskrcnn-serving-{os.getuid()}" and run == database.run_directory(folder)
    try:
        index = InstanceIndex.open(str(folder), "things", dim=DIM, image_dim=IMAGE_DIM, create=True)
        add(index, "data/a.jpg", [[1, 0, 0, 0, 0, 0]], [1])
        assert index.count() == 1 and stat.S_IMODE(run.stat().st_mode) == 0o700
        index.close()
    finally:
        database.stop_local_servers()
        shutil.rmtree(run, ignore_errors=True)


def test_a_command_line_index_reconnects_and_loads_after_its_database_restarted(index):
    """``index build`` / ``index search`` beside a server whose database restarted: the next call reconnects (a
    process that may start the database starts a new one) and loads the collections again, instead of failing on
    'released' collections for good."""
    add(index, "data/a.jpg", [[1, 0, 0, 0, 0, 0]], [1])
    folder = database.check_local_path(index.db)
    old = database.server_pid(folder)
    os.kill(old, signal.SIGKILL)
    found = index.search(unit([[1, 0, 0, 0, 0, 0]]), k=1)[0]
    assert [n.image for n in found] == ["data/a.jpg"] and database.server_pid(folder) != old
    assert index.count() == 1 and index.has_image("data/a.jpg")


def test_stored_thumbnails_are_checked_before_they_are_served(index):
    """Bytes planted in the thumbnail field (someone with access to the database), every case of the catalogue:
    only a JPEG thumbnail the decoding gate decodes is served, and then as pixels encoded again here, never the
    planted bytes."""
    cases = planted_thumbnails()
    vectors = unit(np.eye(len(cases), DIM + len(cases))[:, :DIM] + 0.01 * np.arange(len(cases))[:, None])
    for case, vector in zip(cases, vectors, strict=True):
        index.insert_rows([{"vector": vector.tolist(), "image": case.name, "bbox": [0.0, 0.0, 1.0, 1.0],
                            "category": "cat", "category_id": 1, "score": 0.5, "height": 40, "width": 60, "mask": "",
                            "thumbnail": case.stored}])
    ids = {n.image: n.id for n in index.search(vectors[:1], k=len(cases))[0]}
    assert set(ids) == {case.name for case in cases}
    for case in cases:
        served = index.thumbnail(ids[case.name])
        if not case.served:
            assert served is None, case.name
            continue
        assert served[:3] == b"\xff\xd8\xff" and served.endswith(b"\xff\xd9"), case.name
        assert served == thumbnail_jpeg_of(base64.b64decode(case.stored)), case.name  # decoded pixels, encoded here
        assert not case.payload or case.payload not in served, case.name


def thumbnail_jpeg_of(jpeg: bytes) -> bytes:
    """What the index must serve for the stored JPEG ``jpeg``: its pixels, encoded again at the thumbnails'
    quality (and nothing of the stored bytes)."""
    import cv2

    from maskrcnn_serving.search.index import THUMBNAIL_QUALITY

    pixels = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])[1].tobytes()


def test_a_thumbnail_is_checked_when_it_is_stored():
    from maskrcnn_serving.search.index import decoded_thumbnail, thumbnail_jpeg

    image = np.random.default_rng(1).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    jpeg = thumbnail_jpeg(image, [10.0, 20.0, 400.0, 200.0])
    assert max(decoded_thumbnail(jpeg).shape[:2]) == 96
