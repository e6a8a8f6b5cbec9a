"""Child processes that end with the process that started them, however it ends (SIGKILL included): the server's
children (:mod:`maskrcnn_serving.server.process`) and the local index database
(:mod:`maskrcnn_serving.search.database`)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when this process ends, however it ends
    (Linux's ``PR_SET_PDEATHSIG``, kept across ``exec``). If this process is already gone when the child sets it
    (between the fork and the call), the child exits at once, since no signal would come. None (nothing to run)
    where there is no ``prctl``, i.e. not on Linux.

    The kernel sends the signal when the *thread* that started the child ends: start children from the main thread
    (``serve`` does). The function only calls ``prctl`` and ``getppid`` in the child, between ``fork`` and ``exec``.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, in the parent
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(sig)) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os._exit(1)

    return set_parent_death_signal
