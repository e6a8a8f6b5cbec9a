"""Seconds per image of the tensorpack backend at the seed's benchmark setting.

640x480 input resized to 800x1067 (PREPROC.TEST_SHORT_EDGE_SIZE=800, PREPROC.MAX_SIZE=1333), score threshold 0 and
100 detections per image, accurate mask paste of all 100 masks included. Usage:

    python benchmarks/tensorpack_speed.py MODEL_DIR [--images N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from maskrcnn_serving.backends.base import PredictOptions, load_backend
from maskrcnn_serving.postprocess import full_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "images")
    args = parser.parse_args()
    environ = {"CONFIG__PREPROC__TEST_SHORT_EDGE_SIZE": "800", "CONFIG__PREPROC__MAX_SIZE": "1333"}
    backend = load_backend("tensorpack", args.model_dir, environ=environ)
    sources = sorted(args.source.glob("*.jpg"))
    images = [cv2.resize(cv2.imread(str(sources[i % len(sources)])), (640, 480)) for i in range(args.images)]
    options = PredictOptions(score_threshold=0.0, max_detections=100)
    full_masks(backend.predict(images[:1], options)[0])  # warm-up: graph optimization happens on the first run
    times, counts = [], []
    for image in images:
        start = time.perf_counter()
        dets = backend.predict([image], options)[0]
        full_masks(dets)
        times.append(time.perf_counter() - start)
        counts.append(len(dets))
    print(json.dumps({"s_per_image_mean": round(float(np.mean(times)), 3), "s_per_image_min": round(min(times), 3),
                      "detections": counts, "input": "640x480 -> 800x1067"}))


if __name__ == "__main__":
    main()
