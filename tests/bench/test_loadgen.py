"""``bench http``'s load generator: closed and open loops, status and size accounting, SageMaker targets."""

from __future__ import annotations

import pytest


def test_load_generator_counts_every_request_by_status_and_size(scripted_server):
    from maskrcnn_serving.bench import loadgen

    url, seen = scripted_server
    target = loadgen.HttpTarget(url, timeout=10)
    images = [bytes([i]) * (100 + i) for i in range(4)]
    bodies = loadgen.build_bodies(images, fields={"format": "coco"})
    assert [b.images for b in bodies] == [1, 1, 1, 1]

    closed = loadgen.run_closed(target, bodies, concurrency=3, requests=10, duration=30)
    # Bodies are used in turn: requests 3 and 7 carry the 4th body, which the server fails.
    assert closed["sent"] == 10 and closed["ok"] == 8
    assert closed["status_counts"] == {"200": 8, "500": 2}
    assert closed["response_bytes"]["mean"] == 1000.0
    assert closed["request_bytes"]["min"] == min(len(b.data) for b in bodies)
    assert closed["request_bytes"]["max"] == max(len(b.data) for b in bodies)
    assert closed["throughput_rps"] == pytest.approx(8 / closed["wall_s"])
    assert len(seen) == 10 and all(doc["format"] == "coco" for doc in seen)

    open_loop = loadgen.run_open(target, bodies, rate=40.0, requests=8, duration=30)
    assert open_loop["sent"] == 8 and open_loop["status_counts"] == {"200": 6, "500": 2}
    assert open_loop["wall_s"] >= 7 / 40.0  # 8 arrivals at 40/s span at least 0.175 s
    assert open_loop["latency_s"]["min"] >= open_loop["service_latency_s"]["min"]

    # Bounded by time as well as by count.
    bounded = loadgen.run_open(target, bodies, rate=20.0, requests=1000, duration=0.3)
    assert 1 <= bounded["sent"] <= 7

    raw = loadgen.run_closed(target, loadgen.build_bodies(images, raw=True), concurrency=1, requests=2, duration=30)
    assert raw["status_counts"] == {"413": 2} and raw["ok"] == 0 and raw["latency_s"] == {}


def test_load_generator_counts_requests_that_get_no_answer():
    import socket

    from maskrcnn_serving.bench.loadgen import HttpTarget, build_bodies, run_closed

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_closed(HttpTarget(f"127.0.0.1:{port}", timeout=5), build_bodies([b"abc"]), 2, 4, 30)
    assert result["sent"] == 4 and result["ok"] == 0
    assert result["status_counts"] == {"error:ConnectionRefusedError": 4}


def test_sagemaker_target_calls_invoke_endpoint_and_maps_container_errors(monkeypatch):
    """boto3 is optional and not installed for the tests: a stand-in records the calls; a ModelError carries the
    container's own status, which the load generator must count (not the 424 SageMaker wraps it in)."""
    import sys
    import types

    from maskrcnn_serving.bench import loadgen

    class ClientError(Exception):
        def __init__(self, response):
            super().__init__("client error")
            self.response = response

    calls = []

    class Client:
        def invoke_endpoint(self, **kwargs):
            calls.append(kwargs)
            if kwargs["Body"] == b"bad":
                raise ClientError({"Error": {"Code": "ModelError"}, "OriginalStatusCode": 413,
                                   "ResponseMetadata": {"HTTPStatusCode": 424}})
            return {"Body": types.SimpleNamespace(read=lambda: b'{"annotations": []}')}

    boto3 = types.ModuleType("boto3")
    boto3.client = lambda service, region_name=None, config=None: calls.append((service, region_name)) or Client()
    botocore = types.ModuleType("botocore")
    config_module = types.ModuleType("botocore.config")
    config_module.Config = lambda **kwargs: kwargs
    exceptions_module = types.ModuleType("botocore.exceptions")
    exceptions_module.ClientError = ClientError
    for name, module in {"boto3": boto3, "botocore": botocore, "botocore.config": config_module,
                         "botocore.exceptions": exceptions_module}.items():
        monkeypatch.setitem(sys.modules, name, module)

    target = loadgen.SageMakerTarget("my-endpoint", "eu-west-1")
    assert target.description == "sagemaker:my-endpoint"
    assert target.send(b"{}", "application/json") == (200, b'{"annotations": []}')
    status, _ = target.send(b"bad", "application/json")
    assert status == 413
    assert calls[0] == ("sagemaker-runtime", "eu-west-1")
    assert calls[1] == {"EndpointName": "my-endpoint", "ContentType": "application/json",
                        "Accept": "application/json", "Body": b"{}"}
