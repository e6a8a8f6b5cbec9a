"""``/ping`` latency while clients keep a real server busy (issue 23, defect 3; docs/reliability.md "/ping under
load"): each load of :func:`testsupport.hostile.ping_loads` (16 clients sending 7000 x 7000 photos, ...) for a fixed
time, with a health checker timing ``GET /ping`` on a fresh connection every 50 ms.

    # a fresh 2-worker server behind nginx (as the images run it), then gunicorn alone; 60 s per load
    .venv/bin/python benchmarks/ping_under_load.py --seconds 60 --output ping-nginx.json
    .venv/bin/python benchmarks/ping_under_load.py --front none --seconds 60 --output ping-none.json

    # a server of another checkout (e.g. before the fix), started from that checkout's package
    .venv/bin/python benchmarks/ping_under_load.py --env PYTHONPATH=/path/to/checkout

Reports, per load: the pings' statuses and latency percentiles, and the load's own statuses and throughput; the
machine and its load average before and after. Exit status 1 when a ping was not 200 or the p99 of a load was over
:data:`testsupport.hostile.PING_P99_SECONDS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # testsupport/ lives in the checkout: pip does not install it

from maskrcnn_serving.bench.stats import machine_info  # noqa: E402
from maskrcnn_serving.settings import Settings  # noqa: E402
from testsupport.hostile import PING_P99_SECONDS, ping_loads  # noqa: E402
from testsupport.load import ping_under_load  # noqa: E402
from testsupport.server import ServerProcess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO / "model" / "demo")
    parser.add_argument("--url", help="Time a server that is already running instead of starting one.")
    parser.add_argument("--front", choices=("nginx", "none"), default="nginx")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0, help="Seconds of each load.")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--side", type=int, default=7000, help="Side of the square photos in pixels.")
    parser.add_argument("--loads", default="", help="Comma-separated indices of the loads to run (default all).")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="Environment of the server; repeatable.")
    parser.add_argument("--output", type=Path, help="Write the report, every ping included, as JSON.")
    args = parser.parse_args(argv)

    photo = cv2.imread(str(REPO / "examples" / "images" / "1001_00000.jpg"), cv2.IMREAD_COLOR)
    scene = np.ascontiguousarray(photo[100:220, 60:260])
    env = dict(item.split("=", 1) for item in args.env)
    loads = ping_loads(photo, scene, args.side, Settings.from_env(env).limits, args.clients)
    if args.loads:
        loads = [loads[int(index)] for index in args.loads.split(",")]
    server = None
    if args.url is None:
        log_path = Path(args.output or "ping-under-load").with_suffix(".server.log")
        server = ServerProcess(args.model_dir, log_path, workers=args.workers, env=env, front=args.front).start()
    reports = []
    load_average = {"before": os.getloadavg()}
    try:
        url = args.url or server.url
        if server is not None:
            server.wait_ready()
        for load in loads:
            report = ping_under_load(url, load, args.seconds)
            print(report.summary(), flush=True)
            reports.append(report)
    finally:
        load_average["after"] = os.getloadavg()
        exit_code = server.stop() if server is not None else None
    failed = [r.load_name for r in reports
              if set(r.ping_statuses) != {"200"} or r.ping_seconds["p99"] > PING_P99_SECONDS]
    document = {
        "machine": machine_info(), "load_average": load_average, "front": args.front, "workers": args.workers,
        "seconds": args.seconds, "env": env, "server_exit_code": exit_code,
        "loads": [{"name": r.load_name, "pings": len(r.pings), "ping_statuses": r.ping_statuses,
                   "ping_ms": {k: round(v * 1000, 2) for k, v in r.ping_seconds.items()},
                   "load_status_counts": r.load.get("status_counts"),
                   "load_throughput_rps": r.load.get("throughput_rps"),
                   "load_latency_s": r.load.get("latency_s")} for r in reports],
        "over_the_bound": failed,
    }
    print(json.dumps({k: v for k, v in document.items() if k != "machine"}, indent=1))
    if args.output:
        args.output.write_text(json.dumps({**document, "every_ping": {r.load_name: r.pings for r in reports}},
                                          indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
