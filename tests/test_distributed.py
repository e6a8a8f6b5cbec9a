"""``predict`` and ``index build`` on a real Ray cluster (the session's ``ray start --head``, 2 CPUs): the same
detections and the same index as the run in one process, image for image; an actor killed mid-run (its process, by
pid) and still every image written exactly once; a refused image reported and skipped; a stopped build resumed
where it stopped (the folder given as a ``file://`` URL), its actor killed too. And the batch step the actors run,
in this process."""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from maskrcnn_serving import cli
from maskrcnn_serving.distributed import PipelineActor, run_batch
from maskrcnn_serving.evaluation import results_options
from maskrcnn_serving.pipeline import Pipeline
from maskrcnn_serving.search import database
from maskrcnn_serving.search.index import InstanceIndex
from maskrcnn_serving.sources import collect_images

NOT_AN_IMAGE = b"not an image, whatever its name says"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, example_images) -> Path:
    """``good/``: a dozen small images (each example as it is, mirrored, and at 0.8 scale); ``bad.jpg`` beside it."""
    root = tmp_path_factory.mktemp("ray_images")
    (root / "good").mkdir()
    for number, path in enumerate(example_images):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        for variant, pixels in enumerate([image, cv2.flip(image, 1), cv2.resize(image, None, fx=0.8, fy=0.8)]):
            cv2.imwrite(str(root / "good" / f"{number}-{variant}.jpg"), pixels)
    (root / "bad.jpg").write_bytes(NOT_AN_IMAGE)
    return root


def _interruptible() -> None:
    # A suite started in the background by a non-interactive shell ignores SIGINT, and a child inherits an ignored
    # SIGINT (Python then raises no KeyboardInterrupt): the CLI gets the default, as in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_process(*args: str, stderr, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "maskrcnn_serving.cli", *args], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env, preexec_fn=_interruptible)


def by_image(records: list[dict]) -> dict[str, list[dict]]:
    grouped = collections.defaultdict(list)
    for record in records:
        grouped[record["image_id"]].append(record)
    return dict(grouped)


def wait_for(condition, process: subprocess.Popen, what: str, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.02)


def kill_an_actor_mid_run(driver: subprocess.Popen, ray_cluster, started: float, begun, progress,
                          stderr: Path) -> tuple[str, int]:
    """Once ``begun()``, SIGKILL (by pid) one actor of the run ``driver`` started at ``started`` (Ray restarts it
    and retries its unfinished batches); the run must still succeed. Its stdout, and ``progress()`` at the kill."""
    try:
        wait_for(begun, driver, "a first image", stderr)
        victim = [p for p in ray_cluster.actor_processes() if p.create_time() >= started][0]  # this run's
        at_kill = progress()
        victim.kill()
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stderr.read_text()[-3000:]
    assert not victim.is_running()
    return out, at_kill


def test_predict_on_ray_matches_the_local_run_with_an_actor_killed_mid_run(
        ray_cluster, image_folder, cli_uses_session_backends, demo_model_dir, tmp_path):
    address, environment = ray_cluster.address, ray_cluster.environment
    good = sorted((image_folder / "good").glob("*.jpg"))
    local = tmp_path / "local.json"
    assert cli.main(["predict", "--model-dir", str(demo_model_dir), *map(str, good), "--output", str(local)]) == 0

    shards, output, stderr = tmp_path / "shards", tmp_path / "ray.json", tmp_path / "stderr.txt"
    started = time.time()
    with open(stderr, "w") as errors:
        driver = cli_process("predict", "--model-dir", str(demo_model_dir), str(image_folder), "--output",
                             str(output), "--shards", str(shards), "--shard-size", "1", "--ray", address,
                             "--actors", "2", stderr=errors, env=environment)
    written = lambda: len(list(shards.glob("part-*.jsonl")))  # noqa: E731 - one image per shard
    out, written_before = kill_an_actor_mid_run(driver, ray_cluster, started, lambda: written() >= 1, written,
                                                stderr)
    log = stderr.read_text()
    assert written_before < len(good)  # killed mid-run
    assert f"skipped {image_folder / 'bad.jpg'}: " in log and "1 images refused" in log  # reported, not fatal

    lines = [json.loads(line) for shard in sorted(shards.glob("part-*.jsonl")) for line in shard.open()]
    assert collections.Counter(line["image_id"] for line in lines) == collections.Counter(map(str, good))
    expected = by_image(json.loads(local.read_text()))
    assert by_image(json.loads(output.read_text())) == expected  # the same detections, image for image
    assert {line["image_id"]: line["results"] for line in lines if line["results"]} == expected
    assert f"detections in {len(good)} images written" in out


