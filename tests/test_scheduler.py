"""The scheduler, the one place batches form: batches concurrent submissions, keeps options and size buckets apart,
propagates errors, bounded waits and deadlines; and on the real model."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
from assertions import assert_same_detections

from maskrcnn_serving.backends.base import PredictOptions, PreparedImage
from maskrcnn_serving.deadline import NO_DEADLINE, Deadline
from maskrcnn_serving.errors import DeadlineExceeded
from maskrcnn_serving.scheduler import Scheduler, SchedulerClosedError
from maskrcnn_serving.structures import Detections


class RecordingForward:
    """A deterministic stand-in model: one detection whose score encodes the image's value and the options.
    Records every call's batch size and options; optionally sleeps to simulate graph time."""

    def __init__(self, seconds: float = 0.0, fail_on: int | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.calls: list[tuple[int, PredictOptions]] = []
        self.keys: list[set] = []
        self.lock = threading.Lock()

    def __call__(self, images, options):
        with self.lock:
            self.calls.append((len(images), options))
            self.keys.append({image.batch_key for image in images})
        time.sleep(self.seconds)
        out = []
        for image in images:
            value = int(image.resized[0, 0, 0])
            if value == self.fail_on:
                raise ValueError(f"bad image {value}")
            out.append(
                Detections(
                    boxes=np.zeros((1, 4), np.float32),
                    scores=np.asarray([value + (options.score_threshold or 0.0)], np.float32),
                    labels=np.ones(1, np.int64),
                    class_names=("BG", "thing"),
                    image_hw=image.original_hw,
                )
            )
        return out


def _image(value: int, key=None) -> PreparedImage:
    return PreparedImage(np.full((4, 4, 3), value, np.uint8), 1.0, (4, 4), key)


def _run_one(scheduler, image, options=None, deadline=NO_DEADLINE):
    return scheduler.run([image], [options or PredictOptions()], deadline)[0].detections


def _submit_concurrently(scheduler, values, options=None):
    results: dict[int, Detections] = {}

    def worker(v):
        results[v] = _run_one(scheduler, _image(v), options)

    threads = [threading.Thread(target=worker, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_requests_share_batches_and_get_their_own_results():
    forward = RecordingForward(seconds=0.05)
    with Scheduler(forward, max_batch_size=4, max_delay=0.2) as scheduler:
        results = _submit_concurrently(scheduler, range(8))
    assert {v: float(d.scores[0]) for v, d in results.items()} == {v: float(v) for v in range(8)}
    sizes = [n for n, _ in forward.calls]
    assert sum(sizes) == 8 and max(sizes) <= 4
    assert len(sizes) < 8, f"no batching happened: {sizes}"
    assert scheduler.stats.images == 8 and scheduler.stats.largest_batch == max(sizes)


def test_different_options_never_share_a_call():
    forward = RecordingForward()
    with Scheduler(forward, max_batch_size=8, max_delay=0.1) as scheduler:
        low, high = PredictOptions(score_threshold=0.0), PredictOptions(score_threshold=100.0)
        threads = [
            threading.Thread(target=lambda: scheduler.run([_image(1), _image(2)], [low, low])),
            threading.Thread(target=lambda: scheduler.run([_image(3)], [high])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    for _size, options in forward.calls:
        assert options in (PredictOptions(score_threshold=0.0), PredictOptions(score_threshold=100.0))
    assert sum(n for n, o in forward.calls if o.score_threshold == 0.0) == 2
    assert sum(n for n, o in forward.calls if o.score_threshold == 100.0) == 1


def test_images_of_different_batch_keys_never_share_a_call_and_one_request_may_mix_options():
    forward = RecordingForward()
    low, high = PredictOptions(score_threshold=0.0), PredictOptions(score_threshold=100.0)
    with Scheduler(forward, max_batch_size=8) as scheduler:
        images = [_image(1, "a"), _image(2, "b"), _image(3, "a"), _image(4, "a")]
        results = scheduler.run(images, [low, low, low, high])
    assert [float(r.detections.scores[0]) for r in results] == [1.0, 2.0, 3.0, 104.0]
    assert all(len(keys) == 1 for keys in forward.keys)
    assert sorted(n for n, _ in forward.calls) == [1, 1, 2]  # (1, 3) together; 2 alone (key); 4 alone (options)
    assert results[0].batch_id == results[2].batch_id != results[1].batch_id


def test_run_keeps_order():
    with Scheduler(RecordingForward(), max_batch_size=3, max_delay=0.0) as scheduler:
        results = scheduler.run([_image(v) for v in (5, 1, 9, 7, 3)], [PredictOptions()] * 5)
    assert [float(r.detections.scores[0]) for r in results] == [5.0, 1.0, 9.0, 7.0, 3.0]
    assert max(r.batch_size for r in results) == 3 and all(r.batch_seconds >= 0 for r in results)


def test_a_lazy_source_is_taken_at_most_in_flight_images_at_a_time_and_batches_stay_full():
    """A request's images come from a generator (prepared on demand): never more than ``in_flight`` of them are
    taken and not yet through the model, yet every call is a full batch (the next batch waits while one runs)."""
    forward = RecordingForward(seconds=0.02)
    taken_not_done: list[int] = []

    def source():
        for value in range(12):
            taken_not_done.append(value + 1 - sum(n for n, _ in forward.calls))
            yield _image(value)

    with Scheduler(forward, max_batch_size=2) as scheduler:
        results = scheduler.run(source(), [PredictOptions()] * 12, in_flight=4)
    assert [float(r.detections.scores[0]) for r in results] == [float(v) for v in range(12)]
    assert max(taken_not_done) <= 4 and taken_not_done[:4] == [1, 2, 3, 4]
    assert [n for n, _ in forward.calls] == [2] * 6


def test_a_source_shorter_or_longer_than_its_options_is_an_error():
    with Scheduler(RecordingForward()) as scheduler:
        for images, count in (([_image(1)], 2), ([_image(1), _image(2)], 1)):
            with pytest.raises(ValueError):
                scheduler.run(iter(images), [PredictOptions()] * count)
        with pytest.raises(ValueError):
            scheduler.run([_image(1)], [PredictOptions()], in_flight=0)
        assert scheduler.run([], []) == []


def test_lone_request_waits_at_most_max_delay():
    with Scheduler(RecordingForward(), max_batch_size=8, max_delay=0.05) as scheduler:
        start = time.monotonic()
        _run_one(scheduler, _image(1))
        assert time.monotonic() - start < 1.0


def test_a_failing_batch_fails_its_requests_and_the_scheduler_keeps_serving():
    forward = RecordingForward(fail_on=13)
    with Scheduler(forward, max_batch_size=4, max_delay=0.0) as scheduler:
        with pytest.raises(ValueError, match="bad image 13"):
            _run_one(scheduler, _image(13))
        assert float(_run_one(scheduler, _image(2)).scores[0]) == 2.0


def test_deadline_and_close():
    scheduler = Scheduler(RecordingForward(seconds=0.5), max_batch_size=1, max_delay=0.0)
    with pytest.raises(DeadlineExceeded):
        _run_one(scheduler, _image(1), deadline=Deadline.after(0.05))
    scheduler.close(timeout=5)
    with pytest.raises(SchedulerClosedError):
        _run_one(scheduler, _image(1))


def test_images_queued_past_their_deadline_are_dropped_before_the_model_runs():
    """A request queued behind a slow one fails at its deadline, and its images never reach the model."""
    forward = RecordingForward(seconds=0.4)
    with Scheduler(forward, max_batch_size=1) as scheduler:
        slow = threading.Thread(target=lambda: _run_one(scheduler, _image(1)))
        slow.start()
        time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            scheduler.run([_image(2), _image(3)], [PredictOptions()] * 2, Deadline.after(0.1))
        assert time.monotonic() - start < 0.35  # answered at the deadline, not after the slow call
        slow.join(5)
        assert float(_run_one(scheduler, _image(4)).scores[0]) == 4.0
    values = [n for n, _ in forward.calls]
    assert len(values) == 2  # the slow image and image 4: images 2 and 3 were dropped


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        Scheduler(RecordingForward(), max_batch_size=0)
    with pytest.raises(ValueError):
        Scheduler(RecordingForward(), max_delay=-1)
    with Scheduler(RecordingForward()) as scheduler, pytest.raises(ValueError):
        scheduler.run([_image(1)], [])


def test_for_backend_uses_the_backends_batch_size_and_forward():
    class Backend:
        max_batch_size = 3
        forward = RecordingForward()

    scheduler = Scheduler.for_backend(Backend(), max_delay=0.025)
    try:
        assert (scheduler.max_batch_size, scheduler.max_delay) == (3, 0.025)
        results = scheduler.run([_image(4), _image(6)], [PredictOptions()] * 2)
        assert [float(r.detections.scores[0]) for r in results] == [4.0, 6.0]
    finally:
        scheduler.close()


def test_concurrent_requests_share_calls_on_the_real_model(optimized_backend, example_images):
    """Each client sends one image; the scheduler must merge them (it fails if every call runs one image)."""
    images = [cv2.resize(cv2.imread(str(p), cv2.IMREAD_COLOR), (320, 240)) for p in example_images]
    expected = optimized_backend.predict(images)
    results = [None] * len(images)
    calls = []

    def forward(batch, options):
        calls.append(len(batch))
        return optimized_backend.forward(batch, options)

    # Images of one size resize to one bucket, so nothing but the batch size keeps them apart.
    assert len({optimized_backend.preprocess(image).batch_key for image in images}) == 1
    with Scheduler(forward, max_batch_size=4, max_delay=0.5) as scheduler:

        def worker(i):
            results[i] = _run_one(scheduler, optimized_backend.preprocess(images[i]))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert scheduler.stats.largest_batch > 1 and len(calls) < len(images)
    for a, b in zip(expected, results, strict=True):
        assert_same_detections(a, b, box_atol=1e-3, min_mask_iou=0.999)
