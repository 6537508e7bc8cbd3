"""The host: machine life cycle, guests, workers, out of frames, and the checker itself."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import numpy as np
import pytest
from helpers import merge_pages, pfn_of, shm_entries
from shmksm.workers import guest_random

import shmksm
from shmksm import PAGE_SIZE
from shmksm._mm import control, segments
from shmksm._mm.frames import KSM as FRAME_KSM
from shmksm._mm.pagetable import WRITE

# -- life cycle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 0, -8, True, 2.0, "64", None])
def test_a_machine_needs_at_least_two_frames(frames: Any) -> None:
    with pytest.raises(shmksm.UsageError) as info:
        shmksm.Machine(frames=frames, ksmd=False)
    assert isinstance(info.value, ValueError)


def test_the_smallest_machine() -> None:
    with shmksm.Machine(frames=2, ksmd=False) as machine:
        view = machine.add_guest(pages=1).view()
        view.write(0, b"one frame")
        assert view.read(0, 9) == b"one frame"
        assert machine.free_frames() == 0
        machine.check()


def test_a_bad_knob_at_start_leaves_nothing_behind() -> None:
    with pytest.raises(shmksm.KnobError) as info:
        shmksm.Machine(frames=16, ksmd=False, max_page_sharing=1)
    assert isinstance(info.value, ValueError)
    with pytest.raises(shmksm.KnobError):
        shmksm.Machine(frames=16, ksmd=False, no_such_knob=1)


def test_closing_removes_every_segment_and_semaphore_at_once() -> None:
    with shmksm.Machine(frames=64, ksmd=False) as machine:
        machine.add_guest(pages=8).view().write(0, b"x")
        prefix = machine.system.spec.prefix
        names = {n for n in shm_entries() if n.startswith(prefix)}
        assert {f"{prefix}_{what}" for what in ("ctl", "frames", "meta", "g0")} <= names
    # The machine is still referenced here: nothing may wait for the garbage collector.
    assert not {n for n in shm_entries() if n.startswith(prefix)}
    lock = machine.system.locks.ptl[0]
    assert lock.acquire(timeout=0), "the locks work after their names are gone"
    lock.release()
    machine.close()  # idempotent


def test_a_closed_machine_refuses_everything() -> None:
    machine = shmksm.Machine(frames=64, ksmd=False)
    guest = machine.add_guest(pages=2)
    machine.close()
    for call in (lambda: machine.add_guest(pages=1), guest.view, machine.check,
                 lambda: machine.spawn(guest_random.run, guest, 0)):
        with pytest.raises(shmksm.UsageError):
            call()


def test_guests_are_refused_beyond_the_pool_without_overcommit() -> None:
    with shmksm.Machine(frames=9, ksmd=False) as machine:
        machine.add_guest(pages=5)
        second = machine.add_guest(pages=3)
        with pytest.raises(shmksm.UsageError, match="overcommit") as info:
            machine.add_guest(pages=1)
        assert isinstance(info.value, ValueError)
        assert len(machine.guests()) == 2
        machine.remove_guest(second)
        machine.add_guest(pages=3)
    with shmksm.Machine(frames=9, overcommit=True, ksmd=False) as machine:
        for _ in range(4):
            machine.add_guest(pages=1000)
        machine.check()


def test_at_most_max_guests() -> None:
    with shmksm.Machine(frames=control.MAX_GUESTS + 1, ksmd=False) as machine:
        for _ in range(control.MAX_GUESTS):
            machine.add_guest(pages=1)
        with pytest.raises(shmksm.UsageError):
            machine.add_guest(pages=1)


def test_remove_guest_frees_its_frames(machine: shmksm.Machine) -> None:
    a, b = machine.add_guest(pages=8), machine.add_guest(pages=8)
    same = bytes(range(256)) * 16
    a.view().write(0, same * 8)
    b.view().write(0, same)
    kpfn, _ = merge_pages(machine, a, 3, b, 0)
    assert kpfn > 0
    machine.remove_guest(a)
    assert not a.alive
    with pytest.raises(shmksm.UsageError):
        a.view()
    with pytest.raises(shmksm.UsageError):
        machine.remove_guest(a)
    machine.reclaim()
    assert machine.free_frames() == machine.frames - 2, "only b's page is left"
    assert machine.system.frames.mapcount[kpfn] == 1
    assert b.view().read(0, PAGE_SIZE) == same
    machine.check()


def test_cleanup_stale_removes_dead_hosts_segments_only(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=1)
    guest.view().write(0, b"alive")
    child = subprocess.Popen(["true"])
    child.wait()
    stale = f"{segments.PREFIX}{child.pid}_deadbeef_ctl"
    with open(os.path.join(segments.SHM_DIR, stale), "wb") as f:
        f.write(b"left by a host killed with SIGKILL")
    assert stale in segments.stale_segments()
    assert stale in segments.cleanup_stale()
    assert not os.path.exists(os.path.join(segments.SHM_DIR, stale))
    assert guest.view().read(0, 5) == b"alive"
    # A new machine cleans up at start.
    with open(os.path.join(segments.SHM_DIR, stale), "wb") as f:
        f.write(b"again")
    shmksm.Machine(frames=4, ksmd=False).close()
    assert not os.path.exists(os.path.join(segments.SHM_DIR, stale))


# -- workers -----------------------------------------------------------------------------------


def _sum_and_pid(view: shmksm.GuestView, a: int, b: int) -> tuple[int, int, int]:
    view.write(0, np.array([a, b], np.uint64))
    x, y = np.frombuffer(view.read(0, 16), np.uint64)
    return int(x + y), os.getpid(), view.gid


def _sleep(view: shmksm.GuestView, seconds: float) -> None:
    time.sleep(seconds)


def test_spawn_runs_in_another_process(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=1)
    worker = machine.spawn(_sum_and_pid, guest, 40, 2)
    total, pid, gid = worker.join(30)
    assert (total, gid) == (42, guest.id)
    assert pid == worker.pid != os.getpid()
    assert machine.join_all(30) == [(42, pid, guest.id)]
    assert guest.view().read(0, 8) == np.uint64(40).tobytes()


def test_join_timeout_and_removing_a_busy_guest(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=1)
    worker = machine.spawn(_sleep, guest, 30.0)
    with pytest.raises(shmksm.ProcessDied, match="still runs") as info:
        worker.join(0.05)
    assert isinstance(info.value, ChildProcessError)
    with pytest.raises(shmksm.UsageError, match="running process"):
        machine.remove_guest(guest)
    worker.kill()
    with pytest.raises(shmksm.ProcessDied, match="signal 9"):
        worker.join(30)


def test_a_guest_that_runs_out_of_frames_reports_it() -> None:
    with shmksm.Machine(frames=4, overcommit=True, ksmd=False) as small:
        guest = small.add_guest(pages=8)
        worker = small.spawn(guest_random.run, guest, 1, 5.0)
        with pytest.raises(shmksm.ProcessDied, match="OutOfFrames"):
            worker.join(30)
        small.check()


# -- out of frames ------------------------------------------------------------------------------


def test_out_of_frames_with_overcommit() -> None:
    with shmksm.Machine(frames=8, overcommit=True, ksmd=False) as machine:
        guest = machine.add_guest(pages=16)
        view = guest.view()
        for page in range(7):
            view.write(page * PAGE_SIZE, bytes([page + 1]) * PAGE_SIZE)
        assert machine.free_frames() == 0
        with pytest.raises(shmksm.OutOfFrames) as info:
            view.write(7 * PAGE_SIZE, b"x")
        assert isinstance(info.value, MemoryError)
        assert info.value.written == 0
        with pytest.raises(shmksm.OutOfFrames) as info:
            view.write(7 * PAGE_SIZE - 100, b"y" * 200)  # its first page has a frame, its second none
        assert info.value.written == 100, "a short write: the page that had a frame"
        with pytest.raises(shmksm.OutOfFrames) as info:
            view.write(8 * PAGE_SIZE, np.ones(3 * PAGE_SIZE, np.uint8))
        assert info.value.written == 0
        machine.check()
        for page in range(6):
            assert view.read(page * PAGE_SIZE, PAGE_SIZE) == bytes([page + 1]) * PAGE_SIZE
        assert view.read(6 * PAGE_SIZE, PAGE_SIZE) == b"\x07" * (PAGE_SIZE - 100) + b"y" * 100
        assert view.read(7 * PAGE_SIZE, 9 * PAGE_SIZE) == bytes(9 * PAGE_SIZE), "reads need no frame"
        # A frame dropped by munmap is found again by the allocator's reclaim pass.
        view.munmap(0, PAGE_SIZE)
        view.write(7 * PAGE_SIZE, b"x")
        assert view.read(7 * PAGE_SIZE, 2) == b"x\0"
        machine.check()


def test_a_machine_that_is_not_overcommitted_never_runs_out() -> None:
    with shmksm.Machine(frames=3, ksmd=False) as machine:
        a, b = machine.add_guest(pages=1), machine.add_guest(pages=1)
        a.view().write(0, b"same")
        b.view().write(0, b"same")
        assert merge_pages(machine, a, 0, b, 0)[0] > 0
        a.view().write(0, b"A")  # takes the frame the merge dropped
        b.view().write(0, b"B")  # the KSM page has one mapping left and no frame is free: b keeps it
        assert a.view().read(0, 4) == b"Aame"
        assert b.view().read(0, 4) == b"Bame"
        machine.check()


# -- the checker can fail ----------------------------------------------------------------------


def test_check_finds_broken_accounting(machine: shmksm.Machine) -> None:
    """Every test relies on check(): make sure it fails when an invariant is broken."""
    a, b = machine.add_guest(pages=2), machine.add_guest(pages=2)
    a.view().write(0, b"same")
    b.view().write(0, b"same")
    a.view().write(PAGE_SIZE, b"private")
    kpfn, _ = merge_pages(machine, a, 0, b, 0)
    frames, table = machine.system.frames, machine.system.table(a.id)
    private = pfn_of(machine, a, 1)
    machine.check()

    def broken(match: str) -> None:
        with pytest.raises(shmksm.CheckError, match=match) as info:
            machine.check()
        assert isinstance(info.value, AssertionError)

    frames.mapcount[kpfn] = 3
    broken("mapcount")
    frames.mapcount[kpfn] = 2

    table.pv[0] |= WRITE
    broken("writable PTE")
    table.pv[0] &= ~WRITE

    flags = int(frames.flags[kpfn])
    frames.flags[kpfn] = flags & ~FRAME_KSM
    broken("not a KSM page")
    frames.flags[kpfn] = flags

    frames.pool[0, 17] = 1
    broken("zero page")
    frames.pool[0, 17] = 0

    free = machine.system.get("free_count")
    machine.system.set("free_count", free + 1)
    broken("free_count")
    machine.system.set("free_count", free)

    pte = int(table.pv[1])
    table.pv[1] = 0
    broken("leaked")
    table.pv[1] = pte
    assert pfn_of(machine, a, 1) == private
    machine.check()


class LossyView(shmksm.GuestView):
    """A guest view that loses every 50th write (write or write_pages): what the workload must notice."""

    writes = 0

    def write(self, addr: int, data: Any) -> None:
        self.writes += 1
        if self.writes % 50:
            super().write(addr, data)

    def write_pages(self, pages: Any, rows: Any) -> None:
        self.writes += 1
        if self.writes % 50:
            super().write_pages(pages, rows)


def test_the_workload_counts_what_it_did_not_write(machine: shmksm.Machine) -> None:
    view = machine.add_guest(pages=8).view()
    assert guest_random.run(view, seed=3, seconds=10.0, max_ops=300) == 0
    other = machine.add_guest(pages=8).view()
    assert guest_random.run(other, seed=3, seconds=10.0, max_ops=300) == 0
    assert other.read(0, other.size) == view.read(0, view.size), "the workload is not deterministic"
    lossy = LossyView(machine.system, machine.add_guest(pages=256).id)  # few lost writes are overwritten
    assert guest_random.run(lossy, seed=3, seconds=10.0, max_ops=300) > 0


def test_shadowed_machine_gives_guests_mirrored_by_shadows() -> None:
    from shmksm.testing import shadowed_machine

    with shadowed_machine(guests=2, pages=4, shadows=2) as (machine, guests, shadows):
        assert len(machine.guests()) == 2 and len(shadows) == 2
        for guest in guests:
            guest.view().write(0, b"x" * 8)
        for shadow in shadows:
            assert shadow.registered == {g.id for g in guests}
            shadow.round()
            assert shadow.stats()["reads"] > 0
