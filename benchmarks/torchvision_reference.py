"""Seconds per image of torchvision's Mask R-CNN (ResNet-50 FPN) on this machine: the peer figure of issue 4.

The model alone, as docs/optimized-backend.md#speed quotes it: a 640x480 image tensor in, torchvision's own transform
resizing it to 800x1067 (min_size 800, max_size 1333), score threshold 0 and 100 detections per image, so the mask head
always runs on 100 boxes. Untrained weights (nothing may be downloaded here); the work is the same as with trained
ones. Runs in its own environment, beside ours but not in it:

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tv/bin/python benchmarks/torchvision_reference.py --images 6 --json torchvision.json

``--precision bfloat16`` runs the model under ``torch.autocast("cpu", dtype=torch.bfloat16)``, torchvision's own
reduced-precision path on CPU (convolutions and matrix products in bfloat16, the rest in float32).

Alternate it with ``maskrcnn-serving bench model`` at the same setting to measure both in one run
(docs/optimized-backend.md, "Speed", has the commands and figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6, help="Timed images (default 6).")
    parser.add_argument("--warmup", type=int, default=1, help="Discarded images (default 1).")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores).")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="float32, or bfloat16 under torch.autocast on the CPU (default float32).")
    parser.add_argument("--json", type=Path, help="Write the report as JSON here.")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=800, max_size=1333, box_score_thresh=0.0,
        box_detections_per_img=100,
    ).eval()
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(0, 1, (3, 480, 640)).astype(np.float32))
    times, detections = [], []
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bfloat16"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        for index in range(args.warmup + args.images):
            start = time.perf_counter()
            output = model([image])[0]
            elapsed = time.perf_counter() - start
            if index >= args.warmup:
                times.append(elapsed)
                detections.append(int(output["masks"].shape[0]))
    report = {
        "model": "torchvision maskrcnn_resnet50_fpn (untrained weights)",
        "input": "640x480 float tensor, resized by the model to 800x1067",
        "seconds_per_image": {"mean": float(np.mean(times)), "p50": float(np.median(times)),
                              "min": float(np.min(times)), "max": float(np.max(times))},
        "img_per_s": len(times) / float(np.sum(times)),
        "detections_per_image": float(np.mean(detections)),
        "precision": args.precision,
        "threads": args.threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "machine": {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "platform": platform.platform()},
    }
    print(f"torchvision Mask R-CNN R50-FPN, {args.precision}: {report['seconds_per_image']['mean']:.3f} s/img "
          f"(p50 {report['seconds_per_image']['p50']:.3f}, {len(times)} images, "
          f"{report['detections_per_image']:.0f} detections/img)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
