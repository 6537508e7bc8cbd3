"""Robust locks, the named fault-injection points, and bounded host waits on a stopped process.

Each injection point kills a process inside its critical section; the
machine must recover (machine.check() passes), lose no byte, and go on.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import pytest
from helpers import wait_until
from shmksm.workers.guest_random import pattern

import shmksm
from shmksm import MADV_MERGEABLE, PAGE_SIZE
from shmksm._mm.locks import process_state


def _hold(view: shmksm.GuestView, seconds: float) -> None:
    """Take page 0's page-table lock, say so on page 512, hold it ``seconds``."""
    lock = view.table.ptl(0)
    lock.acquire()
    try:
        view.table.ptl(512).acquire()
        view.table.pv[512] = 0  # untouched: a read maps the zero page, a write a frame
        view.table.ptl(512).release()
        view.write(512 * PAGE_SIZE, b"held")
        time.sleep(seconds)
    finally:
        lock.release()


def _sleep(view: shmksm.GuestView, seconds: float) -> None:
    time.sleep(seconds)


def _write_forever(view: shmksm.GuestView, seed: int) -> None:
    rng = np.random.default_rng(seed)
    while True:
        page = int(rng.integers(view.pages))
        view.write(page * PAGE_SIZE, rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8))


def _write_pages(view: shmksm.GuestView, content: bytes) -> bool:
    """Write ``content`` from address 0; return whether it reads back (a small result: the pipe is small)."""
    view.write(0, content)
    return view.read(0, len(content)) == content


def _alloc_fails_once(view: shmksm.GuestView) -> tuple[str, bytes]:
    try:
        view.write(0, b"first")
        first = "written"
    except shmksm.OutOfFrames as exc:
        first = str(exc)
    view.write(0, b"again")
    return first, view.read(0, 5)


def _death_of(machine: shmksm.Machine, worker: shmksm.Worker) -> shmksm.Death:
    wait_until(lambda: any(d.pid == worker.pid for d in machine.deaths), 60.0, f"the host to recover pid {worker.pid}")
    return next(d for d in machine.deaths if d.pid == worker.pid)


def _frames_all_back(machine: shmksm.Machine, mapped: int) -> None:
    wait_until(lambda: (machine.reclaim(), machine.free_frames())[1] == machine.frames - 1 - mapped, 20.0,
               f"every frame but {mapped} to be free again")


# -- robust locks ---------------------------------------------------------------------------------------


def _guest_holding_its_lock(machine: shmksm.Machine, seconds: float) -> tuple[Any, shmksm.Worker]:
    """A guest process that holds the page-table lock of its first run for ``seconds``; (that lock, the worker)."""
    guest = machine.add_guest(pages=1024)
    lock = machine.system.locks.ptl[machine.system.locks.ptl_index(guest.id, 0)]
    worker = machine.spawn(_hold, guest, seconds)
    view = guest.view()
    wait_until(lambda: view.read(512 * PAGE_SIZE, 4) == b"held", 10.0, "the guest to take the lock")
    return lock, worker


def test_a_dead_holders_lock_is_had_at_once_and_counted() -> None:
    with shmksm.Machine(frames=64, overcommit=True, ksmd=False) as machine:
        lock, worker = _guest_holding_its_lock(machine, 600.0)
        assert lock.holder() == worker.pid, "the lock does not record its holder"
        worker.kill(signal.SIGKILL)
        _death_of(machine, worker)
        assert lock.acquire(timeout=1), "the dead holder's lock was not had"
        lock.release()
        assert lock.owner_deaths == 1
        machine.check()


def test_a_live_holder_keeps_its_lock_however_long_it_holds_it() -> None:
    with shmksm.Machine(frames=64, overcommit=True, ksmd=False) as machine:
        lock, worker = _guest_holding_its_lock(machine, 3.0)
        assert not lock.acquire(timeout=1.5), "a live holder's lock was taken over"
        assert worker.join(20) is None
        assert lock.acquire(timeout=1)
        lock.release()
        assert lock.owner_deaths == 0