def test_index_build_on_ray_resumes_where_it_stopped_and_matches_the_local_build(
        ray_cluster, image_folder, cli_uses_session_backends, demo_model_dir, tmp_path):
    """Stopped with Ctrl-C after a few images, then resumed with its actor killed mid-run: the index of the local
    build, row for row, each image's rows once."""
    address, environment = ray_cluster.address, ray_cluster.environment
    folder = image_folder / "good"
    count = len(list(folder.glob("*.jpg")))
    local_db, ray_db = str(tmp_path / "local.db"), str(tmp_path / "ray.db")

    def build(source: str, stderr: Path) -> subprocess.Popen:
        with open(stderr, "w") as errors:
            return cli_process("index", "build", "--model-dir", str(demo_model_dir), "--db", ray_db, source, "--ray",
                               address, stderr=errors, env=environment)

    def run(stderr: Path) -> int:  # images run so far, as the progress bar shows (it moves before each is written)
        return max(map(int, re.findall(r"(\d+)/\d+ \[", stderr.read_text())), default=0)

    try:
        assert cli.main(["index", "build", "--model-dir", str(demo_model_dir), "--db", local_db, str(folder)]) == 0
        stderr = tmp_path / "stopped.txt"
        driver = build(str(folder), stderr)
        try:  # stopped (Ctrl-C) once three images have run
            wait_for(lambda: run(stderr) >= 3, driver, "three images run", stderr)
            driver.send_signal(signal.SIGINT)
            driver.communicate(timeout=120)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert driver.returncode != 0
        stopped = InstanceIndex.open(ray_db, dim=69)
        indexed = stopped.image_count()
        assert 1 <= indexed < count - 1  # stopped mid-run, with images left for the actor killed below
        database.stop_local_servers()

        stderr = tmp_path / "resumed.txt"
        started = time.time()
        driver = build(folder.as_uri(), stderr)  # the folder as a URL: the names are the same
        out, run_at_kill = kill_an_actor_mid_run(driver, ray_cluster, started, lambda: run(stderr) >= 1,
                                                 lambda: run(stderr), stderr)
        assert run_at_kill < count - indexed  # killed mid-run
        assert f"from {count - indexed} images added" in out
        assert f"({indexed} images already indexed" in out

        rows = {}
        for db in (local_db, ray_db):
            index = InstanceIndex.open(db, dim=69)
            assert index.image_count() == count
            rows[db] = {row["id"]: row for row in index.iterate()}
            assert index.count() == len(rows[db])  # no id twice
        assert rows[ray_db] == rows[local_db]  # the same instances, ids, vectors and names, each once
        assert {row["image"] for row in rows[ray_db].values()} <= {p.name for p in folder.glob("*.jpg")}
    finally:
        database.stop_local_servers()


def test_a_refused_file_in_a_batch_is_reported_and_the_others_still_run(tensorpack_backend, image_folder):
    files = collect_images([image_folder])
    assert [f.name for f in files][:2] == ["bad.jpg", "good/0-0.jpg"]
    pipeline = Pipeline(tensorpack_backend)
    options = results_options(tensorpack_backend.bundle)
    try:
        outcomes = run_batch(pipeline, files[:3], options, lambda file, result: result.annotations)
        assert [o.file for o in outcomes] == files[:3]
        assert outcomes[0].value is None and outcomes[0].error.startswith(f"{image_folder / 'bad.jpg'}: ")
        for outcome, file in zip(outcomes[1:], files[1:3], strict=True):
            assert outcome.error is None
            assert outcome.value == next(pipeline.run_files([file], options)).annotations

        # what an actor answers for the same batch: the values as JSON text, equal once read
        actor = PipelineActor(lambda: pipeline, options, lambda file, result: result.annotations)
        columns = {key: np.array([getattr(f, key) for f in files[:3]]) for key in ("location", "name", "source")}
        answer = actor(columns)
        assert answer["source"] == [f.source for f in files[:3]]
        assert answer["error"] == [outcomes[0].error, "", ""]
        assert all(isinstance(text, str) for text in answer["value"])
        assert [json.loads(text) for text in answer["value"][1:]] == [o.value for o in outcomes[1:]]
    finally:
        pipeline.close()
