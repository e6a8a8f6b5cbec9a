"""Both serving images, built here by build_tools/build_local.sh (buildah, on the local stand-in base) and run as
SageMaker runs them (tests/image_server.py): the image's entry point with ``serve``, the demo model mounted read-only
at /opt/ml/model, the settings as environment variables, the image's own user, a read-only root file system. Each
image's answers are compared with the venv install's, serving the same model with the same settings.

Skipped, with the reason, where the images cannot be built (no root, buildah or debootstrap). The figures measured
(build time, size, cold start, shutdown) are printed at the end of the session (tests/images/conftest.py).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from image_server import DEMO_MODEL_DIR, IN_MEMORY, BuiltImage, ImageServer, WorkingContainer
from live_server import SERVER_ENVIRONMENT, WORKERS, LiveServer, probe_startup
from seed_client import assert_legacy_equals_coco, seed_notebook_request

from testsupport.server import SERVER_VARIABLE_PREFIXES, ServerProcess

# pycocotools 2.0.11 under numpy 2 warns on every decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FOLDERS = ("container-serving", "container-serving-optimized")
# What the model's container definition gives the container (the seed notebook sets SM_MODEL_DIR), with the venv
# session servers' settings (2 workers, ...).
SAGEMAKER_ENVIRONMENT = {"SM_MODEL_DIR": "/opt/ml/model", **SERVER_ENVIRONMENT}
GRACE_SECONDS = 30  # SageMaker sends SIGKILL this long after SIGTERM
IMAGE_USER = "10001"  # the USER of container-serving/Dockerfile
CERTIFICATE_DIRS = ("etc/ssl", "usr/local/share/ca-certificates", "usr/share/ca-certificates")
# Files of the test suite: none of them belongs in an image.
TEST_MATERIAL = re.compile(r"(^|/)(tests?|testing)/|(^|/)(conftest|test_[^/]*|[^/]*_test|hostile[^/]*)\.py$")


@dataclass
class ImageRun:
    built: BuiltImage
    image: LiveServer  # its server is an ImageServer
    venv: LiveServer  # the venv install with the image's settings
    figures: dict[str, str]

    @property
    def server(self) -> ImageServer:
        return self.image.server


def first_ready_seconds(server: LiveServer) -> float:
    return min(elapsed for elapsed, route, status, _ in server.startup.responses if route == "/ping" and status == 200)


@pytest.fixture(scope="module", params=FOLDERS)
def run(request, built_images, tmp_path_factory, example_images, image_figures) -> ImageRun:
    built = built_images(request.param)
    figures = image_figures.setdefault(request.param, {})
    figures.update({"build": f"{built.seconds:.0f} s", "size": built.size})
    logs = tmp_path_factory.mktemp(request.param)
    probe = example_images[0].read_bytes()
    image = probe_startup(ImageServer(built.name, logs / "image.log", SAGEMAKER_ENVIRONMENT).start(), probe,
                          ImageServer.front)
    venv = None
    try:
        own = {name: value for name, value in image.server.container.environment().items()
               if name.startswith(SERVER_VARIABLE_PREFIXES) and name != "SM_MODEL_DIR"}
        venv_server = ServerProcess(DEMO_MODEL_DIR, logs / "venv.log", workers=WORKERS,
                                    env={**own, **SERVER_ENVIRONMENT}).start()
        venv = probe_startup(venv_server, probe, "auto")
        figures["cold start"] = (f"{image.server.cold_start:.1f} s (venv {first_ready_seconds(venv):.1f} s, "
                                 f"{WORKERS} workers each)")
        yield ImageRun(built, image, venv, figures)
    finally:
        if venv is not None:
            venv.server.stop()
        image.server.stop()


def test_image_carries_no_test_material(run):
    """The image holds the package and the demo model, not the test suite: no tests/, no hostile-input catalogue,
    no test-support module, in the source folder it was installed from or in what pip installed."""
    root = run.server.container.root
    source = root / "opt" / "maskrcnn-serving"
    (site,) = {path.parent for path in root.glob("usr/**/python3*/dist-packages/maskrcnn_serving-*.dist-info")}
    (dist_info,) = site.glob("maskrcnn_serving-*.dist-info")
    assert (dist_info / "top_level.txt").read_text().split() == ["maskrcnn_serving"]
    installed = [line.split(",")[0] for line in (dist_info / "RECORD").read_text().splitlines()]
    assert all(path.startswith(("maskrcnn_serving/", dist_info.name + "/", "../../../bin/")) for path in installed)
    in_source = [str(path.relative_to(source)) for path in source.rglob("*") if path.is_file()]
    found = [path for path in installed + in_source if TEST_MATERIAL.search(path)]
    assert found == [], f"test material in {run.built.name}: {found}"


def certificate_files(root: Path) -> dict[str, str]:
    """Every file under the CA certificate folders: its content's sha256 (a link: its target)."""
    files = {}
    for folder in CERTIFICATE_DIRS:
        for path in sorted((root / folder).rglob("*")):
            relative = str(path.relative_to(root))
            if path.is_symlink():
                files[relative] = "-> " + os.readlink(path)
            elif path.is_file():
                files[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def test_extra_certificates_are_in_the_stand_in_base_only(run):
    """EXTRA_CA_CERTS (the tests give the machine's CA bundle: this network's TLS proxy) is trusted by the stand-in
    base the build ran on; the image's own layers add or change no certificate."""
    base = WorkingContainer(run.built.base, read_only=False)
    try:
        in_base = certificate_files(base.root)
    finally:
        base.remove()
    assert certificate_files(run.server.container.root) == in_base
    if run.built.ca_certificates is not None:
        extra = "usr/local/share/ca-certificates/extra-ca-certificates.crt"
        assert in_base[extra] == hashlib.sha256(run.built.ca_certificates.read_bytes()).hexdigest()


def test_ping_answers_503_until_the_model_is_ready_then_200(run):
    pings = run.image.startup.statuses("/ping")
    assert 503 in pings and pings[-1] == 200, pings
    assert pings.index(200) > pings.index(503)
    not_ready = [body for _, route, status, body in run.image.startup.responses if route == "/ping" and status == 503]
    assert all(body["error"]["code"] == "not_ready" for body in not_ready)


def test_every_server_process_runs_as_the_image_user(run):
    """serve, the gunicorn master and workers, and nginx's master and workers: all uid 10001 (real, effective,
    saved, file system), as the image's USER says."""
    assert run.server.container.config["User"] == IMAGE_USER
    processes = run.server.describe(run.server.processes())
    commands = " ".join(processes)
    assert "nginx: master process" in commands and "nginx: worker process" in commands, processes
    assert len(run.server.worker_pids()) == WORKERS
    for pid in run.server.processes():
        uids = Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split("\n")[0].split()
        assert uids == [IMAGE_USER] * 4, (pid, uids, processes)
    run.figures["user"] = f"uid {IMAGE_USER} for all {len(processes)} processes, nginx included"


def test_seed_client_and_coco_answers_equal_the_venv_install(run, example_images):
    """The seed notebook's request (base64 JSON, legacy row-major RLE, decoded by its client) and a format=coco
    request: the image answers exactly what the venv install answers, and the seed client's masks equal
    pycocotools' decoding of the coco answer."""
    masks = 0
    for path in example_images:
        seed_body = seed_notebook_request(path.name, path.read_bytes())
        answers = {}
        for name, server in (("image", run.image), ("venv", run.venv)):
            for fmt in ("legacy", "coco"):
                body = seed_body if fmt == "legacy" else json.dumps({**json.loads(seed_body), "format": fmt})
                response = requests.post(f"{server.url}/invocations", data=body, timeout=120,
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
                assert response.status_code == 200, (name, path.name, response.text[:300])
                answers[name, fmt] = response.json()
        assert answers["image", "legacy"] == answers["venv", "legacy"], path.name
        assert answers["image", "coco"] == answers["venv", "coco"], path.name
        masks += assert_legacy_equals_coco(answers["image", "legacy"], answers["image", "coco"], path.name)
    assert masks > 0
    run.figures["seed client"] = f"{masks}/{masks} masks equal to the venv's on {len(example_images)} images"


def test_web_page_and_model_load(run):
    for path, kind in (("/", "text/html"), ("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        response = requests.get(f"{run.image.url}{path}", timeout=30)
        assert response.status_code == 200 and kind in response.headers["Content-Type"], (path, response.headers)
    assert 'id="file-input"' in requests.get(f"{run.image.url}/", timeout=30).text
    model = requests.get(f"{run.image.url}/model", timeout=30)
    assert model.status_code == 200
    assert model.json() == requests.get(f"{run.venv.url}/model", timeout=30).json()
    expected_backend = run.server.container.environment().get("MODEL_SERVER_BACKEND", "tensorpack")
    assert model.json()["backend"] == expected_backend
    run.figures["backend"] = f"{expected_backend} ({model.json()['precision']})"


# What the server writes in /tmp: serve's runtime folder (nginx's config, pid and temp files, gunicorn's socket) and
# the workers' metrics folder; TensorFlow's autograph writes the source of each function it converts (optimized
# backend) there too and imports it back. Nothing else, and nothing at all in /run (buildah's own marker is there).
WRITTEN_TO_TMP = re.compile(r"maskrcnn-(serve|metrics)-\w+|__autograph_generated_file\w+\.py")


def test_nothing_is_written_outside_tmp(run):
    """The root file system is read-only in the server's view and the container's writable layer stayed empty; the
    in-memory /tmp holds only what the server is meant to write there."""
    serve = run.server.find_serve()
    mounts = {fields[4]: fields[5].split(",") for fields in
              (line.split() for line in Path(f"/proc/{serve}/mountinfo").read_text().splitlines())}
    assert "ro" in mounts["/"]
    assert {path for path in IN_MEMORY if path in mounts} == set(IN_MEMORY)
    assert list(run.server.container.upper_dir().iterdir()) == []
    in_tmp = sorted(path.name for path in Path(f"/proc/{serve}/root/tmp").iterdir())
    assert in_tmp and all(WRITTEN_TO_TMP.fullmatch(name) for name in in_tmp), in_tmp
    assert sorted(path.name for path in Path(f"/proc/{serve}/root/run").iterdir()) == [".containerenv"]
    run.figures["writes"] = f"read-only root; {len(in_tmp)} entries in /tmp, all the server's or TensorFlow's"


def test_sigterm_stops_nginx_and_gunicorn_with_the_request_in_flight_answered(run, example_images):
    """SIGTERM to serve (what SageMaker's docker stop sends to the container's first process) while a 16-image
    request is in flight: the request is answered in full, then every process of the container has exited, within
    SageMaker's 30 s before SIGKILL, and serve's exit status is 0. Runs last: it stops the image's server."""
    images = [json.loads(seed_notebook_request(str(i), path.read_bytes())) for i, path in enumerate(example_images * 4)]
    body = json.dumps(images[:16])
    connection = http.client.HTTPConnection("127.0.0.1", run.server.port, timeout=120)
    connection.request("POST", "/invocations?format=coco", body=body, headers={"Content-Type": "application/json"})
    answer: dict = {}

    def read_answer() -> None:
        response = connection.getresponse()
        answer.update(status=response.status, body=response.read(), at=time.monotonic())

    reader = threading.Thread(target=read_answer)
    reader.start()
    signalled = time.monotonic()
    os.kill(run.server.find_serve(), signal.SIGTERM)
    shutdown = run.server.wait_gone(GRACE_SECONDS + 10)
    reader.join(timeout=60)
    connection.close()
    assert answer["status"] == 200 and answer["at"] > signalled, answer.get("body", b"")[:300]
    assert [record["img_id"] for record in json.loads(answer["body"])] == [image["img_id"] for image in images[:16]]
    assert shutdown is not None, run.server.describe(run.server.processes())
    assert shutdown < GRACE_SECONDS
    assert run.server.exit_status() == 0, run.server.log()[-3000:]
    run.figures["SIGTERM"] = f"in-flight request answered, all processes gone in {shutdown:.1f} s, exit 0"


def test_serve_killed_outright_leaves_no_server_process(built_images, tmp_path):
    """``serve`` SIGKILLed (nothing can catch it): gunicorn and nginx must not outlive it, holding the port and the
    socket (chroot isolation has no PID namespace to take them down, as a venv has none). The tensorpack image with
    SageMaker's defaults; the optimized image runs the same entry point."""
    built = built_images(FOLDERS[0])
    server = ImageServer(built.name, tmp_path / "image.log", {"SM_MODEL_DIR": "/opt/ml/model"}).start()
    try:
        server.wait_ready(timeout=300)
        before = server.describe(server.processes())
        os.kill(server.find_serve(), signal.SIGKILL)
        gone = server.wait_gone(10)
        survivors = server.describe(server.processes())
        assert gone is not None, f"still running 10 s after serve was killed: {survivors} (of {before})"
    finally:
        server.stop(graceful=False)
