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
page-table, frame, allocator, notify or stat lock that stays held for
``STUCK_SECONDS`` after a death as the dead process's, taking it over: those
critical sections are a bounded copy or compare of a few pages.  An mm lock
can be held for long (an madvise of a large range), so its holder's pid is
recorded (:class:`shmksm.pagetable.MmLock`) and it is taken over only from
a dead holder.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import util
from multiprocessing.context import BaseContext
from typing import Any, Final

NPTL: Final = 256
NFRAME: Final = 64
PTES_PER_LOCK_SHIFT: Final = 9  # 512 PTEs per page-table lock, as a PMD's worth
STUCK_SECONDS: Final = 2.0


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


class LocksBusy(Exception):
    """stop_the_world gave up waiting for a lock (``busy_timeout``); nothing is held."""


@contextmanager
def stop_the_world(locks: LockTable, takeover: bool = False, mm_owner: Callable[[int], int] | None = None,
                   busy_timeout: float | None = None) -> Iterator[int]:
    """Hold every lock of the machine; yield how many were taken over.

    For a consistent check() of a live machine (``takeover`` False: wait for
    every holder) and for recovery after a death (``takeover`` True).  Then a
    page-table, frame, allocator, notify or stat lock still held after
    ``STUCK_SECONDS`` belongs to a process that died inside its critical
    section, which is short and never sleeps; an mm lock is taken over only
    if ``mm_owner(index)`` names no living process.  Taken-over locks are
    released with the others at the end.  Without ``takeover``, a lock not
    had within ``busy_timeout`` raises LocksBusy (the caller may have to let
    a recovery run first).
    """
    held = []
    taken_over = 0
    nmm = len(locks.mm)
    try:
        for i, lock in enumerate(locks.in_order()):
            if not takeover:
                if not lock.acquire(timeout=busy_timeout):
                    raise LocksBusy
            elif not lock.acquire(timeout=STUCK_SECONDS):
                while i < nmm and mm_owner is not None and _alive(mm_owner(i)):
                    if lock.acquire(timeout=STUCK_SECONDS):
                        break
                else:
                    taken_over += 1
            held.append(lock)
        yield taken_over
    finally:
        for lock in reversed(held):
            lock.release()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def default_context() -> BaseContext:
    """The start method shmksm uses for every worker: forkserver where available."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
