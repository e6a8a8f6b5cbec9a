"""A request's deadline on the real monotonic clock: how much time is left, when it has passed, and the 504 that
``check`` raises once it has (saying what the request was still doing)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from maskrcnn_serving.deadline import NO_DEADLINE, Deadline
from maskrcnn_serving.errors import DeadlineExceeded

SECONDS = 0.05  # long enough to check before it passes on a loaded machine, short enough to wait for


def test_no_deadline_never_passes():
    for deadline in (NO_DEADLINE, Deadline.after(None)):
        assert deadline.remaining() is None and not deadline.expired
        deadline.check("decoding its images")  # never raises
    assert Deadline.after(None) == NO_DEADLINE


def test_a_deadline_counts_down_on_the_monotonic_clock():
    before = time.monotonic()
    deadline = Deadline.after(SECONDS)
    after = time.monotonic()
    assert before + SECONDS <= deadline.expires_at <= after + SECONDS
    first = deadline.remaining()
    assert 0 < first <= SECONDS and not deadline.expired
    deadline.check("waiting for the model")  # not passed yet: nothing raised
    time.sleep(0.01)
    second = deadline.remaining()
    assert second <= first - 0.01  # the clock went on by at least the sleep


def test_check_raises_a_504_saying_what_was_going_on_once_it_has_passed():
    deadline = Deadline.after(SECONDS)
    time.sleep(SECONDS + 0.02)
    assert deadline.expired and deadline.remaining() < 0
    with pytest.raises(DeadlineExceeded) as info:
        deadline.check("it was still encoding the masks")
    assert (info.value.status, info.value.code) == (504, "deadline_exceeded")
    assert "it was still encoding the masks" in info.value.message
    assert "MODEL_SERVER_REQUEST_DEADLINE" in info.value.message  # says which setting gives requests more time


@pytest.mark.parametrize("seconds", [0.0, -1.0])
def test_a_deadline_of_zero_or_less_has_passed_at_once(seconds):
    deadline = Deadline.after(seconds)
    assert deadline.expired and deadline.remaining() <= 0
    with pytest.raises(DeadlineExceeded):
        deadline.check("before it started")


def test_a_deadline_cannot_be_moved():
    """One value shared by every stage and thread of a request: nothing can extend it on the way."""
    deadline = Deadline.after(SECONDS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        deadline.expires_at = None
