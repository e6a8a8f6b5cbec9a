"""Load and soak test of a real ``maskrcnn-serving serve``: N concurrent clients for a fixed time.

Every answer is checked against the sequential answer for its image (not just its status), the workers' resident
memory is sampled throughout, and latency percentiles are reported per time window, so a slow leak or a latency
drift shows up as a trend. The CI test (tests/reliability/test_load.py) runs the same driver for ~35 s.

    # start a 2-worker server on the demo model and soak it for 10 minutes with 8 clients
    .venv/bin/python benchmarks/soak.py --minutes 10 --clients 8 --output soak.json

    # or soak a server that is already running
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8080 --minutes 60

Memory growth is measured from the end of the warm-up phase (the first requests grow caches and TF's allocator
pools: that is not a leak) to the end of the run, per worker process.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # testsupport/ lives in the checkout: pip does not install it

from testsupport.server import ServerProcess  # noqa: E402
from testsupport.server import worker_pids as server_worker_pids  # noqa: E402


@dataclass
class Sample:
    start: float  # seconds since the run started
    latency: float
    status: int
    correct: bool


@dataclass
class LoadReport:
    clients: int
    seconds: float
    requests: int
    statuses: dict[str, int]
    server_errors: int  # 5xx answers
    transport_errors: int  # connection failures (no HTTP answer at all)
    wrong_answers: int  # 200 answers that differ from the sequential answer for that image
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    windows: list[dict] = field(default_factory=list)  # per time window: requests, p50/p99
    rss_mb_after_warmup: dict[str, float] = field(default_factory=dict)
    rss_mb_at_end: dict[str, float] = field(default_factory=dict)
    rss_mb_max: dict[str, float] = field(default_factory=dict)
    rss_growth_mb: dict[str, float] = field(default_factory=dict)
    rss_trace: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def summary(self) -> str:
        growth = ", ".join(f"{pid}: {mb:+.1f} MB" for pid, mb in self.rss_growth_mb.items())
        return (
            f"{self.requests} requests, {self.clients} clients, {self.seconds / 60:.1f} min, "
            f"{self.throughput_rps:.1f} req/s; statuses {self.statuses}; 5xx {self.server_errors}, transport errors "
            f"{self.transport_errors}, wrong answers {self.wrong_answers}; latency p50 {self.p50_ms:.0f} ms, "
            f"p90 {self.p90_ms:.0f} ms, p99 {self.p99_ms:.0f} ms; RSS growth after warm-up per worker: {growth}"
        )


def worker_pids(serve_pid: int) -> list[int]:
    """The gunicorn workers of the ``maskrcnn-serving serve`` process ``serve_pid``."""
    return sorted(server_worker_pids(serve_pid))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no VmRSS for {pid}")


def _percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000, q)) if latencies else float("nan")


def request_bodies(image_paths: list[Path]) -> list[bytes]:
    return [
        json.dumps({"img_id": path.stem, "img_data": base64.b64encode(path.read_bytes()).decode()}).encode()
        for path in image_paths
    ]


def expected_answers(url: str, bodies: list[bytes]) -> list[dict]:
    session = requests.Session()
    answers = []
    for body in bodies:
        response = session.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"},
                                timeout=120)
        response.raise_for_status()
        answers.append(response.json())
    return answers


def run_load(
    url: str,
    bodies: list[bytes],
    expected: list[dict],
    clients: int,
    seconds: float,
    serve_pid: int | None = None,
    warmup_seconds: float = 10.0,
    windows: int = 4,
    sample_every: float = 2.0,
) -> LoadReport:
    """``clients`` threads each send requests back to back (image ``(client + n) % len(bodies)``) for
    ``warmup_seconds + seconds``; only the last ``seconds`` are measured. Resident memory of the server's worker
    processes is sampled every ``sample_every`` seconds when ``serve_pid`` is given."""
    samples: list[Sample] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    measure_from = t0 + warmup_seconds
    stop_at = measure_from + seconds
    headers = {"Content-Type": "application/json"}

    def client(index: int) -> None:
        session = requests.Session()
        n = 0
        while (now := time.monotonic()) < stop_at:
            image = (index + n) % len(bodies)
            n += 1
            try:
                response = session.post(f"{url}/invocations", data=bodies[image], headers=headers, timeout=120)
                status = response.status_code
                correct = status == 200 and response.json() == expected[image]
            except requests.RequestException:
                session = requests.Session()
                status, correct = 0, False
            done = time.monotonic()
            if now >= measure_from:
                with lock:
                    samples.append(Sample(now - measure_from, done - now, status, correct))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    trace: list[tuple[float, dict[str, float]]] = []
    after_warmup: dict[str, float] = {}
    while any(thread.is_alive() for thread in threads):
        now = time.monotonic()
        if serve_pid is not None:
            try:
                reading = {str(pid): round(rss_mb(pid), 1) for pid in worker_pids(serve_pid)}
            except OSError:
                reading = {}
            if now >= measure_from:
                if not after_warmup:
                    after_warmup = reading
                trace.append((round(now - measure_from, 1), reading))
        time.sleep(sample_every)
    for thread in threads:
        thread.join()

    latencies = [s.latency for s in samples]
    statuses = Counter(str(s.status) for s in samples)
    width = seconds / windows
    per_window = []
    for w in range(windows):
        chunk = [s.latency for s in samples if w * width <= s.start < (w + 1) * width]
        per_window.append({"from_s": round(w * width, 1), "requests": len(chunk),
                           "p50_ms": round(_percentile_ms(chunk, 50), 1),
                           "p99_ms": round(_percentile_ms(chunk, 99), 1)})
    at_end = trace[-1][1] if trace else {}
    peak: dict[str, float] = {}
    for _, reading in trace:
        for pid, mb in reading.items():
            peak[pid] = max(peak.get(pid, 0.0), mb)
    return LoadReport(
        clients=clients,
        seconds=seconds,
        requests=len(samples),
        statuses=dict(statuses),
        server_errors=sum(1 for s in samples if s.status >= 500),
        transport_errors=statuses.get("0", 0),
        wrong_answers=sum(1 for s in samples if s.status == 200 and not s.correct),
        throughput_rps=len(samples) / seconds,
        p50_ms=_percentile_ms(latencies, 50),
        p90_ms=_percentile_ms(latencies, 90),
        p99_ms=_percentile_ms(latencies, 99),
        windows=per_window,
        rss_mb_after_warmup=after_warmup,
        rss_mb_at_end=at_end,
        rss_mb_max=peak,
        rss_growth_mb={pid: round(at_end[pid] - after_warmup[pid], 1) for pid in after_warmup if pid in at_end},
        rss_trace=trace,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="An already running server (default: start one on --model-dir).")
    parser.add_argument("--model-dir", type=Path, default=REPO / "model" / "demo")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=Path, nargs="*", default=sorted((REPO / "examples" / "images").glob("*.jpg")))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-seconds", type=float, default=30.0)
    parser.add_argument("--windows", type=int, default=10, help="Latency percentiles are reported per window.")
    parser.add_argument("--output", type=Path, help="Write the full report (with the RSS trace) as JSON.")
    parser.add_argument("--front", choices=("nginx", "none"), default=None,
                        help="The started server's HTTP front (default: its own choice, MODEL_SERVER_FRONT).")
    args = parser.parse_args(argv)

    bodies = request_bodies(args.images)
    server = None
    serve_pid = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        log_path = Path(args.output or "soak").with_suffix(".server.log")
        server = ServerProcess(args.model_dir, log_path, workers=args.workers, front=args.front).start()
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        url, serve_pid = server.url, server.process.pid
        print(f"server {url} (serve pid {serve_pid}, log {log_path})", flush=True)
    try:
        expected = expected_answers(url, bodies)
        report = run_load(url, bodies, expected, args.clients, args.minutes * 60, serve_pid,
                          warmup_seconds=args.warmup_seconds, windows=args.windows, sample_every=5.0)
    finally:
        exit_code = server.stop() if server is not None else None
    print(report.summary())
    for window in report.windows:
        print(f"  window from {window['from_s']:7.1f} s: {window['requests']:5d} requests, "
              f"p50 {window['p50_ms']:7.1f} ms, p99 {window['p99_ms']:7.1f} ms")
    if exit_code is not None:
        print(f"server exit code after SIGTERM: {exit_code}")
    if args.output:
        args.output.write_text(json.dumps({**asdict(report), "server_exit_code": exit_code,
                                           "images": [str(p) for p in args.images]}, indent=1))
    return 0 if report.server_errors == report.wrong_answers == report.transport_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
