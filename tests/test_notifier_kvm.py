"""The notifier as KVM received it: what change_pte does to a shadow entry, and which records each era sends.

KVM's change_pte handler (kvm_set_pte_rmapp, from the 2009 posting on)
touches only entries that exist: a read-only new PTE (a merge) repoints the
entry, writable bit cleared; a writable one (a copy-on-write) drops it.  A
notifier without change_pte got invalidate_page instead in 2009 only: from
2012 the range calls around change_pte cover it.
"""

from __future__ import annotations

import numpy as np
import pytest

import shmksm
from shmksm import PAGE_SIZE
from shmksm._kvm.shadow import VALID, Shadow, apply_points
from shmksm._mm import mmu_notifier as mn
from shmksm._mm.pagetable import PFN_MASK, PRESENT, WRITE

_OLD, _NEW = 7, 9


def _entry(pfn: int, writable: bool) -> int:
    return pfn | PRESENT | (WRITE if writable else 0) | VALID


@pytest.mark.parametrize("path", ["callback", "batch"])
def test_a_read_only_change_pte_repoints_the_entry_read_only(machine: shmksm.Machine, path: str) -> None:
    shadow = Shadow(machine.system, 0)
    guest = machine.add_guest(pages=4)
    spte = shadow._table(guest.id)
    spte[1] = _entry(_OLD, writable=True)
    if path == "callback":
        shadow.callback([mn.CHANGE_PTE | guest.id << 8, 1, _NEW | PRESENT, 0])
    else:
        kind = np.array([mn.CHANGE_PTE], np.int64)
        apply_points(spte, shadow.sgen[guest.id], shadow.gen, kind, np.array([1], np.int64),
                     np.array([_NEW | PRESENT], np.int64))
    entry = int(spte[1])
    assert entry & VALID and entry & PFN_MASK == _NEW, "the entry should map the new frame"
    assert not entry & WRITE, "a repointed entry is read-only"


@pytest.mark.parametrize("path", ["callback", "batch"])
def test_a_writable_change_pte_drops_the_entry(machine: shmksm.Machine, path: str) -> None:
    shadow = Shadow(machine.system, 0)
    guest = machine.add_guest(pages=4)
    spte = shadow._table(guest.id)
    spte[1] = spte[2] = _entry(_OLD, writable=False)
    new = _NEW | PRESENT | WRITE
    if path == "callback":
        shadow.callback([mn.CHANGE_PTE | guest.id << 8, 1, new, 0])
        updated = 0
    else:
        kind = np.array([mn.CHANGE_PTE, mn.CHANGE_PTE], np.int64)
        updated, _, _ = apply_points(spte, shadow.sgen[guest.id], shadow.gen, kind, np.array([1, 2], np.int64),
                                     np.array([new, _NEW | PRESENT], np.int64))
        assert int(spte[2]) & PFN_MASK == _NEW, "the read-only one of the batch is repointed"
    assert spte[1] == 0, "a writable host PTE drops the entry: the next access faults"
    assert updated <= 1


def test_change_pte_leaves_a_missing_entry_missing(machine: shmksm.Machine) -> None:
    shadow = Shadow(machine.system, 0)
    guest = machine.add_guest(pages=4)
    shadow.callback([mn.CHANGE_PTE | guest.id << 8, 3, _NEW | PRESENT, 0])
    assert shadow._table(guest.id)[3] == 0


# Records per PTE change, for a notifier with and without change_pte.
_PER_CHANGE = {"2009": (1, 1), "2012": (3, 2), "2024": (2, 2), "interval": (1, 1)}


@pytest.mark.parametrize("era", mn.ERAS)
def test_records_a_notifier_gets_per_change(era: str) -> None:
    pages = 8
    with shmksm.Machine(frames=64, ksmd=False, notifier_era=era) as machine:
        guest = machine.add_guest(pages=pages)
        with_cp = machine.add_shadow([guest])
        without = machine.add_shadow([guest], change_pte=False)
        for s in (with_cp, without):
            assert s.round()["faults"] == pages  # the zero page, mapped by the reads
            s.sync()
        before = {s: s.stats()["messages"] for s in (with_cp, without)}
        view = guest.view()
        for page in range(pages):
            view.write(page * PAGE_SIZE, b"x")  # the zero page → a private page: one change_pte each
        for s in (with_cp, without):
            s.sync()
        got = tuple((s.stats()["messages"] - before[s]) / pages for s in (with_cp, without))
        assert got == _PER_CHANGE[era]
        for s in (with_cp, without):
            assert s.round()["faults"] == pages, "a writable new PTE: the entry went in every era"
            s.stop()
        machine.check()
