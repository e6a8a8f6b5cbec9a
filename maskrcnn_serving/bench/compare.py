"""``bench compare``: two configurations measured in ONE run, interleaved, and their ratio.

These machines are shared and noisy: two figures taken minutes apart can differ by 30% for reasons unrelated to the
code. Interleaving (rounds in the order A B, B A, A B, ...) exposes both sides to the same load, so their ratio is
meaningful even when the absolute figures are not.

* :func:`compare_pipelines`: two serving pipelines (two backends, two precisions, two response encoders...) on the
  same encoded images.
* :func:`compare_rle`: two mask encoders on the same full-size masks, checking that their outputs are identical
  when both write the legacy row-major format (ours against the seed's ``groupby`` baseline).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from maskrcnn_serving.bench.images import format_size, synthetic_masks
from maskrcnn_serving.bench.model import summarize_calls
from maskrcnn_serving.bench.seed_rle import seed_binary_mask_to_rle
from maskrcnn_serving.bench.stats import summarize
from maskrcnn_serving.bench.workload import CallResult, Workload
from maskrcnn_serving.encoding import coco_rle_of_mask, legacy_rle
from maskrcnn_serving.structures import MaskRuns


def _rounds_order(index: int) -> tuple[int, int]:
    return (0, 1) if index % 2 == 0 else (1, 0)


def compare_pipelines(
    a: Workload,
    b: Workload,
    images: Sequence[bytes],
    description: str,
    batch_size: int = 1,
    rounds: int = 10,
    warmup: int = 2,
    max_seconds: float = 240.0,
    labels: tuple[str, str] = ("A", "B"),
    pass_length: int | None = None,
) -> dict:
    """Interleave calls of ``a`` and ``b`` on the same encoded ``images`` (round i takes the next ``batch_size`` of
    them, cycling; ``description`` names them in the report); stop after ``rounds`` rounds or ``max_seconds`` (at
    least 2 rounds, so both orders run). ``warmup`` discarded calls per side come first, on the first images.

    ``pass_length``: also report each complete pass of that many rounds on its own (``passes``), e.g. the first
    pass over a mixed stream, where every size is new to both sides, and the next, where none is."""
    if not images:
        raise ValueError("no images to compare on")

    def batch(index: int) -> list[bytes]:
        return [images[(index * batch_size + j) % len(images)] for j in range(batch_size)]

    sides = (a, b)
    for i in range(warmup):
        for side in sides:
            side.run(batch(i))
    calls: tuple[list[CallResult], list[CallResult]] = ([], [])
    started = time.perf_counter()
    done = 0
    while done < rounds and (done < 2 or time.perf_counter() - started < max_seconds):
        for which in _rounds_order(done):
            calls[which].append(sides[which].run(batch(done)))
        done += 1
    sa, sb = summarize_calls(calls[0]), summarize_calls(calls[1])
    report = {
        "images": description,
        "batch_size": batch_size,
        "rounds": done,
        "warmup_calls": warmup,
        "a_label": labels[0],
        "b_label": labels[1],
        "a": sa,
        "b": sb,
        "throughput_ratio_b_over_a": sb["img_per_s"] / sa["img_per_s"],
        "time_ratio_a_over_b": sa["total_s_per_image"] / sb["total_s_per_image"],
    }
    if pass_length:
        report["passes"] = [
            {"a_s": sum(c.seconds for c in calls[0][start:start + pass_length]),
             "b_s": sum(c.seconds for c in calls[1][start:start + pass_length])}
            for start in range(0, done - pass_length + 1, pass_length)
        ]
    return report


# Mask encoders compared by ``compare_rle``: full-size (H, W) uint8 mask -> segmentation record.
RLE_ENCODERS: dict[str, Callable[[np.ndarray], dict]] = {
    "legacy": lambda mask: legacy_rle(MaskRuns.from_patch(0, 0, mask, mask.shape)),
    "seed": seed_binary_mask_to_rle,
    "coco": lambda mask: coco_rle_of_mask(MaskRuns.from_patch(0, 0, mask, mask.shape)),
}
ROW_MAJOR = frozenset({"legacy", "seed"})


def compare_rle(
    a: str = "legacy",
    b: str = "seed",
    count: int = 100,
    size: tuple[int, int] = (640, 480),
    rounds: int = 5,
    max_seconds: float = 120.0,
    seed: int = 0,
) -> dict:
    """Time encoders ``a`` and ``b`` on the same ``count`` full-size masks of ``size`` (width, height), interleaved;
    ``speedup_a_over_b`` is b's time over a's (median over rounds)."""
    for name in (a, b):
        if name not in RLE_ENCODERS:
            raise ValueError(f"unknown RLE encoder {name!r}; choose one of {', '.join(RLE_ENCODERS)}")
    masks = synthetic_masks(count, size[1], size[0], seed)
    encoders = (RLE_ENCODERS[a], RLE_ENCODERS[b])
    outputs: list[list[dict] | None] = [None, None]
    seconds: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    done = 0
    while done < rounds and (done < 2 or time.perf_counter() - started < max_seconds):
        for which in _rounds_order(done):
            start = time.perf_counter()
            encoded = [encoders[which](mask) for mask in masks]
            seconds[which].append(time.perf_counter() - start)
            outputs[which] = encoded
        done += 1
    median_a, median_b = float(np.median(seconds[0])), float(np.median(seconds[1]))
    identical = outputs[0] == outputs[1] if {a, b} <= ROW_MAJOR else None
    return {
        "masks": count,
        "size": format_size(size),
        "foreground_fraction": float(masks.mean()),
        "rounds": done,
        "a": {"encoder": a, "s_per_round": summarize(seconds[0]), "s_per_mask": median_a / count},
        "b": {"encoder": b, "s_per_round": summarize(seconds[1]), "s_per_mask": median_b / count},
        "speedup_a_over_b": median_b / median_a,
        "identical": identical,
    }
