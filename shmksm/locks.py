"""Process-shared locks: split page-table locks, frame locks, and the rest.

Every lock is a POSIX semaphore (``multiprocessing.Lock``), created by the host
before any worker starts and inherited by pickling at spawn time.

* **Page-table locks** (the kernel's split PTL): one lock covers a run of 512
  PTEs of one guest.  Runs are striped over ``NPTL`` locks, so two guests (or
  two distant runs of one guest) rarely share a lock and never need to.
* **Frame locks**: ``mapcount`` and the KSM flag of a frame change under the
  frame's lock (striped over ``NFRAME`` locks), the job of the kernel's atomic
  mapcount and page lock.
* **The allocator lock** guards the free and waiting lists.
* **mm locks**: one per guest slot, the kernel's mmap_lock: madvise, munmap and
  the scanner's reading of a guest's mergeable ranges.

Lock order, never broken: mm → page-table → frame → allocator → notify → stat,
and at most one lock of each class at a time.  Whoever holds a page-table lock may allocate.

When a process dies holding a lock, nobody else can release it for it: the
host's recovery (:func:`stop_the_world`) takes every lock in order and treats a
lock that stays held for ``STUCK_SECONDS`` after a death as the dead
process's, taking it over.  A live holder never keeps a lock that long: every
critical section is a bounded copy or compare of a few pages.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import util
from multiprocessing.context import BaseContext
from typing import Any, Final

NPTL: Final = 256
NFRAME: Final = 64
PTES_PER_LOCK_SHIFT: Final = 9  # 512 PTEs per page-table lock, as a PMD's worth
STUCK_SECONDS: Final = 0.5


class LockTable:
    """Every lock of one machine.  Pickles (at spawn time) with its semaphores."""

    def __init__(self, ctx: BaseContext, nguests: int, nshadows: int) -> None:
        self.ptl: list[Any] = [ctx.Lock() for _ in range(NPTL)]
        self.frame: list[Any] = [ctx.Lock() for _ in range(NFRAME)]
        self.alloc: Any = ctx.Lock()
        self.notify: Any = ctx.Lock()
        self.stat: Any = ctx.Lock()
        self.mm: list[Any] = [ctx.Lock() for _ in range(nguests)]
        # Doorbells: the broker and each shadow sleep on one when idle.
        self.broker_bell: Any = ctx.Semaphore(0)
        self.shadow_bells: list[Any] = [ctx.Semaphore(0) for _ in range(nshadows)]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def in_order(self) -> list[Any]:
        """Every lock, in the global lock order."""
        return [*self.mm, *self.ptl, *self.frame, self.alloc, self.notify, self.stat]

    def unlink(self) -> None:
        """Remove the semaphores' names from /dev/shm now (the host, once no worker is left).

        multiprocessing unlinks a named semaphore only when its lock is
        garbage-collected, so a closed machine that is still referenced would
        keep hundreds of ``sem.mp-*`` entries.  Running each lock's finalizer
        now unlinks its name exactly once; the locks keep working here.
        """
        mine = {id(lock) for lock in [*self.in_order(), self.broker_bell, *self.shadow_bells]}
        for finalizer in list(util._finalizer_registry.values()):  # type: ignore[attr-defined]
            ref = getattr(finalizer, "_weakref", None)
            if ref is not None and id(ref()) in mine:
                finalizer()

    def ptl_index(self, guest_id: int, page: int) -> int:
        """The page-table lock index of one guest page."""
        return (guest_id * 97 + (page >> PTES_PER_LOCK_SHIFT)) % NPTL


@contextmanager
def stop_the_world(locks: LockTable, stuck_seconds: float = STUCK_SECONDS) -> Iterator[int]:
    """Hold every lock of the machine; yield how many were taken over.

    For recovery after a death and for a consistent check() of a live
    machine.  A lock still held after ``stuck_seconds`` belongs to a process
    that died inside its critical section: it is taken over, and released
    with the others at the end.
    """
    held = []
    taken_over = 0
    try:
        for lock in locks.in_order():
            if not lock.acquire(timeout=stuck_seconds):
                taken_over += 1
            held.append(lock)
        yield taken_over
    finally:
        for lock in reversed(held):
            lock.release()


def default_context() -> BaseContext:
    """The start method shmksm uses for every worker: forkserver where available."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
