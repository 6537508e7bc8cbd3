"""Process-shared locks that know their holder: split page-table locks, frame locks, and the rest.

Every lock of the machine (but the doorbells) is a *robust*, process-shared
POSIX mutex (``pthread_mutex_t`` with ``PTHREAD_MUTEX_ROBUST`` and
``PTHREAD_PROCESS_SHARED``), in one block of shared memory that the host
allocates and that workers inherit at spawn time.  An uncontended acquire or
release runs wholly in a small C extension (``shmksm._mm._robust``); waits,
timeouts and repairs call back into the Python here; without the extension
(no compiler at install time) the same calls go through ctypes, slower.

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

Death of a holder (the robust-mutex protocol)
---------------------------------------------
A locked mutex holds its holder's thread id in its futex word, in shared
memory.  When a process dies — SIGKILL included — the kernel walks the
process's robust list, marks every mutex it held OWNER_DIED and wakes one
waiter.  Whoever takes such a lock next gets ``EOWNERDEAD`` instead of 0: it
now holds the lock, runs the lock's repair (:attr:`RobustLock.on_owner_dead`:
the allocator lock rebuilds its lists from the frame flags; every lock counts
the death in its slot), marks the mutex consistent and goes on.  So:

* a lock is taken over only from a dead holder, never because it was held
  long: a live holder, even a stopped one, keeps its lock;
* a live process waiting for a dead one's lock is woken by the kernel and
  gets the lock: nobody waits on the dead;
* the windows of a death between "acquired" and "holder recorded" (or
  "holder cleared" and "released") do not exist: the kernel's robust list
  covers the whole of ``pthread_mutex_lock``/``unlock``.

What a dead holder left half-done beyond its lock's own data (a frame taken
from the pool and not yet mapped, a mapcount raised and not yet used) is
metadata that :func:`shmksm._mm.check.recover` rebuilds from the page tables,
the truth, under :func:`stop_the_world`.  Data races are impossible there
too: every PTE change happens under a page-table lock, which recovery holds.

Bounded waits
-------------
Workers wait for a lock without bound: a holder's critical section is short
and never waits for a process that waits for it (the lock order).  The host
never does: in the host, an acquire without a timeout waits at most
:attr:`LockTable.host_timeout` and then raises :class:`LockTimeout` naming the
lock and its holder (a stopped process holds a lock as long as it likes).
"""

from __future__ import annotations

import ctypes
import errno
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import util
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..errors import InternalError, LockTimeout

NPTL: Final = 256
NFRAME: Final = 64
PTES_PER_LOCK_SHIFT: Final = 9  # 512 PTEs per page-table lock, as a PMD's worth
# One lock slot: the pthread_mutex_t (40 bytes on x86-64 glibc), then an int64
# count of holders that died with the lock held; 64 bytes keep slots apart.
SLOT_BYTES: Final = 64
_DEATHS_OFFSET: Final = 48
_FUTEX_TID_MASK: Final = 0x3FFFFFFF
_CLOCK_MONOTONIC: Final = 1

_libc = ctypes.CDLL(None, use_errno=True)  # calls that may block: the GIL is released
_nogil = ctypes.PyDLL(None)  # calls that never block: no GIL round trip
_trylock = _nogil.pthread_mutex_trylock
_unlock = _nogil.pthread_mutex_unlock
_consistent = _nogil.pthread_mutex_consistent
_lock = _libc.pthread_mutex_lock
_clocklock = _libc.pthread_mutex_clocklock
# No argtypes on the hot two (the ctypes fallback's): a c_void_p passes as it is, without a
# conversion per call (a third of an uncontended acquire and release).
for _fn in (_consistent, _lock):
    _fn.argtypes = [ctypes.c_void_p]
    _fn.restype = ctypes.c_int


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_clocklock.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec)]
_clocklock.restype = ctypes.c_int


class Lock(Protocol):
    """What shmksm asks of a lock: ``multiprocessing.Lock``'s shape."""

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(self, *exc: object) -> None: ...


