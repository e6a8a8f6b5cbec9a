"""Real traffic: a seeded stream of photo-like JPEGs of the sizes and orientations people send.

A server's images are not one size repeated. Each resized size that a backend has not seen before may cost it
something once (a trace, an XLA compilation, new oneDNN kernels), and sizes differ in decode and mask-paste cost.
:data:`PHOTO_SIZES` lists common photo sizes, landscape and portrait: camera and phone photos (4:3, 3:2), video
frames and screens (16:9, 9:16, 16:10), social-media crops (1:1, 4:5), a phone screenshot (9:19.5) and a 2:1
panorama, from 640x480 to 12 megapixels. :func:`mixed_stream` draws from it in a seeded order: each pass over the
list is a new permutation, so the first ``len(PHOTO_SIZES)`` images hold every size once, and the same seed always
gives the same stream (sizes and pixels).

:func:`run_stream` sends the stream one image per request through a :class:`~.workload.Workload`, twice: the first
pass is what a warmed-up server meets (every size new to it), the second repeats the same requests (every size
seen). Their difference is the cost of new sizes: ``new_size_share`` = 1 - second / first, the share of the first
pass's time that new sizes cost (compilation and retracing when the backend has them; near 0, within the noise of
the machine, when it has none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from maskrcnn_serving.bench.images import encode_jpeg, format_size, synthetic_image
from maskrcnn_serving.bench.stats import summarize
from maskrcnn_serving.bench.workload import Workload
from maskrcnn_serving.pipeline import Stage

# (width, height): landscape and portrait, COCO-like to 12 megapixels.
PHOTO_SIZES: tuple[tuple[int, int], ...] = (
    (640, 480), (480, 640),  # 4:3, COCO-like
    (1024, 768), (1600, 1200),  # 4:3
    (4032, 3024), (3024, 4032),  # 4:3 12 MP phone photo, both ways
    (1200, 800), (800, 1200), (3000, 2000),  # 3:2 camera
    (1280, 720), (1920, 1080), (1080, 1920),  # 16:9 / 9:16 video frames and phone screens
    (1440, 900),  # 16:10 screen
    (1080, 1080), (1080, 1350),  # 1:1 and 4:5 social-media crops
    (1170, 2532),  # 9:19.5 phone screenshot
    (2000, 1000),  # 2:1 panorama
)


@dataclass(frozen=True)
class Photo:
    """One image of the stream: its size (width, height), its content seed and its JPEG bytes."""

    size: tuple[int, int]
    seed: int
    jpeg: bytes


def stream_sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    """The sizes of the first ``count`` images of stream ``seed``: consecutive seeded permutations of
    :data:`PHOTO_SIZES`."""
    rng = np.random.default_rng(seed)
    sizes: list[tuple[int, int]] = []
    while len(sizes) < count:
        sizes.extend(PHOTO_SIZES[i] for i in rng.permutation(len(PHOTO_SIZES)))
    return sizes[:count]


def mixed_stream(count: int, seed: int = 0) -> list[Photo]:
    """``count`` photo-like JPEGs (quality 90) of :func:`stream_sizes`, each with its own content."""
    return [Photo(size, seed * 100_003 + i, encode_jpeg(synthetic_image(size[0], size[1], seed * 100_003 + i)))
            for i, size in enumerate(stream_sizes(count, seed))]


def _pass(workload: Workload, photos: Sequence[Photo], progress: Callable[[str], None] | None) -> list[dict]:
    records = []
    for index, photo in enumerate(photos):
        call = workload.run([photo.jpeg])
        records.append({"size": format_size(photo.size), "seconds": call.seconds,
                        "model_seconds": call.stages.get(Stage.MODEL, 0.0), "detections": call.detections[0]})
        if progress is not None:
            progress(f"{index + 1}/{len(photos)} {records[-1]['size']}: {call.seconds:.2f} s")
    return records


def _summary(records: Sequence[dict]) -> dict:
    return {
        "images": len(records),
        "wall_s": float(sum(r["seconds"] for r in records)),
        "s_per_image": summarize([r["seconds"] for r in records]),
        "model_s_per_image": summarize([r["model_seconds"] for r in records]),
    }


def run_stream(workload: Workload, photos: Sequence[Photo], progress: Callable[[str], None] | None = None) -> dict:
    """Send ``photos`` one per request, then the same requests again; per-image seconds of both passes (see the
    module docstring). ``p99_over_p50`` is the first pass's tail against its median."""
    first = _pass(workload, photos, progress)
    repeat = _pass(workload, photos, progress)
    cold, warm = _summary(first), _summary(repeat)
    return {
        "first_pass": cold,
        "repeat_pass": warm,
        "new_size_share": max(0.0, 1.0 - warm["wall_s"] / cold["wall_s"]),
        "p99_over_p50": cold["s_per_image"]["p99"] / cold["s_per_image"]["p50"],
        "sizes": sorted({format_size(p.size) for p in photos}),
        "images": [{**a, "repeat_seconds": b["seconds"]} for a, b in zip(first, repeat, strict=True)],
    }

