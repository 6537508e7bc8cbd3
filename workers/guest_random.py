"""A seeded random read/write workload for one guest, checked against a private copy.

``run(view, seed, seconds)`` writes and reads its own address space at random
for ``seconds`` and keeps, in a private numpy array, every byte it wrote.  Most
writes scatter a few fixed page patterns (the same in every guest, see
:func:`pattern`) over a batch of random whole pages (``write_pages``), so that
pages with identical content exist within and across guests and someone —
ksmd, or a test merging by hand — can merge them while the workload runs.
Writes of random bytes, a few bytes or many pages long and some across page
boundaries, break the duplicates again.  Every read (``read_array``), and a
final read of the whole address space, is compared with the private copy.

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
BATCH: Final = 32  # pages per write_pages, at most
RUN_PAGES: Final = 24  # pages per multi-page write of random bytes, at most


@cache
def pattern(k: int) -> bytes:
    """Page pattern ``k``: 4096 pseudo-random bytes, the same in every process."""
    return np.random.default_rng(1_000_003 + k).integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()


@dataclass(frozen=True)
class Outcome:
    """What one run of the workload did."""

    mismatches: int  # bytes read back different from what was written
    bytes_written: int  # every one of them verified by the final read of the whole address space
    seconds: float  # wall time, the final read included


def step(view: GuestView, rng: np.random.Generator, model: npt.NDArray[np.uint8],
         patterns: npt.NDArray[np.uint8]) -> tuple[int, int, int]:
    """One operation of the workload, kept in ``model``; return (bytes read back, of them wrong, bytes written)."""
    choice = rng.random()
    if choice < 0.5:
        # Whole pages from the pattern set, scattered: the source of duplicates.
        where = rng.choice(view.pages, min(view.pages, int(rng.integers(1, BATCH + 1))), replace=False)
        data = patterns[rng.integers(len(patterns), size=len(where))]
        view.write_pages(where, data)
        model.reshape(-1, PAGE_SIZE)[where] = data
        return 0, 0, data.nbytes
    if choice < 0.75:
        # Random bytes anywhere: a few, or many pages' worth, often across page boundaries.
        n = int(rng.integers(1, 300)) if choice < 0.65 else int(rng.integers(1, RUN_PAGES * PAGE_SIZE))
        n = min(n, view.size)
        addr = int(rng.integers(0, view.size - n + 1))
        data = rng.integers(0, 256, n, dtype=np.uint8)
        view.write(addr, data)
        model[addr:addr + n] = data
        return 0, 0, n
    n = int(rng.integers(1, 3 * PAGE_SIZE))
    addr = int(rng.integers(0, view.size - n + 1))
    return n, int(np.count_nonzero(view.read_array(addr, n, np.uint8) != model[addr:addr + n])), 0


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
    patterns = np.stack([np.frombuffer(pattern(k), np.uint8) for k in range(npatterns)])
    mismatches = written = 0
    deadline = t0 + seconds
    for op in range(max_ops):
        if op % 64 == 0 and time.monotonic() > deadline:
            break
        _, bad, wrote = step(view, rng, model, patterns)
        mismatches += bad
        written += wrote
    mismatches += int(np.count_nonzero(view.read_array(0, view.size, np.uint8) != model))
    return Outcome(mismatches, written, time.monotonic() - t0)