class CtypesMutex:
    """The C extension's ``Mutex`` in ctypes alone: the same methods, several times slower.

    What :class:`RobustLock` is built on where ``shmksm._mm._robust`` could
    not be built (no C compiler).  The uncontended acquire and release end
    here; everything else calls the subclass's ``_contended`` and
    ``_release_failed``, as the extension does.
    """

    __slots__ = ("_m",)

    def __init__(self, address: int) -> None:
        self._m = ctypes.c_void_p(address)

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; False if not had (``block`` False, or ``timeout`` passed).

        In the host, no timeout means the table's ``host_timeout``, and not
        having the lock by then raises LockTimeout.
        """
        rc = _trylock(self._m)
        return True if rc == 0 else self._contended(rc, block, timeout)

    def release(self) -> None:
        rc = _unlock(self._m)
        if rc:
            self._release_failed(rc)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _lock(self) -> int:
        """pthread_mutex_lock's result, waiting without the GIL."""
        return int(_lock(self._m))

    def _clocklock(self, deadline: float) -> int:
        """pthread_mutex_clocklock's result against a CLOCK_MONOTONIC ``deadline``, waiting without the GIL."""
        sec = int(deadline)
        return int(_clocklock(self._m, _CLOCK_MONOTONIC, _Timespec(sec, int((deadline - sec) * 1e9))))

    def _consistent(self) -> int:
        return int(_consistent(self._m))

    def _contended(self, rc: int, block: bool, timeout: float | None) -> bool:
        raise NotImplementedError

    def _release_failed(self, rc: int) -> None:
        raise NotImplementedError


try:  # the fast path in C, chosen once for the process
    from ._robust import Mutex as _Mutex
except ImportError:  # pragma: no cover - a machine that built no extension
    _Mutex = CtypesMutex  # type: ignore[assignment,misc]

if TYPE_CHECKING:  # the methods _Robust finds on the mutex it is mixed with
    _MutexAPI = _Mutex
else:
    _MutexAPI = object


class _Robust(_MutexAPI):
    """What a robust lock adds to its mutex: its name, its repair, the slow paths of acquire and release."""

    __slots__ = ()
    name: str
    table: LockTable
    address: int
    _deaths: ctypes.c_int64
    on_owner_dead: Callable[[], None] | None

    def __init__(self, table: LockTable, index: int, name: str) -> None:
        address = table.base + index * SLOT_BYTES
        super().__init__(address)
        self.name = name
        self.table = table
        self.address = address
        self._deaths = ctypes.c_int64.from_address(address + _DEATHS_OFFSET)
        # The repair to run when the lock is taken from a dead holder, lock held.
        self.on_owner_dead = None

    def __repr__(self) -> str:
        return f"<RobustLock {self.name} holder={self.holder()}>"

    def _contended(self, rc: int, block: bool, timeout: float | None) -> bool:
        """acquire() past a trylock that did not get the lock at once: wait, or repair a dead holder's."""
        if rc == errno.EBUSY:
            if not block:
                return False
            host_timeout = self.table.host_timeout
            if timeout is None and host_timeout is not None:
                rc = self._timed(host_timeout)
                if rc == errno.ETIMEDOUT:
                    raise LockTimeout(f"lock {self.name} not had in {host_timeout:g} s: {self.describe_holder()}")
            elif timeout is None:
                rc = self._lock()
            else:
                rc = self._timed(timeout)
                if rc == errno.ETIMEDOUT:
                    return False
        if rc:
            self._taken_with(rc)
        return True

    def _timed(self, timeout: float) -> int:
        return self._clocklock(time.clock_gettime(time.CLOCK_MONOTONIC) + max(timeout, 0.0))

    def _taken_with(self, rc: int) -> None:
        """The lock was had with ``rc`` != 0: a dead holder's (repair it), or an error."""
        if rc != errno.EOWNERDEAD:
            raise InternalError(f"lock {self.name}: pthread_mutex_lock failed: {os.strerror(rc)}")
        self._deaths.value += 1
        if self.on_owner_dead is not None:
            self.on_owner_dead()
        self._consistent()

    def _release_failed(self, rc: int) -> None:
        raise InternalError(f"lock {self.name} released by a thread that does not hold it: {os.strerror(rc)}")

    @property
    def owner_deaths(self) -> int:
        """How many holders died with this lock held (each one repaired)."""
        return int(self._deaths.value)

    def holder(self) -> int:
        """The thread id recorded as holder (a process's pid for its main thread), 0 if free."""
        return ctypes.c_int.from_address(self.address).value & _FUTEX_TID_MASK

    def describe_holder(self) -> str:
        tid = self.holder()
        if not tid:
            return "now free"
        return f"held by {process_state(tid)}"


