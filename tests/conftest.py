"""Shared fixtures: a machine checked at teardown, and a guard against /dev/shm leaks.

Every test runs under :func:`no_shm_leak`: whatever a test creates in
/dev/shm — segments (``shmksm_*``) or the named POSIX semaphores behind
``multiprocessing.Lock`` (``sem.mp-*``) — must be gone when it ends.  Both
disappear asynchronously (the resource tracker unlinks a dead host's
segments; a semaphore is unlinked by a finalizer when its lock is collected),
so the guard polls with growing delays before it fails the test.

Helpers shared by the tests are in helpers.py.  Entries
of other processes that happen to run at the same time (someone else's
machine, another pytest worker) are told apart and ignored.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest

# merge_pages, pfn_of, pte_of and wait_until stay importable from conftest, as before helpers.py.
from helpers import SHM_DIR, held_by_others, merge_pages, pfn_of, pte_of, shm_entries, wait_until  # noqa: F401

import shmksm

LEAK_WAIT_SECONDS = 3.0


@pytest.fixture(autouse=True)
def no_shm_leak() -> Iterator[None]:
    """Fail the test if it leaves new shmksm segments or multiprocessing semaphores in /dev/shm."""
    before = shm_entries()
    yield
    deadline = time.monotonic() + LEAK_WAIT_SECONDS
    delay = 0.01
    while True:
        gc.collect()  # a machine nobody closed drops its semaphores here (but not its segments)
        leaked = shm_entries() - before
        if leaked:
            leaked -= held_by_others(leaked)
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    if leaked:
        shown = ", ".join(sorted(leaked)[:5])
        pytest.fail(f"{len(leaked)} entries left in {SHM_DIR}: {shown}{' ...' if len(leaked) > 5 else ''}",
                    pytrace=False)


@pytest.fixture
def machine() -> Iterator[shmksm.Machine]:
    """A machine of 1024 frames without ksmd; its accounting is checked before it closes."""
    m = shmksm.Machine(frames=1024, ksmd=False)
    try:
        yield m
        m.check()
    finally:
        m.close()
