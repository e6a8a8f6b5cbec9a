"""``/ping`` timed while a load keeps the server busy (issue 23, defect 3): the load of a
:class:`testsupport.hostile.PingLoad` from :mod:`maskrcnn_serving.bench.loadgen` (closed loop) in a child process of
its own, and a health checker in this one that sends ``GET /ping`` on a fresh connection at a fixed interval, as
SageMaker's does. (In one process, the load's threads delayed the checker's own thread: the interpreter lock.)

    report = ping_under_load(server.url, load, seconds=20)
    report.ping_seconds["p99"], report.ping_statuses, report.load["status_counts"]
"""

from __future__ import annotations

import http.client
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from maskrcnn_serving.bench.loadgen import HttpTarget, RequestBody, run_closed
from maskrcnn_serving.bench.stats import summarize
from testsupport.hostile import PingLoad


@dataclass
class PingReport:
    """What the health checker saw during a load: every ping's (seconds since the load started, status or
    ``error:<Exception>``, seconds it took), their summary, and the load's own (``loadgen.summarize_records``)."""

    load_name: str
    pings: list[tuple[float, str, float]] = field(default_factory=list)
    load: dict = field(default_factory=dict)

    @property
    def ping_seconds(self) -> dict[str, float]:
        return summarize([seconds for _, _, seconds in self.pings])

    @property
    def ping_statuses(self) -> dict[str, int]:
        return dict(Counter(status for _, status, _ in self.pings))

    def summary(self) -> str:
        ping = self.ping_seconds
        return (f"{self.load_name}: {len(self.pings)} pings {self.ping_statuses}, p50 {ping['p50'] * 1000:.1f} ms, "
                f"p99 {ping['p99'] * 1000:.1f} ms, max {ping['max'] * 1000:.1f} ms; load: "
                f"{self.load.get('status_counts')}, {self.load.get('throughput_rps', 0):.2f} req/s")


def ping_once(url: str, timeout: float = 10.0) -> tuple[str, float]:
    """``GET /ping`` on a new connection: (status or ``error:<Exception>``, seconds until the whole answer)."""
    parts = urlsplit(url)
    start = time.perf_counter()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", "/ping", headers={"Connection": "close"})
        response = connection.getresponse()
        response.read()
        status = str(response.status)
    except Exception as exc:  # no answer within the timeout: counted as what it is
        status = f"error:{type(exc).__name__}"
    finally:
        connection.close()
    return status, time.perf_counter() - start


def _run_load(url: str, load: PingLoad, seconds: float, results) -> None:
    target = HttpTarget(f"{url}/invocations?{load.query}", timeout=max(120.0, seconds))
    body = RequestBody(load.body, load.content_type, 1)
    results.send(run_closed(target, [body], load.clients, requests=10**9, duration=seconds))
    results.close()


def ping_under_load(url: str, load: PingLoad, seconds: float, ping_every: float = 0.05,
                    settle: float = 2.0) -> PingReport:
    """Run ``load`` against ``url`` for ``seconds`` and, from ``settle`` seconds in (every client has sent its first
    request, the queues are full) until the load's last answer, time a ``/ping`` every ``ping_every`` seconds."""
    context = multiprocessing.get_context("fork")  # the child needs nothing but the load (no re-import)
    receiving, sending = context.Pipe(duplex=False)
    loader = context.Process(target=_run_load, args=(url, load, seconds, sending), name="load", daemon=True)
    report = PingReport(load.name)
    start = time.perf_counter()
    loader.start()
    sending.close()
    time.sleep(settle)
    while loader.is_alive() and not receiving.poll():
        tick = time.perf_counter()
        status, took = ping_once(url)
        report.pings.append((tick - start, status, took))
        time.sleep(max(0.0, ping_every - (time.perf_counter() - tick)))
    report.load = receiving.recv() if receiving.poll(seconds + 300) else {}
    loader.join(timeout=30)
    return report
