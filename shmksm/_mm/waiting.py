"""Waiting for another process: one polling loop, with growing sleeps and a bound.

Every wait of one process for another's progress (a shadow's acknowledgement,
ksmd's full scans, the broker draining its ring) is a look at a shared word.
Such a wait must end: when the other process died (``check`` raises), and
after ``timeout`` seconds in any case, so that a stopped or wedged process
gives its waiter a clear error instead of a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def _nothing() -> None:
    return None


def poll_until(done: Callable[[], bool], timeout: float, timed_out: Callable[[], BaseException], *,
               check: Callable[[], None] = _nothing, first: float = 0.0001, most: float = 0.01) -> None:
    """Return once ``done()`` is true, looking with sleeps that grow from ``first`` to ``most`` seconds.

    ``check`` runs before each sleep and may raise (the awaited process is
    gone); past ``timeout`` seconds, ``timed_out()`` is raised.  Takes no lock.
    """
    deadline = time.monotonic() + timeout
    delay = first
    while not done():
        check()
        if time.monotonic() > deadline:
            raise timed_out()
        time.sleep(delay)
        delay = min(delay * 2, most)
