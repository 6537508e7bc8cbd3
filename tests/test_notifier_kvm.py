"""The notifier as KVM received it: what change_pte does to a shadow entry, and which records each era sends.

KVM's change_pte handler (kvm_set_pte_rmapp, from the 2009 posting on)
touches only entries that exist: a read-only new PTE (a merge) repoints the
entry, writable bit cleared; a writable one (a copy-on-write) drops it.  A
notifier without change_pte got invalidate_page instead in 2009 only: from
2012 the range calls around change_pte cover it.
"""

from __future__ import annotations

import mmap
import os
import signal
import tempfile
import threading
from typing import Any

import numpy as np
import pytest
import shmksm.workers.shadow
from helpers import merge_pages

import shmksm
import shmksm._kvm.shadow as kvm_shadow
from shmksm import PAGE_SIZE
from shmksm._ksm import ksm
from shmksm._ksm.scanner import Scanner
from shmksm._kvm.shadow import VALID, Shadow, apply_points
from shmksm._mm import mmu_notifier as mn
from shmksm._mm.pagetable import PFN_MASK, PRESENT, WRITE
from shmksm.guest import MADV_MERGEABLE, GuestView

_OLD, _NEW = 7, 9
_REAL_SHADOW_MAIN = kvm_shadow.shadow


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
_PER_CHANGE = {"2009": (1, 1), "2012": (3, 2), "2024": (2, 2), "interval": (2, 2)}


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


# -- the kernel's order: the start of an invalidation before the PTE changes ------------------------------


def _record_order(machine: shmksm.Machine, monkeypatch: pytest.MonkeyPatch,
                  gid: int, page: int) -> list[tuple[str, int]]:
    """Every record of ``page`` appended in this process, with the PTE of the page when it was appended."""
    table = machine.system.table(gid)
    seen: list[tuple[str, int]] = []
    emit_many = mn.Notifier.emit_many

    def recording(self: mn.Notifier, records: Any, g: int, **how: Any) -> int:
        seen.extend((mn.KIND_NAMES[kind & 0xFF], int(table.pv[page])) for kind, a, b in records
                    if g == gid and a <= page < max(b, a + 1))
        return emit_many(self, records, g, **how)

    monkeypatch.setattr(mn.Notifier, "emit_many", recording)
    return seen


@pytest.mark.parametrize("era", mn.ERAS)
@pytest.mark.parametrize("how", ["copy-on-write", "merge", "ksmd", "munmap"])
def test_the_start_comes_before_the_pte_changes(era: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with shmksm.Machine(frames=64, ksmd=False, notifier_era=era) as machine:
        a, b = machine.add_guest(pages=2), machine.add_guest(pages=2)
        for g in (a, b):
            g.view().write(0, b"same" * 1024)
        shadow = machine.add_shadow([a, b])
        if how == "copy-on-write":
            merge_pages(machine, a, 0, b, 0)
        before = int(machine.system.table(a.id).pv[0])
        seen = _record_order(machine, monkeypatch, a.id, 0)
        if how == "copy-on-write":
            a.view().write(0, b"new")
        elif how == "merge":
            merge_pages(machine, b, 0, a, 0)  # a's page is replaced by b's (made a KSM page)
        elif how == "ksmd":
            for g in (a, b):
                g.view().madvise(0, 2 * PAGE_SIZE, MADV_MERGEABLE)
            scanner = Scanner(machine.system)
            for _ in range(2):  # merged in bulk on the second full scan
                scanner.do_scan(100)
        else:
            a.view().munmap(0, 2 * PAGE_SIZE)
        monkeypatch.undo()
        after = int(machine.system.table(a.id).pv[0])
        assert before != after
        starts = [pte for kind, pte in seen if kind in ("invalidate_range_start", "invalidate")]
        ends = [pte for kind, pte in seen if kind in ("invalidate_range_end", "invalidate_end")]
        changes = [pte for kind, pte in seen if kind == "change_pte"]
        if era == "2009" and how != "munmap":
            assert not starts and not ends and changes, "2009: change_pte alone"
        else:
            assert starts and starts[0] == before, "invalidate_range_start is sent before the PTE changes"
            assert ends and ends[-1] == after, "and its end after"
        assert all(pte != before for pte in changes), "change_pte is sent after the PTE changed"
        if how == "munmap":
            assert len(starts) == len(ends) == 1, "munmap sends one range for the whole range"
        shadow.sync()
        shadow.stop()
        machine.check()


# -- synchronous delivery: a shadow never reads a value older than the last completed write -----------------


def _completed_log(prefix: str) -> str:
    """A file where the writer records, per page, the last value whose write has returned."""
    return os.path.join(tempfile.gettempdir(), f"{prefix}.completed")


class _ReadChecker(kvm_shadow.Shadow):
    """The real shadow, comparing every read of guest ``WATCHED`` with the writer's completed writes."""

    watched = -1

    def __init__(self, system: Any, slot: int) -> None:
        super().__init__(system, slot)
        with open(_completed_log(system.spec.prefix), "r+b") as f:
            self.log = mmap.mmap(f.fileno(), 0)
        self.checked = 0
        self.older = 0

    def read(self, gid: int, page: int) -> bytes:
        completed = self.log[page] if gid == self.watched else 0  # before the read
        data = super().read(gid, page)
        if gid == self.watched and data:
            self.checked += 1
            self.older += data[0] < completed
        return data

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "checked": self.checked, "older": self.older}


