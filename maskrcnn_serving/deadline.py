"""The deadline of one request, passed explicitly to every stage that may take long (decode, the model queue,
post-processing, encoding)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from maskrcnn_serving.errors import DeadlineExceeded


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock after which the request's work is abandoned (None: never)."""

    expires_at: float | None = None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        """A deadline ``seconds`` from now (None: no deadline)."""
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float | None:
        """Seconds left (may be negative), None without a deadline."""
        return None if self.expires_at is None else self.expires_at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and time.monotonic() >= self.expires_at

    def check(self, what: str) -> None:
        """Raise :class:`DeadlineExceeded` (saying what was still going on) once the deadline has passed."""
        if self.expired:
            raise exceeded(what)


NO_DEADLINE = Deadline()


def exceeded(what: str) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"The request did not finish within its deadline ({what}). Send a smaller image or fewer images per "
        "request, or raise MODEL_SERVER_TIMEOUT / MODEL_SERVER_REQUEST_DEADLINE."
    )
