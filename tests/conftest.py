"""Shared fixtures: a machine checked at teardown, and a guard against /dev/shm leaks.

Every test runs under :func:`no_shm_leak`: whatever a test creates in
/dev/shm — segments (``shmksm_*``) or the named POSIX semaphores behind
``multiprocessing.Lock`` (``sem.mp-*``) — must be gone when it ends.  Both
disappear asynchronously (the resource tracker unlinks a dead host's
segments; a semaphore is unlinked by a finalizer when its lock is collected),
so the guard polls with growing delays before it fails the test.  Entries
of other processes that happen to run at the same time (someone else's
machine, another pytest worker) are told apart and ignored.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator

import pytest

import shmksm
import shmksm._mm.segments
from shmksm._ksm import ksm
from shmksm._mm.pagetable import PFN_MASK

SHM_DIR = "/dev/shm"
LEAK_PREFIXES = ("shmksm_", "sem.mp-")
LEAK_WAIT_SECONDS = 3.0


def shm_entries(prefixes: tuple[str, ...] = LEAK_PREFIXES) -> set[str]:
    """The names in /dev/shm that start with one of ``prefixes``."""
    return {name for name in os.listdir(SHM_DIR) if name.startswith(prefixes)}


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` with growing delays; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _other_processes() -> set[int]:
    """Every process that is neither this one nor one of its descendants, from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    ours = {os.getpid()}
    grew = True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in ours} - ours
        ours |= more
        grew = bool(more)
    return set(parent) - ours


def held_by_others(names: set[str]) -> set[str]:
    """The entries that belong to processes outside this test run.

    Other people's machines may come and go in /dev/shm while the tests run.
    An entry is theirs if its name carries the pid of a live process outside
    this process tree, or if such a process maps it (matched by inode: a
    named semaphore is mapped under the temporary name glibc created it with).
    """
    others = _other_processes()
    inodes = {}
    for name in names:
        try:
            inodes[os.stat(os.path.join(SHM_DIR, name)).st_ino] = name
        except FileNotFoundError:
            continue
    theirs = set()
    for name in names:
        host = name[len(shmksm._mm.segments.PREFIX):].split("_", 1)[0]
        if name.startswith(shmksm._mm.segments.PREFIX) and host.isdigit() and int(host) in others:
            theirs.add(name)
    for pid in others:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].startswith(SHM_DIR) and int(fields[4]) in inodes:
                        theirs.add(inodes[int(fields[4])])
        except (OSError, ValueError):
            continue
    return theirs


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


# -- helpers for the tests that look under the MMU ---------------------------------------------


def pte_of(machine: shmksm.Machine, guest: shmksm.Guest, page: int) -> int:
    """The PTE of ``page`` of ``guest``, read from the host without a lock."""
    return int(machine.system.table(guest.id).pv[page])


def pfn_of(machine: shmksm.Machine, guest: shmksm.Guest, page: int) -> int:
    """The frame that ``page`` of ``guest`` maps (0 for the zero page or an untouched page)."""
    return pte_of(machine, guest, page) & PFN_MASK


def merge_pages(machine: shmksm.Machine, a: shmksm.Guest, apage: int,
                b: shmksm.Guest, bpage: int) -> tuple[int, int]:
    """Merge two pages by hand, with the pfns their PTEs map now; return (kpfn, kgen) or (-1, -1)."""
    ta, tb = machine.system.table(a.id), machine.system.table(b.id)
    return ksm.try_to_merge_two_pages(ta, apage, pfn_of(machine, a, apage), tb, bpage, pfn_of(machine, b, bpage))