def _read_checker_main(system: Any, slot: int, guests: list[int], mode: str = "rounds") -> dict[str, Any]:
    _ReadChecker.watched = guests[0]
    kvm_shadow.Shadow = _ReadChecker  # type: ignore[misc]
    return _REAL_SHADOW_MAIN(system, slot, guests, mode)  # type: ignore[no-any-return]


def _write_merge_write(view: GuestView, other_gid: int, pages: int, rounds: int) -> int:
    """``rounds`` times: write value r into every page of both guests (a copy-on-write once they are
    merged), record it as completed, then merge the pairs again.  Returns the writes."""
    other = GuestView(view.system, other_gid)
    ta, tb = view.table, other.table
    with open(_completed_log(view.system.spec.prefix), "r+b") as f:
        log = mmap.mmap(f.fileno(), 0)
    for r in range(1, rounds + 1):
        for i in range(pages):
            view.write(i * PAGE_SIZE, bytes([r]))
            log[i] = r
            other.write(i * PAGE_SIZE, bytes([r]))
        for i in range(pages):
            ksm.try_to_merge_two_pages(ta, i, ta.pv[i] & PFN_MASK, tb, i, tb.pv[i] & PFN_MASK)
    log.close()
    return rounds * pages


@pytest.mark.parametrize("era", mn.ERAS)
def test_a_sync_shadow_never_reads_older_than_the_last_completed_write(era: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pages, rounds = 32, 40
    with shmksm.Machine(frames=4 * pages + 64, ksmd=False, notifier_era=era) as machine:
        a, b = machine.add_guest(pages=pages), machine.add_guest(pages=pages)
        log = _completed_log(machine.system.spec.prefix)
        with open(log, "wb") as f:
            f.write(bytes(pages))
        try:
            monkeypatch.setattr(shmksm.workers.shadow, "shadow", _read_checker_main)
            shadow = machine.add_shadow([a, b], mode="free", sync=True)
            monkeypatch.undo()
            assert machine.spawn(_write_merge_write, a, b.id, pages, rounds).join(120) == rounds * pages
            shadow.sync()
            summary = shadow.stop()
        finally:
            os.unlink(log)
        assert summary["checked"] > 0, "the shadow read nothing"
        assert summary["older"] == 0, f"{summary['older']} reads older than the last completed write"
        assert summary["stale_reads"] == 0
        machine.check()


@pytest.mark.parametrize("era", mn.ERAS)
def test_test_young_came_in_2011(era: str) -> None:
    with shmksm.Machine(frames=16, ksmd=False, notifier_era=era) as machine:
        guest = machine.add_guest(pages=2)
        guest.view().write(0, b"x")
        assert machine.clear_flush_young(guest)[0], "clear_flush_young is there in every era"
        if era == "2009":
            with pytest.raises(shmksm.UsageError, match="2011"):
                machine.clear_flush_young(guest, clear=False)
        else:
            assert not machine.clear_flush_young(guest, clear=False)[0]


def test_unregister_after_the_guest_exited_returns_once_release_ran() -> None:
    """mmu_notifier_unregister after exit_mmap: release has run when it returns."""
    with shmksm.Machine(frames=32, ksmd=False) as machine:
        guest = machine.add_guest(pages=2)
        guest.view().write(0, b"x")
        shadow = machine.add_shadow([guest])
        shadow.round()
        broker = machine.broker
        assert broker is not None
        os.kill(broker.pid, signal.SIGSTOP)  # the release is produced, not delivered
        try:
            machine.remove_guest(guest)
            returned = threading.Event()
            waiter = threading.Thread(target=lambda: (shadow.unregister(guest), returned.set()))
            waiter.start()
            assert not returned.wait(0.5), "unregister returned before the shadow ran release"
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        waiter.join(10)
        assert returned.is_set()
        assert shadow.stats()["releases"] == 1
        shadow.stop()
        machine.check()


def test_interval_invalidations_are_per_interval_and_read_begin_waits() -> None:
    """invalidate(range, cur_seq) sets the sequence of the intervals it covers and holds them until its end."""
    with shmksm.Machine(frames=64, ksmd=False, overcommit=True) as machine:
        guest = machine.add_guest(pages=2 * mn.INTERVAL_PAGES)
        view = guest.view()
        for page in (0, mn.INTERVAL_PAGES):
            view.write(page * PAGE_SIZE, b"x")
        shadow = Shadow(machine.system, 0)
        shadow._table(guest.id)
        seq = 77
        shadow.callback([mn.INVALIDATE | guest.id << 8 | seq << 24, 0, 1, 0])
        assert shadow.iseq[guest.id].tolist() == [seq, 0], "mmu_interval_set_seq: the invalidated interval only"
        # Another interval faults in at once: its sequence did not move.
        assert shadow.fault(guest.id, mn.INTERVAL_PAGES) & VALID
        faulted: list[int] = []
        reader = threading.Thread(target=lambda: faulted.append(shadow.fault(guest.id, 0)))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and not faulted, "read_begin should wait while the invalidation is in progress"
        shadow.callback([mn.INVALIDATE_END | guest.id << 8, 0, 1, 0])
        reader.join(10)
        assert faulted and faulted[0] & VALID


# -- read_retry: the end of an invalidation moves the sequence -------------------------------------


@pytest.mark.parametrize("path", ["callback", "batch"])
def test_a_fault_that_read_its_pte_before_a_change_ended_meanwhile_retries(
        machine: shmksm.Machine, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The start of a merge's invalidation runs before the fault's read_begin (it dropped the
    entry: that is why the page faults), the fault reads the PTE before the merge changes it,
    and the end has run when the fault checks: the entry must not be filled from the old PTE."""
    guest = machine.add_guest(pages=4)
    view = guest.view()
    view.write(PAGE_SIZE, b"a")
    table = machine.system.table(guest.id)
    shadow = Shadow(machine.system, 0)
    shadow._table(guest.id)
    word = guest.id << 8
    shadow.callback([mn.RANGE_START | word, 1, 2, 0])  # ksmd sends the start before it takes the PTL
    old_pte = int(table.pv[1])
    real_catch_up = shadow.catch_up
    changed: list[int] = []

    def catch_up(seq: int, timeout: float = 10.0) -> None:
        if not changed:  # the merge, once the fault has let go of the PTL: the PTE changes, then its end
            with table.ptl(1):
                changed.append(table.cow(1, int(table.pv[1]), dirty=True))  # a new frame; the old one dropped
            end = np.array([[mn.RANGE_END | word, 1, 2, 0]], np.int64)
            if path == "callback":
                shadow.callback(end[0].tolist())
            else:
                shadow._run_points(end, end[:, 0] & 0xFF)
        real_catch_up(seq, timeout)

    monkeypatch.setattr(shadow, "catch_up", catch_up)
    entry = shadow.fault(guest.id, 1)
    assert changed and changed[0] & PFN_MASK != old_pte & PFN_MASK
    assert entry & PFN_MASK == int(table.pv[1]) & PFN_MASK, "the entry maps the frame the PTE maps now"
    assert shadow.summary()["retries"] >= 1