# -- a stopped process: host calls fail after a bound ---------------------------------------------------


def test_a_stopped_lock_holder_makes_host_calls_fail_with_lock_timeout_not_hang() -> None:
    with shmksm.Machine(frames=256, ksmd=False, lock_timeout=1.0) as machine:
        guest = machine.add_guest(pages=16)
        machine.inject("frames.alloc", "stop")
        worker = machine.spawn(_write_pages, guest, b"x" * PAGE_SIZE)
        wait_until(lambda: machine.injected("frames.alloc") == 1, 10.0, "the guest to stop in the allocator")
        wait_until(lambda: "stopped" in process_state(worker.pid), 10.0, "the guest to be stopped")
        t0 = time.monotonic()
        with pytest.raises(shmksm.LockTimeout, match=f"pid {worker.pid}") as info:
            machine.check()
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, shmksm.ShmksmError)
        assert time.monotonic() - t0 < 10
        with pytest.raises(shmksm.LockTimeout):
            machine.check(timeout=0.2)
        other = machine.add_guest(pages=4)
        with pytest.raises(shmksm.LockTimeout):
            other.view().write(0, b"needs the allocator")
        with pytest.raises(shmksm.LockTimeout):
            machine.remove_guest(other)
        os.kill(worker.pid, signal.SIGCONT)
        assert worker.join(20) is True
        machine.check()
        machine.remove_guest(other)


def test_a_stopped_guest_delays_the_recovery_of_a_dead_one_but_nothing_hangs() -> None:
    with shmksm.Machine(frames=256, ksmd=False, lock_timeout=1.0) as machine:
        stopped_guest, dead_guest = machine.add_guest(pages=16), machine.add_guest(pages=16)
        dead_guest.view().write(0, b"y" * 4 * PAGE_SIZE)
        machine.inject("frames.alloc", "stop")
        stopped = machine.spawn(_write_pages, stopped_guest, b"x" * PAGE_SIZE)
        wait_until(lambda: machine.injected("frames.alloc") == 1, 10.0, "the guest to stop in the allocator")
        victim = machine.spawn(_sleep, dead_guest, 600.0)
        time.sleep(0.3)
        victim.kill(signal.SIGKILL)
        victim.process.join(10)
        with pytest.raises(shmksm.LockTimeout):
            machine.check()
        # Reaped, its teardown waiting for the stopped guest's lock: not alive to users meanwhile.
        wait_until(lambda: not dead_guest.alive, 20.0, "the host to reap the killed guest")
        assert not any(d.pid == victim.pid for d in machine.deaths), "recovered while a lock it needs is held"
        with pytest.raises(shmksm.LockTimeout):
            machine.check()
        os.kill(stopped.pid, signal.SIGCONT)
        assert stopped.join(20) is True
        death = _death_of(machine, victim)
        assert death.frames_reclaimed == 4
        machine.check()


# -- the injection points ------------------------------------------------------------------------------


def test_inject_refuses_unknown_points_and_actions() -> None:
    with shmksm.Machine(frames=16, ksmd=False) as machine:
        with pytest.raises(shmksm.UsageError, match=r"frames\.alloc"):
            machine.inject("no.such.point")
        with pytest.raises(shmksm.UsageError, match="kill"):
            machine.inject("frames.alloc", "explode")
        with pytest.raises(shmksm.UsageError, match=r"only frames\.alloc can fail"):
            machine.inject("broker.after_copy", "fail")
        with pytest.raises(shmksm.UsageError):
            machine.inject("frames.alloc", times=-1)


def test_frames_alloc_fail_is_an_out_of_frames_error_once() -> None:
    with shmksm.Machine(frames=64, ksmd=False) as machine:
        guest = machine.add_guest(pages=4)
        machine.inject("frames.alloc", "fail", times=1)
        first, again = machine.spawn(_alloc_fails_once, guest).join(20)
        assert "injected" in first
        assert again == b"again"
        assert machine.injected("frames.alloc") == 1
        machine.check()


