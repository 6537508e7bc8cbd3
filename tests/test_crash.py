"""Deaths: a guest killed mid-write, a guest killed holding a page-table lock, the host killed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import shm_entries, wait_until

import shmksm
from shmksm import PAGE_SIZE
from shmksm._mm import segments

REPO = Path(__file__).resolve().parent.parent


def _write_forever(view: shmksm.GuestView, seed: int) -> None:
    """Write at random, single pages and runs across pages, until killed."""
    rng = random.Random(seed)
    while True:
        if rng.random() < 0.7:
            page = rng.randrange(view.pages)
            view.write(page * PAGE_SIZE + rng.randrange(PAGE_SIZE - 64), rng.randbytes(64))
        else:
            n = rng.randrange(1, 3 * PAGE_SIZE)
            view.write(rng.randrange(view.size - n), rng.randbytes(n))


def _hold_ptl_and_sleep(view: shmksm.GuestView, marker_page: int) -> None:
    """Take page 0's page-table lock, say so at ``marker_page``, and never let go."""
    view.table.ptl(0).acquire()
    view.write(marker_page * PAGE_SIZE, b"held")
    time.sleep(600)


def _write_and_read(view: shmksm.GuestView, addr: int, data: bytes) -> bytes:
    view.write(addr, data)
    return view.read(addr, len(data))


def _wait_for_death(machine: shmksm.Machine, worker: shmksm.Worker) -> shmksm.Death:
    wait_until(lambda: any(d.pid == worker.pid for d in machine.deaths), 10.0, f"the host to reap pid {worker.pid}")
    return next(d for d in machine.deaths if d.pid == worker.pid)


@pytest.mark.parametrize("seed", range(3))
def test_a_guest_killed_mid_write_is_torn_down(seed: int) -> None:
    with shmksm.Machine(frames=256, ksmd=False) as machine:
        bystander = machine.add_guest(pages=16)
        kept = random.Random(seed).randbytes(16 * PAGE_SIZE)
        bystander.view().write(0, kept)
        victim = machine.add_guest(pages=128)
        worker = machine.spawn(_write_forever, victim, seed)
        # Let it fault in a good part of its pages, then kill it at a random moment.
        start = machine.free_frames()
        wait_until(lambda: machine.free_frames() < start - 40, 20.0, "the guest to fault in 40 pages")
        time.sleep(random.Random(seed).uniform(0, 0.05))
        worker.kill(signal.SIGKILL)

        death = _wait_for_death(machine, worker)
        assert (death.signal, death.guest) == (signal.SIGKILL, victim.id)
        assert death.frames_reclaimed >= 40
        assert not victim.alive
        with pytest.raises(shmksm.ProcessDied, match="signal 9"):
            worker.join(10)
        machine.check()
        machine.reclaim()
        assert machine.free_frames() == machine.frames - 1 - 16, "the dead guest's frames did not come back"
        assert bystander.view().read(0, 16 * PAGE_SIZE) == kept
        # The machine goes on: a new guest gets the frames.
        newcomer = machine.add_guest(pages=64)
        assert machine.spawn(_write_and_read, newcomer, 100, b"after" * 10000).join(30) == b"after" * 10000
        machine.check()


