"""``bench http``: load against a running endpoint, a server URL or a SageMaker endpoint (boto3 ``invoke_endpoint``).

Two kinds of load, each bounded by a request count AND a duration, so a run always stops by itself:

* closed loop (``run_closed``): C clients, each sends its next request as soon as the previous answer arrives. A
  sweep over C finds the throughput at which latency starts to climb.
* open loop (``run_open``): requests are scheduled at a fixed arrival rate whatever the server does, as real
  independent clients behave. Latency counts from the SCHEDULED send time, so a stalled server shows its full cost
  instead of slowing the load down ("coordinated omission").

Every request is recorded: status (HTTP code, or ``error:<Exception>`` when no answer came), latency, request and
response sizes. Only successful (200) requests count towards throughput and latency percentiles.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import numpy as np

from maskrcnn_serving.bench.stats import summarize


class Target(Protocol):
    """Where requests go. ``send`` returns (status, response body) or raises when no answer came."""

    description: str

    def send(self, body: bytes, content_type: str) -> tuple[int, bytes]: ...


class HttpTarget:
    """POST to ``url`` (``http://host:port`` means ``/invocations``) over one keep-alive connection per thread."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme in {url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname or "127.0.0.1", parts.port
        self.path = (parts.path if parts.path not in ("", "/") else "/invocations") + (
            f"?{parts.query}" if parts.query else ""
        )
        self.timeout = timeout
        self.description = f"{self.scheme}://{self.host}:{self.port or ''}{self.path}"
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            connection = cls(self.host, self.port, timeout=self.timeout)
            self._local.connection = connection
        return connection

    def send(self, body: bytes, content_type: str) -> tuple[int, bytes]:
        connection = self._connection()
        try:
            connection.request("POST", self.path, body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            return response.status, response.read()
        except Exception:
            connection.close()  # a broken keep-alive connection is replaced on the next request
            self._local.connection = None
            raise


class SageMakerTarget:
    """``sagemaker-runtime.invoke_endpoint`` (needs boto3 and AWS credentials; not used by anything else)."""

    def __init__(self, endpoint_name: str, region: str | None = None, timeout: float = 120.0) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise RuntimeError("SageMaker endpoints need boto3: pip install boto3") from exc
        config = Config(read_timeout=timeout, retries={"max_attempts": 0}, max_pool_connections=256)
        self._client = boto3.client("sagemaker-runtime", region_name=region, config=config)
        self.endpoint_name = endpoint_name
        self.description = f"sagemaker:{endpoint_name}"

    def send(self, body: bytes, content_type: str) -> tuple[int, bytes]:
        from botocore.exceptions import ClientError

        try:
            response = self._client.invoke_endpoint(
                EndpointName=self.endpoint_name, ContentType=content_type, Accept="application/json", Body=body
            )
            return 200, response["Body"].read()
        except ClientError as exc:
            # A container error comes back as ModelError carrying the container's own status.
            error = exc.response.get("Error", {})
            status = exc.response.get("OriginalStatusCode") or exc.response["ResponseMetadata"]["HTTPStatusCode"]
            return int(status), json.dumps(error).encode()


@dataclass(frozen=True)
class RequestBody:
    data: bytes
    content_type: str
    images: int


def build_bodies(
    images: Sequence[bytes],
    images_per_request: int = 1,
    fields: Mapping[str, object] | None = None,
    raw: bool = False,
) -> list[RequestBody]:
    """Request bodies in the seed's schema ``{"img_id", "img_data": base64, <fields>}`` (a JSON list when several
    images go in one request), or raw image bodies for Batch Transform style requests. One body per image."""
    if raw:
        if images_per_request != 1:
            raise ValueError("a raw image body carries exactly one image")
        return [RequestBody(data, "image/jpeg", 1) for data in images]
    bodies = []
    for start in range(len(images)):
        items = []
        for k in range(images_per_request):
            data = images[(start + k) % len(images)]
            encoded = base64.b64encode(data).decode()
            items.append({"img_id": f"bench-{start}-{k}", "img_data": encoded, **(fields or {})})
        document = items if images_per_request > 1 else items[0]
        bodies.append(RequestBody(json.dumps(document).encode(), "application/json", images_per_request))
    return bodies


@dataclass
class RequestRecord:
    scheduled: float  # perf_counter seconds when the request was due (open loop) or sent (closed loop)
    sent: float
    done: float
    status: str
    request_bytes: int
    response_bytes: int
    images: int


def _send(target: Target, body: RequestBody, scheduled: float) -> RequestRecord:
    sent = time.perf_counter()
    try:
        status, response = target.send(body.data, body.content_type)
        code, size = str(status), len(response)
    except Exception as exc:  # no answer at all: counted, never raised
        code, size = f"error:{type(exc).__name__}", 0
    return RequestRecord(scheduled, sent, time.perf_counter(), code, len(body.data), size, body.images)


def summarize_records(records: Sequence[RequestRecord], mode: str, **extra) -> dict:
    """Throughput and latency of the successful requests, and every outcome counted by status."""
    ok = [r for r in records if r.status == "200"]
    if records:
        wall = max(r.done for r in records) - min(r.scheduled for r in records)
    else:
        wall = 0.0
    counts = Counter(r.status for r in records)
    result = {
        "mode": mode,
        **extra,
        "sent": len(records),
        "ok": len(ok),
        "status_counts": dict(sorted(counts.items())),
        "wall_s": wall,
        "throughput_rps": len(ok) / wall if wall > 0 else 0.0,
        "images_per_s": sum(r.images for r in ok) / wall if wall > 0 else 0.0,
        "latency_s": summarize([r.done - r.scheduled for r in ok]),
        "service_latency_s": summarize([r.done - r.sent for r in ok]),
        "request_bytes": summarize([r.request_bytes for r in records]),
        "response_bytes": summarize([r.response_bytes for r in ok]),
    }
    return result


def run_closed(target: Target, bodies: Sequence[RequestBody], concurrency: int, requests: int, duration: float) -> dict:
    """``concurrency`` clients back to back until ``requests`` have been sent or ``duration`` seconds have passed."""
    lock = threading.Lock()
    next_index = 0
    records: list[RequestRecord] = []
    deadline = time.perf_counter() + duration

    def client() -> None:
        nonlocal next_index
        while True:
            with lock:
                if next_index >= requests or time.perf_counter() >= deadline:
                    return
                index = next_index
                next_index += 1
            now = time.perf_counter()
            record = _send(target, bodies[index % len(bodies)], now)
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize_records(records, "closed", concurrency=concurrency)


def run_open(
    target: Target,
    bodies: Sequence[RequestBody],
    rate: float,
    requests: int,
    duration: float,
    max_in_flight: int = 64,
    poisson: bool = False,
    seed: int = 0,
) -> dict:
    """Requests due at ``rate`` per second (evenly spaced, or Poisson arrivals) until ``requests`` are due or
    ``duration`` has passed; at most ``max_in_flight`` are sent at once (later ones wait, and their wait counts in
    their latency)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, requests) if poisson else np.full(requests, 1.0 / rate)
    start = time.perf_counter() + 0.05
    due = start + np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    due = due[due < start + duration]
    futures = []
    with ThreadPoolExecutor(max_workers=max_in_flight) as pool:
        for index, when in enumerate(due):
            delay = when - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(_send, target, bodies[index % len(bodies)], float(when)))
        records = [f.result() for f in futures]
    result = summarize_records(records, "open", target_rate=rate, poisson=poisson)
    late = [r.sent - r.scheduled for r in records]
    result["send_delay_s"] = summarize(late)  # > 0 when the client itself could not keep up (max_in_flight)
    return result


def warm_up(target: Target, bodies: Sequence[RequestBody], count: int) -> list[str]:
    """Send ``count`` requests one after another (excluded from the figures); return their statuses."""
    return [_send(target, bodies[i % len(bodies)], time.perf_counter()).status for i in range(count)]
