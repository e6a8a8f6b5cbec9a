"""The HTTP front (server/front.py): which front ``serve`` chooses, the nginx config rendered from the settings
(checked by the real nginx), and what the session's servers run. Supervising nginx and gunicorn is tested in
test_process.py; what nginx does to hostile requests in tests/reliability/test_hostile_inputs.py, against the
session's servers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_server import nginx_missing

from maskrcnn_serving.server import front, headers, readiness
from maskrcnn_serving.settings import Settings
from testsupport.hostile import raw_exchange
from testsupport.server import ServerProcess, children, free_port, gunicorn_master_pid

NGINX = front.find_nginx()
needs_nginx = pytest.mark.skipif(NGINX is None, reason=str(nginx_missing()))


def test_the_front_setting_chooses_nginx_when_installed(monkeypatch):
    assert front.choose("none") is None
    monkeypatch.setattr(front, "find_nginx", lambda: None)
    assert front.choose("auto") is None  # gunicorn alone
    with pytest.raises(front.FrontError, match="not installed"):
        front.choose("nginx")
    monkeypatch.setattr(front, "find_nginx", lambda: "/opt/nginx")
    assert front.choose("auto") == front.choose("nginx") == "/opt/nginx"
    assert Settings.from_env({"MODEL_SERVER_FRONT": "none"}).front == "none"
    with pytest.raises(ValueError, match="front"):
        Settings.from_env({"MODEL_SERVER_FRONT": "apache"})


def test_the_config_follows_the_settings_and_answers_in_json(tmp_path):
    settings = Settings(max_request_bytes=1234567, client_timeout=7.5, timeout=30, max_response_bytes=6 << 20)
    config = front.render_config(settings, "0.0.0.0:8080", tmp_path / "g.sock", tmp_path, tmp_path / "ready")
    assert "{{" not in config
    assert re.search(r"client_max_body_size 1234567;", config)
    assert re.search(r"client_body_timeout 8s;", config) and re.search(r"client_header_timeout 8s;", config)
    assert re.search(r"proxy_read_timeout 35s;", config)  # over the worker timeout: the app's 504 comes first
    assert re.search(r"proxy_buffers 97 64k;", config)  # the largest answer fits in memory
    assert f"server unix:{tmp_path / 'g.sock'}" in config and "listen 0.0.0.0:8080;" in config
    pages = dict(re.findall(r"error_page (\d+) =\d+ (\S+);", config))
    assert {"400", "404", "408", "413", "414", "494", "502", "504"} <= set(pages)
    for status, uri in pages.items():
        answered, body, added = re.search(rf"location = {re.escape(uri)} {{ internal; client_max_body_size 0; "
                                          r"return (\d+) '(.*)'; ((?:add_header [^;]+;\s*)*)}", config).groups()
        error = json.loads(body.replace("\\'", "'"))["error"]
        assert set(error) == {"code", "message"} and int(answered) >= 400, status
        assert _added_headers(added) == headers.for_status(int(answered)), status
    assert "request_too_large" in config and "1234567" in config
    assert "headers_too_large" in config and "bad_gateway" in config


def _added_headers(directives: str) -> dict[str, str]:
    return dict(re.findall(r'add_header (\S+) "([^"]*)" always;', directives))


def test_nginx_answers_ping_from_the_readiness_files_with_the_headers_of_every_answer(tmp_path):
    """/ping is nginx's own: 200 from the ready file when it exists, else 503 from the not-ready file, both never
    cached or served in part; every nginx 503 is that one."""
    config = front.render_config(Settings(), "127.0.0.1:8080", tmp_path / "g.sock", tmp_path, tmp_path / "ready")
    ping = re.search(r"location = /ping \{(.*?)\}", config, re.DOTALL).group(1)
    assert f"root {tmp_path / 'ready'};" in ping and "try_files /ready.json =503;" in ping
    assert {"etag off;", "if_modified_since off;", "max_ranges 0;"} <= {line.strip() for line in ping.splitlines()}
    assert _added_headers(ping) == {**headers.for_status(200), **headers.NO_STORE}
    assert re.findall(r"error_page 503 (\S+);", config) == [front.NOT_READY_URI]
    not_ready = re.search(rf"location = {front.NOT_READY_URI} \{{(.*?)\}}", config, re.DOTALL).group(1)
    assert "internal;" in not_ready and f"alias {tmp_path / 'ready' / 'not_ready.json'};" in not_ready
    assert _added_headers(not_ready) == headers.for_status(503) and headers.for_status(503)["Retry-After"]


@needs_nginx
def test_nginx_accepts_the_rendered_config(tmp_path):
    """``nginx -t`` on the config for the default settings and for extreme ones."""
    for settings in (Settings(), Settings(max_request_bytes=1, max_response_bytes=1, client_timeout=0.1, timeout=1)):
        runtime = tmp_path / str(settings.max_request_bytes)
        runtime.mkdir()
        nginx = front.NginxFront(NGINX, settings, "127.0.0.1", 8080, runtime / "g.sock", runtime, runtime)
        nginx.check()  # raises FrontError with nginx's message
    assert front.listen_address("::1", 80) == "[::1]:80"


def _environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


def test_the_session_servers_say_which_front_they_run(live_server, gunicorn_server):
    assert '"message": "serving through nginx"' in live_server.log()
    assert '"message": "serving with gunicorn alone"' in gunicorn_server.log()
    for server in (live_server, gunicorn_server):
        workers = server.server.worker_pids()
        assert len(workers) == 2
        for pid in workers:  # the decoder's own pixel limit and the arena count are in force in every worker
            assert _environ(pid)["OPENCV_IO_MAX_IMAGE_PIXELS"] == str(Settings().max_image_pixels)
            assert _environ(pid)["MALLOC_ARENA_MAX"] == "2"
    nginx = [pid for pid in children(live_server.process.pid) if pid != gunicorn_master_pid(live_server.process.pid)]
    assert len(nginx) == 1 and b"nginx" in Path(f"/proc/{nginx[0]}/cmdline").read_bytes()
    assert children(gunicorn_server.process.pid) == [gunicorn_master_pid(gunicorn_server.process.pid)]


def test_serve_without_a_model_never_starts_nginx(tmp_path):
    result = subprocess.run(serve_command := [*ServerProcess(tmp_path, tmp_path / "log", front="nginx").command],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "cannot load the model" in result.stderr, serve_command
    assert "serving" not in result.stderr


@needs_nginx
def test_nginx_own_answers_carry_the_headers_of_every_answer(tmp_path):
    """The real nginx with the rendered config, in front of a gunicorn socket nobody listens on: /ping from the
    readiness files (503, then 200 once a worker is published ready), and nginx's own error pages (502, 404, 405,
    413, 400, 431), each with nosniff, no framing and no-store (issue 23, defect 8). (nginx sends no 408 page: it
    closes a connection whose client stopped sending, test_hostile_inputs.py.)"""
    port = free_port()
    board = readiness.ReadinessBoard(tmp_path / "readiness")
    nginx = front.NginxFront(NGINX, Settings(max_request_bytes=1000), "127.0.0.1", port, tmp_path / "g.sock",
                             tmp_path, board.directory)
    nginx.check()
    nginx.start()
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands for a worker
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)

        def answer(payload: bytes) -> tuple[int, dict[str, str], dict]:
            head, _, body = raw_exchange("127.0.0.1", port, payload, timeout=10).partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            fields = dict(line.split(": ", 1) for line in lines[1:])
            return int(lines[0].split()[1]), fields, json.loads(body) if body else {}

        get = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        cases = {
            "ping, not ready": (get % b"/ping", 503, "not_ready"),
            "502": (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx", 502,
                    "bad_gateway"),
            "404 of nginx's own": (get % b"/__maskrcnn_errors/413", 404, "not_found"),
            "413": (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n", 413,
                    "request_too_large"),
            "400": (b"\x00\x01 garbage\r\n\r\n", 400, "bad_http_request"),
            "431": (b"GET /ping HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 10000 + b"\r\n\r\n", 431, "headers_too_large"),
        }
        for name, (payload, status, code) in cases.items():
            got, fields, body = answer(payload)
            assert (got, body["error"]["code"]) == (status, code), name
            for header, value in headers.for_status(status).items():
                assert fields.get(header) == value, (name, header, fields)
        (board.directory / readiness.WORKERS_DIR / f"{worker.pid}.json").write_text(
            json.dumps({"state": "ready", "message": "ready"}))
        board.refresh(os.getpid())
        got, fields, body = answer(get % b"/ping")
        assert (got, body) == (200, {"status": "ready", "workers": [worker.pid]})
        assert {name: fields.get(name) for name in ("X-Content-Type-Options", "X-Frame-Options", "Cache-Control")} == {
            **headers.for_status(200), **headers.NO_STORE}
        got, fields, body = answer(b"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert (got, body["error"]["code"]) == (405, "method_not_allowed") and fields["Cache-Control"] == "no-store"
    finally:
        worker.kill()
        worker.wait()
        nginx.stop(timeout=5)
