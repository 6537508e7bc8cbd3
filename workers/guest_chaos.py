"""Guest entry point for the fault-injection campaign: write and verify shared content until told to stop.

Like :mod:`shmksm.workers.guest_random`, with no end of its own: whole pages
from a few patterns shared by every guest (so ksmd merges them and the
writers break copy-on-write), small random writes, and reads verified
against a private copy.  It counts, live, in its row of a shared int64 array
(so that a guest SIGKILLed at any moment has told what it saw): operations
(a heartbeat), bytes verified, bytes that differed.  It stops when word 0 of
the array is set, after verifying its whole address space.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
from shmksm.workers.guest_random import pattern, step

from shmksm import MADV_MERGEABLE, GuestView

STOP: Final = 0  # word 0 of the array: the host asks every guest to stop
ROW: Final = 4  # words per guest row, from word ROW * (index + 1)
OPS: Final = 0
VERIFIED: Final = 1
LOST: Final = 2


def chaos_guest(view: GuestView, index: int, seed: int, shared: Any, npatterns: int = 4) -> int:
    """Write and verify until ``shared[STOP]``; return the bytes that differed."""
    words = np.frombuffer(shared, np.int64)
    row = words[ROW * (index + 1):ROW * (index + 2)]
    rng = np.random.default_rng(seed)
    view.madvise(0, view.size, MADV_MERGEABLE)
    model = np.zeros(view.size, np.uint8)
    patterns = np.stack([np.frombuffer(pattern(k), np.uint8) for k in range(npatterns)])
    lost = 0
    while not words[STOP]:
        read, bad, _ = step(view, rng, model, patterns)
        row[VERIFIED] += read
        row[LOST] += bad
        lost += bad
        row[OPS] += 1
    bad = int(np.count_nonzero(view.read_array(0, view.size, np.uint8) != model))
    row[VERIFIED] += view.size
    row[LOST] += bad
    return lost + bad
