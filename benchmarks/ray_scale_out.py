"""``predict`` on Ray against ``predict`` in one process, measured: images per second with 1 and 2 actors and in
one process, the start-up, and the resident memory of each actor (docs/scale-out.md).

    .venv/bin/python benchmarks/ray_scale_out.py --model-dir model/demo --images DIR [--limit 100] [--rounds 2] \\
        [--json out/ray-scale-out.json]

Each configuration is ``maskrcnn-serving predict`` in a child process, writing ``--shards`` of one image each (a
shard's modification time is when its image was written), in turn, round after round, each configuration first,
middle and last in turn (the machine's load then weighs on all of them alike). The Ray configurations join one
cluster the script starts for them (testsupport/ray_cluster.py: ``ray start --head`` with this machine's CPUs, one
CPU per actor). Figures per run:

* ``wall_s``: the whole command, start to exit (Ray's connection and the model loads included);
* ``first_image_s``: from the start to the first image written (start-up: imports, connection, model loads);
* ``steady_img_per_s``: the images after the first over the time from the first written to the last (the model
  loads left out; on Ray, what the actors sustain through the engine: its overhead against the single process);
* ``peak_rss_mb``: the peak resident memory of the single process, or of each actor process (psutil, sampled every
  0.2 s), and of the Ray run's driver.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # testsupport/ lives in the checkout: pip does not install it

from maskrcnn_serving.bench.report import write_json_report  # noqa: E402
from maskrcnn_serving.bench.stats import machine_info  # noqa: E402
from testsupport.ray_cluster import RayHead, ray_head  # noqa: E402

SAMPLE_SECONDS = 0.2


def configurations(cpus: int) -> dict[str, list[str]]:
    return {"single process": [], "ray, 1 actor": ["--actors", "1"],
            f"ray, {cpus} actors": ["--actors", str(cpus)]}


def run_one(args: argparse.Namespace, images: Path, flags: list[str], head: RayHead, work: Path) -> dict:
    shards = work / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    command = [sys.executable, "-m", "maskrcnn_serving.cli", "predict", "--model-dir", str(args.model_dir),
               str(images), "--shards", str(shards), "--shard-size", "1"]
    if flags:
        command += ["--ray", head.address, *flags]
    log = work / "stderr.txt"
    started = time.time()
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=head.environment)
    peaks: dict[int, int] = {}
    driver_peak = 0
    while process.poll() is None:
        try:
            driver_peak = max(driver_peak, psutil.Process(process.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        for actor in head.actor_processes() if flags else []:
            try:
                if actor.create_time() < started:  # the previous run's, still stopping
                    continue
                peaks[actor.pid] = max(peaks.get(actor.pid, 0), actor.memory_info().rss)
            except psutil.NoSuchProcess:
                continue
        time.sleep(SAMPLE_SECONDS)
    wall = time.time() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    written = sorted(p.stat().st_mtime for p in shards.glob("part-*.jsonl"))
    report = {"wall_s": round(wall, 2), "images": len(written), "first_image_s": round(written[0] - started, 2),
              "steady_img_per_s": round((len(written) - 1) / (written[-1] - written[0]), 3)}
    if flags:
        report["peak_rss_mb"] = {"actors": sorted(round(v / 2**20) for v in peaks.values()),
                                 "driver": round(driver_peak / 2**20)}
    else:
        report["peak_rss_mb"] = {"process": round(driver_peak / 2**20)}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO / "model" / "demo")
    parser.add_argument("--images", type=Path, required=True, help="A folder of images.")
    parser.add_argument("--limit", type=int, default=100, help="Images taken from the folder (sorted by name).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the Ray cluster (and actors).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ray-scale-out-"))
    images = work / "images"
    images.mkdir()
    for path in sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:args.limit]:
        shutil.copy(path, images / path.name)
    runs: dict[str, list[dict]] = {name: [] for name in configurations(args.cpus)}
    try:
        with ray_head(cpus=args.cpus) as head:
            names = list(runs)
            for round_number in range(args.rounds):
                order = names[round_number % len(names):] + names[:round_number % len(names)]
                for name in order:
                    report = run_one(args, images, configurations(args.cpus)[name], head, work)
                    print(f"round {round_number + 1} {name}: {json.dumps(report)}", flush=True)
                    runs[name].append(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    single = statistics.median(r["steady_img_per_s"] for r in runs["single process"])
    for name, reports in runs.items():
        steady = statistics.median(r["steady_img_per_s"] for r in reports)
        summary[name] = {"steady_img_per_s": steady, "against_single_process": round(steady / single, 3),
                         "wall_s": statistics.median(r["wall_s"] for r in reports),
                         "first_image_s": statistics.median(r["first_image_s"] for r in reports),
                         "peak_rss_mb": reports[-1]["peak_rss_mb"]}
    report = {"model_dir": str(args.model_dir), "images": args.limit, "rounds": args.rounds, "cpus": args.cpus,
              "machine": machine_info(), "load_average_at_end": os.getloadavg(), "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    if args.json is not None:
        write_json_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