_ROBUST_SLOTS: Final = ("_deaths", "address", "name", "on_owner_dead", "table")


class RobustLock(_Robust, _Mutex):
    """One robust, process-shared mutex of the lock table (see the module text).

    ``acquire``, ``release``, ``__enter__`` and ``__exit__`` are ``Mutex``'s:
    the uncontended path runs in C (in ctypes where the extension is not
    built), the rest in the methods here.
    """

    __slots__ = _ROBUST_SLOTS


class CtypesRobustLock(_Robust, CtypesMutex):
    """RobustLock on the ctypes fallback, whichever base this process chose: to compare the two."""

    __slots__ = _ROBUST_SLOTS


def process_state(tid: int) -> str:
    """'pid N (state)' for a thread id, from /proc: running, sleeping, stopped, dead."""
    try:
        with open(f"/proc/{tid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return f"thread {tid} (gone)"
    name = fields.get("Name", "?").strip()
    state = fields.get("State", "?").strip()
    pid = fields.get("Tgid", str(tid)).strip()
    return f"pid {pid} {name} ({state})"


class LockTable:
    """Every lock of one machine.  Pickles (at spawn time) with its shared memory and doorbells."""

    def __init__(self, ctx: BaseContext, nguests: int, nshadows: int) -> None:
        self.nguests = nguests
        self.nlocks = nguests + NPTL + NFRAME + 3
        # A block of the multiprocessing heap: an unlinked file, inherited by
        # descriptor at spawn, so nothing of it is ever named in /dev/shm.
        self.memory: Any = ctx.RawArray(ctypes.c_char, self.nlocks * SLOT_BYTES + SLOT_BYTES)
        # Only the host waits with a bound; workers inherit None.
        self.host_timeout: float | None = None
        self._bind()
        attr = ctypes.create_string_buffer(64)
        for fn, arg in ((_libc.pthread_mutexattr_init, None), (_libc.pthread_mutexattr_setpshared, 1),
                        (_libc.pthread_mutexattr_setrobust, 1)):
            if (fn(attr) if arg is None else fn(attr, arg)) != 0:
                raise InternalError("robust process-shared mutexes are not available")
        for lock in self.in_order():
            if _libc.pthread_mutex_init(ctypes.c_void_p(lock.address), attr) != 0:
                raise InternalError("pthread_mutex_init failed")
        _libc.pthread_mutexattr_destroy(attr)
        # Doorbells: the broker and each shadow sleep on one when idle.
        self.broker_bell: Any = ctx.Semaphore(0)
        self.shadow_bells: list[Any] = [ctx.Semaphore(0) for _ in range(nshadows)]

    def _bind(self) -> None:
        """Make the lock objects over the shared block (in every process that has the table)."""
        addr = ctypes.addressof(self.memory)
        self.base = (addr + SLOT_BYTES - 1) // SLOT_BYTES * SLOT_BYTES
        n = self.nguests
        self.mm: list[RobustLock] = [RobustLock(self, i, f"mm{i}") for i in range(n)]
        self.ptl: list[RobustLock] = [RobustLock(self, n + i, f"ptl{i}") for i in range(NPTL)]
        self.frame: list[RobustLock] = [RobustLock(self, n + NPTL + i, f"frame{i}") for i in range(NFRAME)]
        k = n + NPTL + NFRAME
        self.alloc: RobustLock = RobustLock(self, k, "alloc")
        self.notify: RobustLock = RobustLock(self, k + 1, "notify")
        self.stat: RobustLock = RobustLock(self, k + 2, "stat")

    def __getstate__(self) -> dict[str, Any]:
        return {"nguests": self.nguests, "nlocks": self.nlocks, "memory": self.memory,
                "broker_bell": self.broker_bell, "shadow_bells": self.shadow_bells}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.host_timeout = None
        self._bind()

    def in_order(self) -> list[RobustLock]:
        """Every lock, in the global lock order."""
        return [*self.mm, *self.ptl, *self.frame, self.alloc, self.notify, self.stat]

    def world(self) -> list[RobustLock]:
        """The locks that stop the world, in order: every lock under which a PTE or frame changes.

        mm locks are not among them: they guard the mergeable ranges, which
        neither a check nor a recovery reads, and their holders (an madvise
        unmerging a large range) may hold them long.
        """
        return self.in_order()[self.nguests:]

    def owner_deaths(self) -> int:
        """How many times a lock of this table was taken from a dead holder."""
        return sum(lock.owner_deaths for lock in self.in_order())

    def unlink(self) -> None:
        """Remove the doorbell semaphores' names from /dev/shm now (the host, once no worker is left).

        multiprocessing unlinks a named semaphore only when it is
        garbage-collected, so a closed machine that is still referenced would
        keep its ``sem.mp-*`` entries.  Running each one's finalizer now
        unlinks its name exactly once; the semaphores keep working here.
        The mutexes have no name to remove.
        """
        mine = {id(sem) for sem in [self.broker_bell, *self.shadow_bells]}
        for finalizer in list(util._finalizer_registry.values()):  # type: ignore[attr-defined]
            ref = getattr(finalizer, "_weakref", None)
            if ref is not None and id(ref()) in mine:
                finalizer()

    def ptl_index(self, guest_id: int, page: int) -> int:
        """The page-table lock index of one guest page."""
        return (guest_id * 97 + (page >> PTES_PER_LOCK_SHIFT)) % NPTL


@contextmanager
def stop_the_world(locks: LockTable, timeout: float | None = None) -> Iterator[int]:
    """Hold every lock under which a PTE or a frame changes; yield how many came from dead holders.

    For a consistent check() of a live machine and for the recovery after a
    death.  A lock a dead process held is had at once (EOWNERDEAD) and
    repaired; a live holder finishes its critical section first, which never
    waits for anyone that waits for this pass (the lock order).  A holder that
    does not go on (stopped) makes this raise LockTimeout once ``timeout`` has
    passed since the start, with nothing held.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    held: list[RobustLock] = []
    before = locks.owner_deaths()
    try:
        for lock in locks.world():
            if deadline is None:
                lock.acquire()
            elif not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise LockTimeout(f"stopping the world: lock {lock.name} not had in {timeout:g} s: "
                                  f"{lock.describe_holder()}")
            held.append(lock)
        yield locks.owner_deaths() - before
    finally:
        for lock in reversed(held):
            lock.release()


def default_context() -> BaseContext:
    """The start method shmksm uses for every worker: forkserver where available."""
    methods = multiprocessing.get_all_start_methods()
    return _ForkServerContext() if "forkserver" in methods else multiprocessing.get_context("spawn")


if "forkserver" in multiprocessing.get_all_start_methods():
    import threading
    from multiprocessing import context as _mp_context
    from multiprocessing import forkserver as _forkserver
    from multiprocessing import popen_forkserver
    from multiprocessing.connection import wait as _wait

    _STATUS_LOCK = threading.Lock()

    class _Popen(popen_forkserver.Popen):
        """The forkserver's Popen, its exit status read once.

        The forkserver writes a worker's status once on the worker's sentinel
        and closes it.  CPython's poll() reads it in every thread that finds
        the sentinel ready: when two do at once (the reaper thread and a
        join), the second reads the end of the pipe and may set 255 over
        the first's true status.  Here the read is done under a lock, by
        the first thread only.
        """

        def poll(self, flag: int = os.WNOHANG) -> int | None:
            if self.returncode is None:
                if not _wait([self.sentinel], 0 if flag == os.WNOHANG else None):
                    return None
                with _STATUS_LOCK:
                    if self.returncode is None:
                        try:
                            self.returncode = _forkserver.read_signed(self.sentinel)
                        except (OSError, EOFError):
                            self.returncode = 255  # the forkserver itself is gone
            return self.returncode

    class _ForkServerProcess(_mp_context.ForkServerProcess):
        @staticmethod
        def _Popen(process_obj: Any) -> _Popen:
            return _Popen(process_obj)

    class _ForkServerContext(_mp_context.ForkServerContext):
        Process = _ForkServerProcess
