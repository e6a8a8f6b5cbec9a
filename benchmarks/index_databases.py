"""Milvus Lite against a Milvus server, measured with the product's own index code: insert rate, the time to make
the index searchable after a restart, and search latency at 100,000 instances.

Both databases get the same work, interleaved step by step so that the machine's load falls on both alike:

* **insert**: ``--instances`` random unit vectors of ``--dim`` values (an instance row each, as
  ``InstanceIndex.insert_rows`` writes it: the vector and the stored fields, empty thumbnail and mask), in batches
  of ``--batch``, alternating one batch per database; then a flush;
* **index**: wait until the database says every row of the instance collection is in its HNSW index (a Milvus
  server builds it in the background once the flush has sealed the data; Milvus Lite reports no pending rows);
* **load**: release and load the collections (what a restarted server does; Milvus Lite builds its HNSW graph
  here, the Milvus server loads the index it built);
* **search**: ``--queries`` single-vector searches for the 10 nearest neighbours (what the server's
  ``neighbours=10`` sends for an image with one detection), alternating the databases query by query; p50 / p99.

The Milvus server is Milvus standalone 2.3.5 from the PyPI package ``milvus==2.3.5`` (testsupport/milvus_server.py:
a venv of its own, a local process on a free port; not while the tests run one: see there), or any server given
with ``--milvus-url``.

    .venv/bin/python benchmarks/index_databases.py --json out/index-databases.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # testsupport/, beside the package

from maskrcnn_serving.bench.report import write_json_report  # noqa: E402
from maskrcnn_serving.bench.stats import machine_info  # noqa: E402
from maskrcnn_serving.search import database  # noqa: E402
from maskrcnn_serving.search.index import InstanceIndex  # noqa: E402
from testsupport.milvus_server import MilvusServer  # noqa: E402
from testsupport.server import free_port  # noqa: E402


def percentiles(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(seconds, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(seconds, 99)) * 1000, 2)}


def rows_of(vectors: np.ndarray) -> list[dict]:
    return [{"vector": v.tolist(), "image": "random.jpg", "bbox": [0.0, 0.0, 1.0, 1.0], "category": "random",
             "category_id": 1, "score": 0.5, "height": 1, "width": 1, "mask": "", "thumbnail": ""} for v in vectors]


def wait_indexed(index: InstanceIndex, limit: float = 1800.0) -> dict:
    """Wait until every row of ``index``'s instance collection is in its vector index; returns the database's last
    description of that index (``indexed_rows``, ``total_rows``, ``state``)."""
    give_up = time.monotonic() + limit
    while True:
        described = index._call(lambda c: c.describe_index(index.collection, "vector"))
        if described["indexed_rows"] >= described["total_rows"] and not described["pending_index_rows"]:
            return described
        if time.monotonic() > give_up:
            raise TimeoutError(f"the index was not built within {limit:g} s: {described}")
        time.sleep(0.5)


def unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=261, help="Vector length (261: a 4-class ResNet-50-FPN model).")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--milvus-url", default=None, help="A running Milvus server (default: start 2.3.5 here).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="index-databases-"))
    milvus = None
    if args.milvus_url is None:
        milvus = MilvusServer(work / "milvus", free_port())
        started = time.perf_counter()
        milvus.start()
        milvus_start_s = time.perf_counter() - started
    url = args.milvus_url or milvus.url
    collection = f"bench_{int(time.time())}"
    dbs = {"milvus_lite": str(work / "lite.db"), "milvus_server": url}
    report: dict = {"instances": args.instances, "dim": args.dim, "batch": args.batch, "queries": args.queries,
                    "milvus_server_start_s": None if milvus is None else round(milvus_start_s, 1)}
    try:
        indexes = {name: InstanceIndex.open(db, collection, dim=args.dim, image_dim=2, create=True, timeout=600.0)
                   for name, db in dbs.items()}
        report["server_version"] = indexes["milvus_server"]._call(lambda c: c.get_server_version())
        rng = np.random.default_rng(0)
        insert = {name: 0.0 for name in dbs}
        for start in range(0, args.instances, args.batch):
            rows = rows_of(unit_vectors(rng, min(args.batch, args.instances - start), args.dim))
            for name, index in indexes.items():
                started = time.perf_counter()
                index.insert_rows(rows)
                insert[name] += time.perf_counter() - started
        flush, indexed, described, load = {}, {}, {}, {}
        for name, index in indexes.items():
            started = time.perf_counter()
            index.flush()
            flush[name] = time.perf_counter() - started
        for name, index in indexes.items():
            started = time.perf_counter()
            described[name] = wait_indexed(index)
            indexed[name] = time.perf_counter() - started
        for name, index in indexes.items():
            started = time.perf_counter()
            index.reload()
            load[name] = time.perf_counter() - started
        queries = unit_vectors(rng, args.queries, args.dim)
        timings: dict[str, list[float]] = {name: [] for name in dbs}
        for _ in range(2):  # a first pass to warm both up, not counted
            for query in queries[:20]:
                for index in indexes.values():
                    index.search(query[None], 10)
        for query in queries:
            for name, index in indexes.items():
                started = time.perf_counter()
                found = index.search(query[None], 10)[0]
                timings[name].append(time.perf_counter() - started)
                assert len(found) == 10, (name, len(found))
        for name, index in indexes.items():
            report[name] = {
                "count": index.count(),
                "insert_rows_per_s": round(args.instances / insert[name]),
                "flush_s": round(flush[name], 2),
                "index_wait_s": round(indexed[name], 2),
                "index": {key: described[name][key] for key in ("index_type", "indexed_rows", "total_rows", "state")},
                "load_s": round(load[name], 2),
                "search_k10": percentiles(timings[name]),
            }
            index.close()
    finally:
        database.stop_local_servers()
        if milvus is not None:
            milvus.close()
        shutil.rmtree(work, ignore_errors=True)
    report["machine"] = {**machine_info(), "load_average": Path("/proc/loadavg").read_text().split()[:3]}
    print(json.dumps(report, indent=1))
    if args.json is not None:
        write_json_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