def test_killed_in_frames_alloc_under_the_allocator_lock() -> None:
    with shmksm.Machine(frames=512, ksmd=False) as machine:
        bystander = machine.add_guest(pages=8)
        kept = pattern(1) * 8
        bystander.view().write(0, kept)
        victim = machine.add_guest(pages=128)
        machine.inject("frames.alloc", "kill", times=1)
        worker = machine.spawn(_write_forever, victim, 3)
        death = _death_of(machine, worker)
        assert death.signal == signal.SIGKILL
        assert machine.system.locks.alloc.owner_deaths == 1, "the allocator lock was not had from the dead"
        machine.check()
        _frames_all_back(machine, 8)
        assert bystander.view().read(0, len(kept)) == kept
        newcomer = machine.add_guest(pages=64)
        content = pattern(2) * 64
        assert machine.spawn(_write_pages, newcomer, content).join(30) is True
        machine.check()


def _fill_duplicates(view: shmksm.GuestView, pages: int) -> None:
    for p in range(pages):
        view.write(p * PAGE_SIZE, pattern(p % 4))
    view.madvise(0, pages * PAGE_SIZE, MADV_MERGEABLE)


def test_ksmd_killed_between_write_protect_page_and_replace_page() -> None:
    with shmksm.Machine(frames=512, ksmd=False, sleep_millisecs=0) as machine:
        guests = [machine.add_guest(pages=32) for _ in range(2)]
        for g in guests:
            machine.spawn(_fill_duplicates, g, 32).join(30)
        ksmd = machine.start_ksmd()
        machine.inject("ksm.merge.after_write_protect", "kill", times=1, process=ksmd)
        machine.ksm.run = 1
        death = _death_of(machine, ksmd)
        assert death.name == "ksmd" and machine.injected("ksm.merge.after_write_protect") == 1
        machine.check()
        for g in guests:
            assert g.view().read(0, 32 * PAGE_SIZE) == b"".join(pattern(p % 4) for p in range(32))
        machine.start_ksmd()
        c = machine.wait_converged(timeout=60)
        assert (c["pages_shared"], c["pages_sharing"]) == (4, 60)
        machine.check()


def _write_and_break(view: shmksm.GuestView, rounds: int) -> int:
    for r in range(rounds):
        for p in range(view.pages):
            view.write(p * PAGE_SIZE, pattern((p + r) % 4))
    return rounds


def test_broker_killed_between_copying_a_batch_and_acknowledging_it() -> None:
    with shmksm.Machine(frames=1024, ksmd=False) as machine:
        guest = machine.add_guest(pages=64)
        shadow = machine.add_shadow([guest])
        shadow.round()
        broker = machine.broker
        assert broker is not None
        machine.inject("broker.after_copy", "kill", times=1, process=broker)
        writer = machine.spawn(_write_and_break, guest, 3)
        _death_of(machine, broker)
        machine.start_broker()
        assert writer.join(60) == 3
        shadow.sync()
        r = shadow.round()
        assert r["stale_reads"] == 0
        stats = shadow.stats()
        assert stats["after_release"] == 0 and stats["stale_reads"] == 0
        machine.check()
        assert guest.view().read(0, 64 * PAGE_SIZE) == b"".join(pattern((p + 2) % 4) for p in range(64))
        shadow.stop()
        machine.check()


