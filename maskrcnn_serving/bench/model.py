"""``bench model``: in-process throughput, latency, memory and stage breakdown per image size and batch size.

Every call sends ``batch_size`` encoded JPEGs as one request through
:class:`~maskrcnn_serving.bench.workload.Workload` (the serving pipeline; the backend runs them in as few forward
calls as its batch size allows). Warm-up calls are run and discarded for every (size, batch) configuration. A
configuration stops after ``iterations`` timed calls or once its time budget is spent, whichever comes first (but
never before ``min_iterations``). The budget is ``max_seconds``, or less when the whole run would exceed
``max_total_seconds``: what is left of the total is shared evenly among the configurations still to run. So a
slow model on a busy machine gives fewer calls per configuration rather than a run that does not end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from maskrcnn_serving.bench.images import DEFAULT_SIZES, format_size, synthetic_jpegs
from maskrcnn_serving.bench.stats import peak_rss_mb, reset_peak_rss, summarize
from maskrcnn_serving.bench.workload import CallResult, Workload
from maskrcnn_serving.pipeline import STAGES, Stage
from maskrcnn_serving.settings import Limits

RESPONSE_LIMIT_BYTES = Limits().max_response_bytes  # the server's default (SageMaker's 6 MB)


@dataclass(frozen=True)
class ModelBenchSettings:
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES  # (width, height) of the encoded inputs
    batch_sizes: Sequence[int] = (1, 2)
    iterations: int = 20  # timed calls per configuration, at most
    min_iterations: int = 2
    max_seconds: float = 15.0  # timed seconds per configuration, at most (checked between calls)
    max_total_seconds: float = 180.0  # for all configurations together, warm-up included (see the module doc)
    warmup: int = 1  # discarded calls per configuration
    distinct_images: int = 4  # different synthetic images per size, used in turn
    seed: int = 0


def summarize_calls(calls: Sequence[CallResult]) -> dict:
    """Throughput, latency percentiles (per call), seconds per image of each stage, and the check that the stages
    add up to the measured total (``unaccounted_s_per_image`` is the time between stages)."""
    images = sum(call.images for call in calls)
    wall = sum(call.seconds for call in calls)
    stage_totals: dict[str, float] = {}
    for call in calls:
        for name, seconds in call.stages.items():
            stage_totals[name] = stage_totals.get(name, 0.0) + seconds
    ordered = [name for name in STAGES if name in stage_totals] + sorted(set(stage_totals) - set(STAGES))
    stages = {name: stage_totals[name] / images for name in ordered}
    total = wall / images
    staged = sum(stages.values())
    detections = [n for call in calls for n in call.detections]
    response_bytes = [len(call.body) / call.images for call in calls]
    return {
        "calls": len(calls),
        "images": images,
        "img_per_s": images / wall,
        "latency_s": summarize([call.seconds for call in calls]),
        "stages_s_per_image": stages,
        "total_s_per_image": total,
        "unaccounted_s_per_image": total - staged,
        "stage_sum_relative_error": abs(total - staged) / total,
        "non_model_share": (1.0 - stages[Stage.MODEL] / total) if Stage.MODEL in stages else None,
        "detections_per_image": {"mean": float(np.mean(detections)), "min": int(min(detections))},
        "response_bytes_per_image": float(np.mean(response_bytes)),
        "over_response_limit": bool(max(len(call.body) for call in calls) > RESPONSE_LIMIT_BYTES),
    }


def run_configuration(
    workload: Workload,
    size: tuple[int, int],
    batch_size: int,
    settings: ModelBenchSettings,
    budget_seconds: float | None = None,
) -> dict:
    """Warm up, then time calls of ``batch_size`` images of ``size`` until the count or the time bound is hit
    (``budget_seconds``, default ``settings.max_seconds``, counts from the start of the warm-up)."""
    budget = settings.max_seconds if budget_seconds is None else budget_seconds
    started = time.perf_counter()
    payloads = synthetic_jpegs(size, max(batch_size, settings.distinct_images), settings.seed)

    def batch(index: int) -> list[bytes]:
        return [payloads[(index * batch_size + j) % len(payloads)] for j in range(batch_size)]

    reset_peak_rss()
    for i in range(settings.warmup):
        workload.run(batch(i))
    calls: list[CallResult] = []
    while len(calls) < settings.iterations and (
        len(calls) < settings.min_iterations or time.perf_counter() - started < budget
    ):
        calls.append(workload.run(batch(settings.warmup + len(calls))))
    result = {"size": format_size(size), "batch_size": batch_size}
    result.update(summarize_calls(calls))
    result["request_bytes_per_image"] = float(np.mean([len(p) for p in payloads]))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def bench_model(
    workload: Workload,
    settings: ModelBenchSettings,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Run every (size, batch size) configuration; the report's top-level figures are those of the first one."""
    results = []
    configurations = [(size, batch_size) for size in settings.sizes for batch_size in settings.batch_sizes]
    started = time.perf_counter()
    for index, (size, batch_size) in enumerate(configurations):
        left = settings.max_total_seconds - (time.perf_counter() - started)
        budget = min(settings.max_seconds, max(0.0, left) / (len(configurations) - index))
        result = run_configuration(workload, size, batch_size, settings, budget)
        results.append(result)
        if progress is not None:
            progress(result)
    primary = results[0]
    report = {
        "primary": {"size": primary["size"], "batch_size": primary["batch_size"]},
        "img_per_s": primary["img_per_s"],
        "latency_s": primary["latency_s"],
        "stages_s_per_image": primary["stages_s_per_image"],
        "total_s_per_image": primary["total_s_per_image"],
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "results": results,
    }
    report["settings"]["sizes"] = [format_size(s) for s in settings.sizes]
    return report
