"""Run in a child process by test_optimized_backend.py: the demo model with Winograd in every eligible layer,
warmed up, then images of sizes it has not seen, one and several per call. XLA's persistent compilation cache
(``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory``, set by the parent before TensorFlow starts) writes one file
per compilation, so the files before and after the requests count the compilations they caused. Prints JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from maskrcnn_serving.backends.base import PredictOptions
from maskrcnn_serving.backends.optimized import OptimizedBackend
from maskrcnn_serving.model_dir import load_model_dir
from maskrcnn_serving.modeling.tf2_network import MaskRCNN
from maskrcnn_serving.settings import Settings


def main(model_dir: str, cache_dir: str) -> None:
    compiled = lambda: len(list(Path(cache_dir).iterdir()))  # noqa: E731
    bundle = load_model_dir(Path(model_dir), environ={})
    network = MaskRCNN(bundle, winograd=True, winograd_min_channels=1, masked_padding=False)
    backend = OptimizedBackend(bundle, network, Settings(max_batch_size=3), "float32")
    backend.warm_up()
    after_warm_up = {"traces": backend.traces, "compilations": compiled()}
    rng = np.random.default_rng(0)
    options = PredictOptions(score_threshold=0.0, max_detections=7)
    sizes = [(400, 500), (500, 400), (333, 1000), (1000, 333), (300, 360), (20, 900), (250, 250), (480, 640)]
    buckets = []
    for height, width in sizes:  # one image per call, then three of that size in one call
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        prepared = backend.preprocess(image)
        buckets.append(prepared.batch_key)
        backend.forward([prepared], options)
        backend.forward([prepared] * 3, options)
    print(json.dumps({
        "after_warm_up": after_warm_up,
        "after_requests": {"traces": backend.traces, "compilations": compiled()},
        "buckets": [list(b) for b in buckets],
        "canvases": [list(c) for c in backend.canvases],
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