def test_shadow_killed_in_the_middle_of_applying_a_batch() -> None:
    with shmksm.Machine(frames=1024, ksmd=False) as machine:
        guest = machine.add_guest(pages=64)
        shadow = machine.add_shadow([guest])
        shadow.round()
        assert shadow.worker is not None
        machine.inject("shadow.mid_batch", "kill", times=1, process=shadow.worker)
        assert machine.spawn(_write_and_break, guest, 3).join(60) == 3
        _death_of(machine, shadow.worker)
        assert shadow not in machine.shadows()
        machine.check()
        # Its slot is freed, its registration gone, reclamation goes on.
        wait_until(lambda: machine.system.notify_area.nreg[guest.id] == 0, 10.0, "the registration to be dropped")
        _frames_all_back(machine, 64)
        again = machine.add_shadow([guest])
        assert again.round()["stale_reads"] == 0
        again.stop()
        assert guest.view().read(0, 64 * PAGE_SIZE) == b"".join(pattern((p + 2) % 4) for p in range(64))
        machine.check()


def test_shadows_killed_again_and_again_never_run_out_of_slots() -> None:
    with shmksm.Machine(frames=256, ksmd=False) as machine:
        guest = machine.add_guest(pages=8)
        for _ in range(20):
            shadow = machine.add_shadow([guest])
            assert shadow.worker is not None
            shadow.worker.kill(signal.SIGKILL)
            with pytest.raises(shmksm.ProcessDied, match="signal 9"):
                shadow.worker.join(20)
            _death_of(machine, shadow.worker)
        machine.check()


def test_the_hosts_recovery_killed_midway_runs_again() -> None:
    with shmksm.Machine(frames=256, ksmd=False) as machine:
        victim = machine.add_guest(pages=16)
        machine.inject("check.recover", "kill", times=1)
        worker = machine.spawn(_write_forever, victim, 5)
        wait_until(lambda: machine.free_frames() < 255 - 8, 20.0, "the guest to fault in its pages")
        worker.kill(signal.SIGKILL)
        death = _death_of(machine, worker)
        assert machine.injected("check.recover") == 1, "the recovery was not interrupted"
        assert death.frames_reclaimed >= 8
        machine.check()
        _frames_all_back(machine, 0)



def _fill_distinct(view: shmksm.GuestView, pages: int) -> None:
    view.write(0, b"".join(pattern(p) for p in range(pages)))
    view.madvise(0, pages * PAGE_SIZE, MADV_MERGEABLE)


@pytest.mark.parametrize("era", ["2012", "interval"])
def test_ksmd_killed_between_an_invalidation_start_and_its_end_leaves_no_invalidation_open(era: str) -> None:
    # Two guests of the same 512 distinct pages: the second guest's batch pairs
    # with the first's pages on the unstable tree, merged a run at a time.  ksmd
    # sends a run's invalidate_range_start records, takes its lock, changes the
    # PTEs, sends the ends: killed in between, recovery sends the ends it owed,
    # so a shadow's next fault on the guest does not wait for them for good.
    pages = 512
    with shmksm.Machine(frames=4 * pages, ksmd=False, sleep_millisecs=0, pages_to_scan=pages,
                        notifier_era=era) as machine:
        guests = [machine.add_guest(pages=pages) for _ in range(2)]
        for g in guests:
            machine.spawn(_fill_distinct, g, pages).join(30)
        shadow = machine.add_shadow(guests)
        shadow.round()
        ksmd = machine.start_ksmd()
        machine.inject("ksm.merge.after_write_protect", "kill", times=1, process=ksmd)
        machine.ksm.run = 1
        _death_of(machine, ksmd)
        machine.check()
        shadow.sync()
        started = time.monotonic()
        r = shadow.round(timeout=30)
        assert time.monotonic() - started < 5  # no fault waited its bound for an end that never came
        assert r["stale_reads"] == 0 and shadow.alive
        machine.start_ksmd()
        c = machine.wait_converged(timeout=60)
        assert (c["pages_shared"], c["pages_sharing"]) == (pages, pages)
        shadow.sync()
        assert shadow.round()["stale_reads"] == 0
        shadow.stop()
        machine.check()
        for g in guests:
            assert g.view().read(0, pages * PAGE_SIZE) == b"".join(pattern(p) for p in range(pages))
