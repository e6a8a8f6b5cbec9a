"""The hostile-input catalogue against a fresh 1-worker server: every answer, the longest request, and the worker's
memory (warm, peak during the catalogue, and after it).

    # the catalogue 3 times against nginx + gunicorn (1 worker), default limits (6 MiB answers), results as JSON
    .venv/bin/python benchmarks/hostile_memory.py --rounds 3 --output hostile.json

    # the same with gunicorn alone, or an allocator setting for the workers
    .venv/bin/python benchmarks/hostile_memory.py --front none
    .venv/bin/python benchmarks/hostile_memory.py --env MALLOC_ARENA_MAX=2

The catalogue is :func:`testsupport.hostile.catalogue` (request-level cases) and
:func:`~testsupport.hostile.raw_http_cases` (raw HTTP), sent one at a time. The worker's peak RSS is its
``VmHWM``, reset (``clear_refs``) after the warm-up, so it covers the whole catalogue; "final" is its ``VmRSS``
after the last round and ``--settle`` seconds idle. Every request must end within the server's request deadline,
and none may be a 5xx.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np
import requests

from maskrcnn_serving.settings import Settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # testsupport/ lives in the checkout: pip does not install it

from testsupport.hostile import catalogue, raw_exchange, raw_http_cases  # noqa: E402
from testsupport.server import ServerProcess, status_kb, worker_pids  # noqa: E402


def run_round(url: str, cases, raw_cases, front: str, timeout: float) -> list[dict]:
    """Every case once; one record per request: name, kind, status, code, seconds, whether the answer was the
    documented one."""
    records = []
    session = requests.Session()
    for case in cases:
        start = time.monotonic()
        try:
            response = session.post(f"{url}/invocations", timeout=timeout, **case.request)
            status = response.status_code
            code = response.json().get("error", {}).get("code") if status != 200 else None
        except (requests.RequestException, ValueError) as exc:
            status, code = None, type(exc).__name__
        seconds = time.monotonic() - start
        ok = status in (case.status, *case.statuses) and (status != case.status or case.code in (None, code))
        records.append({"name": case.name, "kind": case.kind, "status": status, "code": code,
                        "seconds": round(seconds, 3), "documented": ok})
    parsed = urlparse(url)
    for case in raw_cases:
        start = time.monotonic()
        answer = raw_exchange(parsed.hostname, parsed.port, case.payload, timeout=timeout)
        seconds = time.monotonic() - start
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None
        try:
            code = json.loads(body)["error"]["code"] if status is not None else None
        except (ValueError, KeyError, TypeError):
            code = "not json"
        records.append({"name": case.name, "kind": case.kind, "status": status, "code": code,
                        "seconds": round(seconds, 3), "documented": (status, code) == case.expected(front)})
    return records


def measure_recycle(server: ServerProcess, worker: int, scene: np.ndarray) -> dict:
    """SIGTERM the worker (what a graceful recycle does) while requests keep coming: the answers meanwhile, and the
    seconds until a new worker answers /ping."""
    import os
    import signal

    body = cv2.imencode(".png", scene)[1].tobytes()
    statuses: Counter = Counter()
    start = time.monotonic()
    os.kill(worker, signal.SIGTERM)
    ready_after = None
    while time.monotonic() - start < 300:
        try:
            answer = requests.post(f"{server.url}/invocations", data=body, timeout=60,
                                   headers={"Content-Type": "image/png"}, params={"format": "boxes"})
            statuses[str(answer.status_code)] += 1
        except requests.RequestException as exc:
            statuses[type(exc).__name__] += 1
        replacement = worker_pids(server.process.pid) - {worker}
        if replacement and statuses.get("200", 0) and ready_after is None and answer.status_code == 200:
            ready_after = round(time.monotonic() - start, 1)
            break
        time.sleep(0.2)
    (new,) = worker_pids(server.process.pid)
    return {"seconds_until_served_again": ready_after, "answers_meanwhile": dict(statuses),
            "new_worker_rss_mb": round(status_kb(new, "VmRSS") / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO / "model" / "demo")
    parser.add_argument("--front", choices=("nginx", "none", "default"), default="nginx",
                        help="The server's front; default: pass no --front flag (a server from before the front).")
    parser.add_argument("--rounds", type=int, default=1, help="Times the whole catalogue is sent.")
    parser.add_argument("--settle", type=float, default=5.0, help="Idle seconds before the final RSS is read.")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="Environment of the server (e.g. MALLOC_ARENA_MAX=2); repeatable.")
    parser.add_argument("--flag", action="append", default=[], help="Extra `serve` flag (e.g. --flag=--threads=2).")
    parser.add_argument("--recycle", action="store_true",
                        help="Afterwards, replace the worker (SIGTERM: gunicorn stops it gracefully and starts a new "
                             "one) while a client sends /invocations every 0.2 s: what recycling a worker costs.")
    parser.add_argument("--output", type=Path, help="Write the full report as JSON.")
    args = parser.parse_args(argv)

    photo = cv2.imread(str(REPO / "examples" / "images" / "1001_00000.jpg"), cv2.IMREAD_COLOR)
    scene = np.ascontiguousarray(photo[100:220, 60:260])
    env = dict(item.split("=", 1) for item in args.env)
    settings = Settings.from_env(env)  # the server's limits and deadline (``--env``; ``--flag`` values are not read)
    cases, raw_cases = catalogue(scene, photo, limits=settings.limits), raw_http_cases()
    log_path = Path(args.output or "hostile").with_suffix(".server.log")
    front = None if args.front == "default" else args.front
    server = ServerProcess(args.model_dir, log_path, workers=1, flags=args.flag, env=env, front=front).start()
    deadline = settings.deadline_seconds or float("inf")
    try:
        server.wait_ready()
        (worker,) = worker_pids(server.process.pid)
        time.sleep(2.0)
        warm = status_kb(worker, "VmRSS") / 1024
        with open(f"/proc/{worker}/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := VmRSS: the peak from here on
        records, after_round = [], []
        for _ in range(args.rounds):
            records += run_round(server.url, cases, raw_cases, args.front, deadline + 30)
            after_round.append(round(status_kb(worker, "VmRSS") / 1024, 1))
        time.sleep(args.settle)
        alive = worker_pids(server.process.pid) == {worker}
        peak, final = status_kb(worker, "VmHWM") / 1024, status_kb(worker, "VmRSS") / 1024
        recycle = measure_recycle(server, worker, scene) if args.recycle else None
    finally:
        exit_code = server.stop()
    slowest = max(records, key=lambda r: r["seconds"])
    report = {
        "front": args.front, "env": env, "flags": args.flag, "rounds": args.rounds,
        "cases": len(cases) + len(raw_cases), "requests": len(records),
        "kinds": dict(Counter(r["kind"] for r in records[: len(cases) + len(raw_cases)])),
        "statuses": dict(Counter(str(r["status"]) for r in records)),
        "server_errors": sum(1 for r in records if (r["status"] or 0) >= 500 or (r["status"] is None
                                                                              and not r["documented"])),
        "undocumented": [r for r in records if not r["documented"]],
        "longest_request": slowest, "deadline_seconds": deadline,
        "over_deadline": [r for r in records if r["seconds"] >= deadline],
        "rss_mb": {"warm": round(warm, 1), "peak": round(peak, 1), "final": round(final, 1),
                   "after_each_round": after_round},
        "growth_mb": {"peak": round(peak - warm, 1), "final": round(final - warm, 1)},
        "worker_replaced": not alive, "exit_code": exit_code, "recycle": recycle,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "undocumented"}, indent=1))
    for record in report["undocumented"]:
        print("undocumented answer:", record, file=sys.stderr)
    if args.output:
        args.output.write_text(json.dumps({**report, "requests_detail": records}, indent=1))
    return 0 if not report["server_errors"] and not report["over_deadline"] and alive else 1


if __name__ == "__main__":
    sys.exit(main())
