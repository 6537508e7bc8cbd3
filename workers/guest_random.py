"""A seeded random read/write workload for one guest, checked against a private copy.

``run(view, seed, seconds)`` writes and reads its own address space at random
for ``seconds`` and keeps, in a private numpy array, every byte it wrote.  Most
writes put one of a few fixed page patterns (the same in every guest, see
:func:`pattern`) on a whole page, so that pages with identical content exist
within and across guests and someone — ksmd, or a test merging by hand — can
merge them while the workload runs.  Partial writes, some across a page
boundary, break the duplicates again.  Every read, and a final read of the
whole address space, is compared with the private copy.

The result is the number of bytes that differed: 0 unless a write was lost,
a read saw another page's content, or a merge or copy-on-write went wrong.
:func:`run_counted` also says how many bytes were written, and in how long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache
from typing import Final

import numpy as np
import numpy.typing as npt

from shmksm import PAGE_SIZE, GuestView

NPATTERNS: Final = 4


@cache
def pattern(k: int) -> bytes:
    """Page pattern ``k``: 4096 pseudo-random bytes, the same in every process."""
    return np.random.default_rng(1_000_003 + k).integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()


def _mismatches(got: bytes, want: npt.NDArray[np.uint8]) -> int:
    return int(np.count_nonzero(np.frombuffer(got, np.uint8) != want))


@dataclass(frozen=True)
class Outcome:
    """What one run of the workload did."""

    mismatches: int  # bytes read back different from what was written
    bytes_written: int  # every one of them verified by the final read of the whole address space
    seconds: float  # wall time, the final read included


def run(view: GuestView, seed: int, seconds: float = 2.0, max_ops: int = 1_000_000,
        npatterns: int = NPATTERNS) -> int:
    """Run the workload on ``view`` for ``seconds`` (or ``max_ops``); return the mismatched bytes."""
    return run_counted(view, seed, seconds, max_ops, npatterns).mismatches


def run_counted(view: GuestView, seed: int, seconds: float = 2.0, max_ops: int = 1_000_000,
                npatterns: int = NPATTERNS) -> Outcome:
    """:func:`run`, and how many bytes it wrote in how long."""
    t0 = time.monotonic()
    rng = np.random.default_rng(seed)
    model = np.zeros(view.size, np.uint8)
    pages = view.pages
    patterns = [np.frombuffer(pattern(k), np.uint8) for k in range(npatterns)]
    mismatches = written = 0
    deadline = t0 + seconds
    for op in range(max_ops):
        if op % 64 == 0 and time.monotonic() > deadline:
            break
        choice = rng.random()
        if choice < 0.55:
            # A whole page from the pattern set: the source of duplicates.
            page = int(rng.integers(pages))
            data = patterns[int(rng.integers(npatterns))]
            view.write(page * PAGE_SIZE, data)
            model[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = data
            written += PAGE_SIZE
        elif choice < 0.75:
            # A few random bytes anywhere, sometimes across a page boundary.
            n = int(rng.integers(1, 300))
            addr = int(rng.integers(0, view.size - n + 1))
            data = rng.integers(0, 256, n, dtype=np.uint8)
            view.write(addr, data)
            model[addr:addr + n] = data
            written += n
        else:
            n = int(rng.integers(1, 3 * PAGE_SIZE))
            addr = int(rng.integers(0, view.size - n + 1))
            mismatches += _mismatches(view.read(addr, n), model[addr:addr + n])
    mismatches += _mismatches(view.read(0, view.size), model)
    return Outcome(mismatches, written, time.monotonic() - t0)
