"""Merging by hand with the primitives of mm/ksm.c, copy-on-write, and both under concurrency."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time

import numpy as np
import pytest
from helpers import merge_pages, pfn_of, pte_of
from shmksm.workers import guest_random

import shmksm
from shmksm import PAGE_SIZE
from shmksm._ksm import ksm
from shmksm._ksm.ksm import break_ksm, unmerge_range
from shmksm._mm.frames import KSM as FRAME_KSM
from shmksm._mm.frames import WAITING
from shmksm._mm.pagetable import KSM, KSM_ZERO_PTE, PFN_MASK, PRESENT, UNMAPPED, WRITE, ZERO


def page_of(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()


def test_merge_two_pages_then_copy_on_write(machine: shmksm.Machine) -> None:
    a, b = machine.add_guest(pages=4), machine.add_guest(pages=4)
    va, vb = a.view(), b.view()
    same = page_of(1)
    va.write(0, same)
    vb.write(PAGE_SIZE, same)
    apfn, bpfn = pfn_of(machine, a, 0), pfn_of(machine, b, 1)
    frames = machine.system.frames
    free = machine.free_frames()

    kpfn, kgen = merge_pages(machine, a, 0, b, 1)
    assert (kpfn, kgen) == (apfn, frames.gen[apfn]), "the first page becomes the KSM page in place"
    for guest, page in ((a, 0), (b, 1)):
        pte = pte_of(machine, guest, page)
        assert pte & PFN_MASK == kpfn
        assert pte & (PRESENT | KSM | WRITE) == PRESENT | KSM
    assert frames.mapcount[kpfn] == 2
    assert frames.flags[kpfn] & FRAME_KSM
    assert frames.flags[bpfn] == WAITING, "the merged-away frame waits for reclamation"
    machine.reclaim()
    assert machine.free_frames() == free + 1
    machine.check()

    cow = machine.system.get("cow_ksm")
    vb.write(PAGE_SIZE + 5, b"!")
    assert machine.system.get("cow_ksm") == cow + 1
    pte = pte_of(machine, b, 1)
    assert pte & (KSM | WRITE) == WRITE
    assert pte & PFN_MASK != kpfn
    assert frames.mapcount[kpfn] == 1
    assert va.read(0, PAGE_SIZE) == same, "a write through one mapping changed the other"
    assert vb.read(PAGE_SIZE, PAGE_SIZE) == same[:5] + b"!" + same[6:]
    machine.check()

    # The last mapping of a KSM page still copies on write: the page stays write-protected.
    va.write(0, b"?")
    assert machine.system.get("cow_ksm") == cow + 2
    assert pfn_of(machine, a, 0) != kpfn
    assert frames.flags[kpfn] == WAITING
    assert va.read(0, PAGE_SIZE) == b"?" + same[1:]
    machine.check()


def test_merge_into_an_existing_ksm_page(machine: shmksm.Machine) -> None:
    guests = [machine.add_guest(pages=2) for _ in range(4)]
    same = page_of(2)
    for g in guests:
        g.view().write(PAGE_SIZE, same)
    kpfn, kgen = merge_pages(machine, guests[0], 1, guests[1], 1)
    assert kpfn > 0
    for g in guests[2:]:
        table = machine.system.table(g.id)
        assert ksm.try_to_merge_one_page(table, 1, pfn_of(machine, g, 1), kpfn, kgen)
    assert machine.system.frames.mapcount[kpfn] == 4
    assert all(pfn_of(machine, g, 1) == kpfn for g in guests)
    machine.check()
    # Every guest writes its own byte: four private copies, the other bytes untouched.
    for i, g in enumerate(guests):
        g.view().write(PAGE_SIZE + i, bytes([i ^ same[i] ^ 0xFF]))
    for i, g in enumerate(guests):
        want = bytearray(same)
        want[i] = i ^ same[i] ^ 0xFF
        assert g.view().read(PAGE_SIZE, PAGE_SIZE) == want
    assert len({pfn_of(machine, g, 1) for g in guests}) == 4
    machine.check()


def test_merges_that_must_be_refused(machine: shmksm.Machine) -> None:
    a, b, c = (machine.add_guest(pages=2) for _ in range(3))
    va, vb, vc = a.view(), b.view(), c.view()
    ta, tb, tc = (machine.system.table(g.id) for g in (a, b, c))
    va.write(0, page_of(3))
    vb.write(0, page_of(4))

    # Different content: nothing merges, and the first page gets its private page back.
    assert merge_pages(machine, a, 0, b, 0) == (-1, -1)
    assert not pte_of(machine, a, 0) & KSM
    assert not pte_of(machine, b, 0) & KSM
    assert va.read(0, PAGE_SIZE) == page_of(3)
    assert vb.read(0, PAGE_SIZE) == page_of(4)
    machine.check()

    # A stale pfn (the page was remapped since it was read) is refused.
    vb.write(0, page_of(3))
    stale = pfn_of(machine, b, 0)
    vb.munmap(0, PAGE_SIZE)
    assert ksm.try_to_merge_two_pages(ta, 0, pfn_of(machine, a, 0), tb, 0, stale) == (-1, -1)
    assert pte_of(machine, b, 0) == UNMAPPED

    # A KSM page named by a stale generation is refused, even if its frame is reused.
    vc.write(0, page_of(3))
    kpfn, kgen = merge_pages(machine, a, 0, c, 0)
    assert kpfn > 0
    va.write(0, b"x")
    vc.write(0, b"x")
    machine.reclaim()
    vc.write(PAGE_SIZE, page_of(3))
    va.write(PAGE_SIZE, page_of(3))
    assert pfn_of(machine, c, 1) == kpfn, "the test wants the KSM page's frame reused"
    assert not ksm.try_to_merge_one_page(tc, 1, pfn_of(machine, c, 1), kpfn, kgen)
    assert not ksm.try_to_merge_one_page(ta, 1, pfn_of(machine, a, 1), kpfn, kgen)
    assert not pte_of(machine, c, 1) & KSM
    # A refused page stays private: its next write reuses the frame in place.
    before = pfn_of(machine, c, 1)
    vc.write(PAGE_SIZE, b"y")
    assert pfn_of(machine, c, 1) == before
    assert vc.read(PAGE_SIZE, PAGE_SIZE) == b"y" + page_of(3)[1:]
    # A page is never merged with itself.
    assert merge_pages(machine, a, 1, a, 1) == (-1, -1)
    assert va.read(PAGE_SIZE, PAGE_SIZE) == page_of(3)
    machine.check()


def test_unmerge_range_and_break_ksm(machine: shmksm.Machine) -> None:
    a, b = machine.add_guest(pages=8), machine.add_guest(pages=8)
    ta, tb = machine.system.table(a.id), machine.system.table(b.id)
    same = page_of(5)
    for page in range(8):
        a.view().write(page * PAGE_SIZE, same)
        b.view().write(page * PAGE_SIZE, same)
    for page in range(8):
        assert merge_pages(machine, a, page, b, page)[0] > 0
    cow = machine.system.get("cow_ksm")
    assert unmerge_range(ta, 2, 6) == 4
    assert unmerge_range(ta, 2, 6) == 0
    assert [bool(pte_of(machine, a, p) & KSM) for p in range(8)] == [True] * 2 + [False] * 4 + [True] * 2
    assert break_ksm(tb, 0) == 1
    assert break_ksm(tb, 0) == 0
    assert machine.system.get("cow_ksm") == cow + 5
    assert a.view().read(0, 8 * PAGE_SIZE) == same * 8
    assert b.view().read(0, 8 * PAGE_SIZE) == same * 8
    machine.check()


def test_ksm_zero_page(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=2)
    view = guest.view()
    table = machine.system.table(guest.id)
    view.write(0, bytes(PAGE_SIZE))
    view.write(PAGE_SIZE, b"\x01")
    free = machine.free_frames()
    with table.ptl(0):  # type: ignore[attr-defined]
        assert ksm.replace_with_zero_page(table, 0, pfn_of(machine, guest, 0))
    with table.ptl(1):  # type: ignore[attr-defined]
        assert not ksm.replace_with_zero_page(table, 1, pfn_of(machine, guest, 1))
    assert pte_of(machine, guest, 0) == KSM_ZERO_PTE
    assert machine.ksm.counters()["ksm_zero_pages"] == 1
    machine.reclaim()
    assert machine.free_frames() == free + 1
    machine.check()
    assert break_ksm(table, 0) == 1
    assert pte_of(machine, guest, 0) & (WRITE | ZERO | KSM) == WRITE
    assert view.read(0, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert not machine.system.frames.pool[0].any()
    machine.check()


def _write_byte(view: shmksm.GuestView, addr: int, value: int) -> bytes:
    view.write(addr, bytes([value]))
    return view.read(addr - addr % PAGE_SIZE, PAGE_SIZE)


def test_a_guest_process_writes_into_a_merged_page(machine: shmksm.Machine) -> None:
    a, b = machine.add_guest(pages=2), machine.add_guest(pages=2)
    same = page_of(6)
    a.view().write(PAGE_SIZE, same)
    b.view().write(PAGE_SIZE, same)
    kpfn, _ = merge_pages(machine, a, 1, b, 1)
    assert kpfn > 0
    got = machine.spawn(_write_byte, b, PAGE_SIZE + 100, same[100] ^ 1).join(30)
    assert got == same[:100] + bytes([same[100] ^ 1]) + same[101:]
    assert a.view().read(PAGE_SIZE, PAGE_SIZE) == same
    assert pfn_of(machine, a, 1) == kpfn
    assert pfn_of(machine, b, 1) != kpfn
    assert machine.system.get("cow_ksm") == 1
    machine.check()


# -- concurrency: guests write while the host merges and unmerges under them -----------------


class HandMerger:
    """A tiny ksmd in the test process: finds identical pages by content, merges, unmerges."""

    def __init__(self, machine: shmksm.Machine, guests: list[shmksm.Guest], seed: int) -> None:
        self.machine = machine
        self.tables = [machine.system.table(g.id) for g in guests]
        self.rng = random.Random(seed)
        self.stable: dict[bytes, tuple[int, int]] = {}
        self.merged = self.refused = self.unmerged = 0

    def merge_round(self, samples: int = 64) -> None:
        unstable: dict[bytes, tuple[object, int, int]] = {}
        for _ in range(samples):
            table = self.rng.choice(self.tables)
            page = self.rng.randrange(table.pages)
            pte = int(table.pv[page])
            if pte & (PRESENT | ZERO | UNMAPPED | KSM) != PRESENT:
                continue
            pfn = pte & PFN_MASK
            content = ksm.page_bytes(self.machine.system.frames, pfn)  # a hint: the guest may be writing
            if content in self.stable:
                kpfn, kgen = self.stable[content]
                ok = ksm.try_to_merge_one_page(table, page, pfn, kpfn, kgen)
                if not ok:
                    del self.stable[content]
            elif content in unstable and unstable[content][:2] != (table, page):
                other, opage, opfn = unstable.pop(content)
                kpfn, kgen = ksm.try_to_merge_two_pages(other, opage, opfn, table, page, pfn)  # type: ignore[arg-type]
                ok = kpfn >= 0
                if ok:
                    self.stable[content] = (kpfn, kgen)
            else:
                unstable[content] = (table, page, pfn)
                continue
            self.merged += ok
            self.refused += not ok

    def unmerge_round(self) -> None:
        table = self.rng.choice(self.tables)
        if self.rng.random() < 0.5:
            start = self.rng.randrange(table.pages)
            self.unmerged += unmerge_range(table, start, min(table.pages, start + 8))
        else:
            self.unmerged += break_ksm(table, self.rng.randrange(table.pages))


@pytest.mark.parametrize("seconds", [pytest.param(2.0, id="2s"),
                                     pytest.param(30.0, id="30s", marks=pytest.mark.stress)])
def test_merging_under_concurrent_guests(seconds: float) -> None:
    nguests, pages = 4, 48
    # Slack for copy-on-write: a copy is made before the old frame is dropped.
    with shmksm.Machine(frames=nguests * pages + 16, ksmd=False) as machine:
        guests = [machine.add_guest(pages=pages) for _ in range(nguests)]
        workers = [machine.spawn(guest_random.run, g, 1000 + i, seconds) for i, g in enumerate(guests)]
        merger = HandMerger(machine, guests, seed=7)
        cow_before = machine.system.get("cow_ksm")
        checks = rounds = 0
        deadline = time.monotonic() + seconds + 30
        while any(w.is_alive() for w in workers):
            assert time.monotonic() < deadline, "the guests did not finish"
            merger.merge_round()
            rounds += 1
            if rounds % 3 == 0:
                merger.unmerge_round()
            if checks < 20 and merger.merged > 20 * checks:
                machine.check()  # stops the world: every guest waits at a lock
                checks += 1
        assert [w.join(10) for w in workers] == [0] * nguests, "a guest read back something it did not write"
        assert merger.merged > 20, f"too few merges to mean anything ({merger.merged})"
        assert merger.unmerged > 0
        assert machine.system.get("cow_ksm") > cow_before, "no guest ever wrote into a merged page"
        machine.check()


def test_out_of_frames_the_last_mapping_keeps_its_ksm_page_once_the_shadows_ran_the_others() -> None:
    """Out of frames, a write to the last mapping of a KSM page makes the page itself private again
    (no copy) -- but only once every shadow has run the invalidations of the page's other mappings:
    a shadow that still maps the page through another guest's old entry would read the writer's bytes."""
    with shmksm.Machine(frames=8, overcommit=True, ksmd=False) as machine:
        a, b = machine.add_guest(pages=8), machine.add_guest(pages=8)
        va, vb = a.view(), b.view()
        va.write(0, page_of(1))
        vb.write(0, page_of(1))
        kpfn, _ = merge_pages(machine, a, 0, b, 0)
        assert kpfn > 0
        shadow = machine.add_shadow([b])
        assert shadow.round()["faults"] >= 1  # b's page 0 is mapped through the KSM page
        os.kill(shadow.worker.pid, signal.SIGSTOP)  # it runs no invalidation from here on
        try:
            vb.write(0, b"B")  # copy-on-write: b leaves the KSM page, a is its last mapping
            page = 1
            with contextlib.suppress(shmksm.OutOfFrames):
                while True:  # take every frame there is
                    va.write(page * PAGE_SIZE, b"x")
                    page += 1
            assert machine.system.frames.mc[kpfn] == 1
            with pytest.raises(shmksm.OutOfFrames, match="did not acknowledge"):
                va.write(0, b"A")  # waits its bound for the stopped shadow, then gives up
            assert va.read(0, PAGE_SIZE) == page_of(1)
            assert pfn_of(machine, a, 0) == kpfn and not pte_of(machine, a, 0) & WRITE
        finally:
            os.kill(shadow.worker.pid, signal.SIGCONT)
        va.write(0, b"A")
        assert va.read(0, PAGE_SIZE) == b"A" + page_of(1)[1:PAGE_SIZE]
        assert pfn_of(machine, a, 0) == kpfn, "no frame was free: the KSM page itself became a's"
        assert not machine.system.frames.fl[kpfn] & FRAME_KSM
        assert shadow.round()["stale_reads"] == 0
        machine.check()
