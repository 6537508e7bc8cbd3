"""The robust lock's two implementations, the C extension and the ctypes fallback, behave alike.

Each test runs on both: ``RobustLock`` (the C fast path where the extension
is built) and ``CtypesRobustLock`` (the fallback of a machine without a
compiler), over the same kind of lock table, against a holder in another
process.
"""

from __future__ import annotations

import os
import shutil
import signal
import sysconfig
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shmksm import InternalError, LockTimeout
from shmksm._mm import locks
from shmksm._mm.locks import CtypesRobustLock, LockTable, RobustLock

IMPLS = [RobustLock, CtypesRobustLock]
INDEX = 5  # the lock of the table the tests use


def _hold(table: LockTable, cls: type[RobustLock], ready: Any) -> None:
    """A worker: take the lock, say so, and keep it until killed."""
    cls(table, INDEX, "held").acquire()
    ready.set()
    while True:
        time.sleep(1)


@pytest.fixture
def table() -> Iterator[LockTable]:
    t = LockTable(locks.default_context(), nguests=1, nshadows=0)
    try:
        yield t
    finally:
        t.unlink()


class Holder:
    """A process that holds one lock of ``table`` until :meth:`kill`."""

    def __init__(self, table: LockTable, cls: type[RobustLock]) -> None:
        ctx: Any = locks.default_context()
        ready = ctx.Event()
        self.process = ctx.Process(target=_hold, args=(table, cls, ready), daemon=True)
        self.process.start()
        assert ready.wait(30), "the holder did not take the lock"

    def kill(self) -> None:
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(30)


@pytest.fixture(params=IMPLS, ids=["c", "ctypes"])
def cls(request: pytest.FixtureRequest) -> type[RobustLock]:
    impl: type[RobustLock] = request.param
    return impl


def test_the_extension_is_built_where_there_is_a_compiler() -> None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip("no C compiler: the ctypes fallback is the implementation")
    from shmksm._mm import _robust

    assert issubclass(RobustLock, _robust.Mutex), "RobustLock does not use the C fast path"
    assert not issubclass(RobustLock, locks.CtypesMutex)


def test_uncontended_non_blocking_and_release(table: LockTable, cls: type[RobustLock]) -> None:
    lock = cls(table, INDEX, "t")
    assert lock.acquire() is True
    assert lock.holder() == threading.get_native_id()
    assert lock.acquire(False) is False, "a held lock was had again without blocking"
    assert lock.acquire(block=False) is False
    lock.release()
    assert lock.holder() == 0
    with lock as had:
        assert had is True
        assert lock.holder() == threading.get_native_id()
    assert lock.holder() == 0
    with pytest.raises(InternalError, match="released by a thread that does not hold it"):
        lock.release()
    with pytest.raises(TypeError):
        lock.acquire(True, None, 1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        lock.acquire(wait=True)  # type: ignore[call-arg]


def test_both_implementations_share_one_mutex(table: LockTable) -> None:
    fast, slow = RobustLock(table, INDEX, "t"), CtypesRobustLock(table, INDEX, "t")
    assert fast.acquire()
    assert not slow.acquire(False)
    slow.release()  # the same thread holds it, whichever object took it
    assert slow.acquire(False)
    assert not fast.acquire(timeout=0)
    fast.release()


def test_a_live_holder_keeps_its_lock(table: LockTable, cls: type[RobustLock]) -> None:
    holder = Holder(table, cls)
    try:
        lock = cls(table, INDEX, "t")
        assert lock.holder() == holder.process.pid
        assert lock.acquire(False) is False
        t0 = time.monotonic()
        assert lock.acquire(timeout=0.2) is False
        assert time.monotonic() - t0 >= 0.19, "a timed acquire gave up early"
        assert lock.acquire(timeout=-1) is False
        with pytest.raises(InternalError, match="released by a thread that does not hold it"):
            lock.release()
        assert lock.holder() == holder.process.pid, "a release by a non-holder freed the lock"
        table.host_timeout = 0.2
        with pytest.raises(LockTimeout, match=rf"lock t not had in 0.2 s: held by pid {holder.process.pid}"):
            lock.acquire()
        assert lock.owner_deaths == 0
    finally:
        holder.kill()


def test_a_wait_releases_the_gil(table: LockTable, cls: type[RobustLock]) -> None:
    holder = Holder(table, cls)
    try:
        lock = cls(table, INDEX, "t")
        got: list[bool] = []

        def wait() -> None:
            got.append(lock.acquire(timeout=3.0))
            if got[0]:
                lock.release()

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        spins = 0
        while time.monotonic() - t0 < 0.2:
            spins += 1
        assert waiter.is_alive(), "this thread did not run while the other one waited: the GIL was held"
        assert spins > 0
    finally:
        holder.kill()
    waiter.join(10)
    assert got == [True], "the waiter was not given the dead holder's lock"
    assert lock.owner_deaths == 1


def test_a_killed_holders_lock_is_taken_over_and_repaired(table: LockTable, cls: type[RobustLock]) -> None:
    lock = cls(table, INDEX, "t")
    repaired: list[int] = []
    lock.on_owner_dead = lambda: repaired.append(lock.holder())
    holder = Holder(table, cls)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(lock.acquire()))  # no bound: a worker's wait
    waiter.start()
    time.sleep(0.1)
    assert waiter.is_alive() and not got, "the lock was had while its holder lived"
    holder.kill()
    waiter.join(10)
    assert not waiter.is_alive(), "a waiter for a dead holder's lock was not woken"
    assert got == [True]
    assert repaired == [waiter.native_id], "the repair did not run once, lock held, in the new holder"
    assert lock.owner_deaths == 1
    # The waiter thread ended holding the lock, so the kernel handed it on as a dead holder's again.
    assert lock.acquire(timeout=1)
    assert lock.owner_deaths == 2
    lock.release()
    assert lock.acquire(False), "the lock was not made consistent after its repair"
    assert lock.owner_deaths == 2
    lock.release()
