"""The dynamic batcher: batches concurrent submissions, keeps options apart, propagates errors, bounded waits."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from maskrcnn_serving.backends.base import PredictOptions
from maskrcnn_serving.batching import BatcherClosedError, DynamicBatcher
from maskrcnn_serving.structures import Detections


class RecordingPredict:
    """A deterministic stand-in model: one detection whose score encodes the image's value and the options.
    Records every call's batch size; optionally sleeps to simulate graph time."""

    def __init__(self, seconds: float = 0.0, fail_on: int | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.calls: list[tuple[int, PredictOptions]] = []
        self.lock = threading.Lock()

    def __call__(self, images, options):
        with self.lock:
            self.calls.append((len(images), options))
        time.sleep(self.seconds)
        out = []
        for image in images:
            value = int(image[0, 0, 0])
            if value == self.fail_on:
                raise ValueError(f"bad image {value}")
            out.append(
                Detections(
                    boxes=np.zeros((1, 4), np.float32),
                    scores=np.asarray([value + (options.score_threshold or 0.0)], np.float32),
                    labels=np.ones(1, np.int64),
                    class_names=("BG", "thing"),
                    image_hw=image.shape[:2],
                )
            )
        return out


def _image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


def _submit_concurrently(batcher, values, options=None):
    results: dict[int, Detections] = {}

    def worker(v):
        results[v] = batcher.submit(_image(v), options)

    threads = [threading.Thread(target=worker, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_requests_share_batches_and_get_their_own_results():
    predict = RecordingPredict(seconds=0.05)
    with DynamicBatcher(predict, max_batch_size=4, max_delay=0.2) as batcher:
        results = _submit_concurrently(batcher, range(8))
    assert {v: float(d.scores[0]) for v, d in results.items()} == {v: float(v) for v in range(8)}
    sizes = [n for n, _ in predict.calls]
    assert sum(sizes) == 8 and max(sizes) <= 4
    assert len(sizes) < 8, f"no batching happened: {sizes}"
    assert batcher.stats.images == 8 and batcher.stats.largest_batch == max(sizes)


def test_different_options_never_share_a_call():
    predict = RecordingPredict()
    with DynamicBatcher(predict, max_batch_size=8, max_delay=0.1) as batcher:
        low, high = PredictOptions(score_threshold=0.0), PredictOptions(score_threshold=100.0)
        threads = [
            threading.Thread(target=lambda: batcher.submit_many([_image(1), _image(2)], low)),
            threading.Thread(target=lambda: batcher.submit_many([_image(3)], high)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    for _size, options in predict.calls:
        assert options in (PredictOptions(score_threshold=0.0), PredictOptions(score_threshold=100.0))
    assert sum(n for n, o in predict.calls if o.score_threshold == 0.0) == 2
    assert sum(n for n, o in predict.calls if o.score_threshold == 100.0) == 1


def test_submit_many_keeps_order():
    with DynamicBatcher(RecordingPredict(), max_batch_size=3, max_delay=0.0) as batcher:
        dets = batcher.submit_many([_image(v) for v in (5, 1, 9, 7, 3)])
    assert [float(d.scores[0]) for d in dets] == [5.0, 1.0, 9.0, 7.0, 3.0]


def test_lone_request_waits_at_most_max_delay():
    with DynamicBatcher(RecordingPredict(), max_batch_size=8, max_delay=0.05) as batcher:
        start = time.monotonic()
        batcher.submit(_image(1))
        assert time.monotonic() - start < 1.0


def test_a_failing_batch_fails_its_requests_and_the_batcher_keeps_serving():
    predict = RecordingPredict(fail_on=13)
    with DynamicBatcher(predict, max_batch_size=4, max_delay=0.0) as batcher:
        with pytest.raises(ValueError, match="bad image 13"):
            batcher.submit(_image(13))
        assert float(batcher.submit(_image(2)).scores[0]) == 2.0


def test_timeout_and_close():
    batcher = DynamicBatcher(RecordingPredict(seconds=0.5), max_batch_size=1, max_delay=0.0)
    with pytest.raises(TimeoutError):
        batcher.submit(_image(1), timeout=0.05)
    batcher.close(timeout=5)
    with pytest.raises(BatcherClosedError):
        batcher.submit(_image(1))


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        DynamicBatcher(RecordingPredict(), max_batch_size=0)
    with pytest.raises(ValueError):
        DynamicBatcher(RecordingPredict(), max_delay=-1)


def test_for_backend_uses_the_backends_batch_size_and_the_delay_setting():
    class Backend:
        max_batch_size = 3
        predict = RecordingPredict()

    batcher = DynamicBatcher.for_backend(Backend(), environ={"MASKRCNN_MAX_BATCH_DELAY_MS": "25"})
    try:
        assert (batcher.max_batch_size, batcher.max_delay) == (3, 0.025)
        assert [float(d.scores[0]) for d in batcher.predict([_image(4), _image(6)])] == [4.0, 6.0]
    finally:
        batcher.close()