def test_a_guest_killed_holding_a_page_table_lock() -> None:
    with shmksm.Machine(frames=64, overcommit=True, ksmd=False) as machine:
        holder = machine.add_guest(pages=1024)
        lock = machine.system.table(holder.id).ptl(0)
        # A page of another guest whose page-table lock is the same stripe as page 0's.
        other = machine.add_guest(pages=256 * 512)
        other_table = machine.system.table(other.id)
        page = next(p for p in range(0, other.pages, 512) if other_table.ptl(p) is lock)
        marker = 512  # in the next run of 512 PTEs: another lock
        assert machine.system.table(holder.id).ptl(marker) is not lock

        worker = machine.spawn(_hold_ptl_and_sleep, holder, marker)
        view = holder.view()
        wait_until(lambda: view.read(marker * PAGE_SIZE, 4) == b"held", 10.0, "the guest to take the lock")
        blocked = machine.spawn(_write_and_read, other, page * PAGE_SIZE, b"proceeds")
        time.sleep(0.2)
        assert blocked.is_alive(), "the other guest did not wait for the lock"
        worker.kill(signal.SIGKILL)

        _wait_for_death(machine, worker)
        assert blocked.join(10) == b"proceeds"
        assert lock.acquire(timeout=1), "the dead guest's lock was not taken over"
        lock.release()
        machine.check()
        machine.reclaim()
        assert machine.free_frames() == machine.frames - 2, "only the other guest's page is left"


def _mark_and_sleep(view: shmksm.GuestView, marker_page: int) -> None:
    view.write(marker_page * PAGE_SIZE, b"here")
    time.sleep(600)


def _read_later(view: shmksm.GuestView, seconds: float, n: int) -> bytes:
    time.sleep(seconds)
    return view.read(0, n)


def test_a_guest_outlives_one_of_its_two_processes() -> None:
    with shmksm.Machine(frames=64, ksmd=False) as machine:
        guest = machine.add_guest(pages=4)
        guest.view().write(0, b"data")
        victim = machine.spawn(_mark_and_sleep, guest, 1)
        survivor = machine.spawn(_read_later, guest, 1.0, 4)
        wait_until(lambda: guest.view().read(PAGE_SIZE, 4) == b"here", 10.0, "the first process to start")
        victim.kill(signal.SIGKILL)
        _wait_for_death(machine, victim)
        machine.check()
        assert survivor.join(10) == b"data"


HOST_SCRIPT = textwrap.dedent("""
    import time
    import shmksm
    from shmksm.workers import guest_random

    machine = shmksm.Machine(frames=256, ksmd=False)
    guest = machine.add_guest(pages=64)
    worker = machine.spawn(guest_random.run, guest, 1, 120.0, 10**9)
    while machine.free_frames() > 255 - 16:
        time.sleep(0.005)
    print(machine.system.spec.prefix, worker.pid, flush=True)
    time.sleep(120)
""")


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def killed_host() -> Iterator[tuple[int, int]]:
    """A host that runs a machine with a busy guest, killed with SIGKILL: yield (host pid, guest pid)."""
    host = subprocess.Popen([sys.executable, "-c", HOST_SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    worker_pid = 0
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line, f"the host script failed (exit code {host.poll()})"
        prefix, pid_text = line.split()
        worker_pid = int(pid_text)
        assert prefix.startswith(f"{segments.PREFIX}{host.pid}_")
        assert any(name.startswith(prefix) for name in shm_entries())
        os.kill(host.pid, signal.SIGKILL)
        assert host.wait(10) == -signal.SIGKILL
        yield host.pid, worker_pid
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()
        # A guest that outlived its host would keep the host's resource tracker
        # (and so its semaphores) alive: end it, by its pid.
        if worker_pid and _running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def test_a_killed_hosts_segments_disappear(killed_host: tuple[int, int]) -> None:
    host_pid, _ = killed_host
    mine = f"{segments.PREFIX}{host_pid}_"

    def left() -> list[str]:
        return sorted(name for name in shm_entries() if name.startswith(mine))

    # The host's resource tracker unlinks what the host created once every
    # process holding its fd has exited; cleanup_stale() (which every new
    # Machine runs) removes the segments of a host that no longer runs.
    deadline = time.monotonic() + 5.0
    delay = 0.01
    while left() and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    segments.cleanup_stale()
    assert left() == [], "segments of the killed host are left"


def test_a_killed_hosts_guests_die_with_it(killed_host: tuple[int, int]) -> None:
    _, worker_pid = killed_host
    deadline = time.monotonic() + 3.0
    while _running(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _running(worker_pid), "the guest process outlived its host"
