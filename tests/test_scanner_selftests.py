"""The kernel's KSM selftests (ksm_tests.c, ksm_functional_tests.c), run against ksmd.

Each test has guest processes write and madvise their memory, starts the
machine's ksmd process, lets it scan (``pages_to_scan`` large so that one
batch is one full scan, ``sleep_millisecs`` 0) and checks the counters of
/sys/kernel/mm/ksm and /proc/PID/ksm_stat against what the selftests expect
of the kernel (see ``reference/linux-ksm.md``, "Selftest expectations").

The helpers here (page contents, guest workloads, :func:`merged_machine`,
:func:`pause` and :func:`resume`) serve test_scanner.py, test_knobs.py and
test_runner.py too.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    advise,
    assert_data,
    content,
    distinct_frames,
    merge_switch_off,
    merged_machine,
    pause,
    poke_byte,
    poke_each,
    resume,
    selftest_expectation,
    wait_until,
)

from shmksm import MADV_UNMERGEABLE, PAGE_SIZE
from shmksm._ksm.scanner import RMAP_ITEM_BYTES
from shmksm._mm.pagetable import KSM, PFN_MASK, ZERO

# -- ksm_tests.c: merging identical pages, with and without max_page_sharing -----------------------


@pytest.mark.parametrize(("n", "m", "shared", "sharing"), [
    (10, 256, 1, 9),
    (1000, 256, 4, 996),
    (2, 2, 1, 1),
    (7, 3, 2, 4),
    (8, 3, 3, 5),
    (9, 3, 3, 6),
    (10, 3, 3, 6),
])
def test_merge_identical_pages(n: int, m: int, shared: int, sharing: int) -> None:
    assert selftest_expectation(n, m) == (shared, sharing)
    machine, (guest,) = merged_machine([[1] * n], max_page_sharing=m)
    with machine:
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (shared, sharing), c
        assert c["full_scans"] >= 2
        # A page left over when every KSM page is full waits in the unstable tree,
        # or counts as volatile while smart_scan skips it.
        assert c["pages_unshared"] + c["pages_volatile"] == n - shared - sharing
        chained = shared > 1
        assert (c["stable_node_chains"], c["stable_node_dups"]) == (int(chained), shared if chained else 0)
        stat = guest.ksm_stat()
        assert stat["ksm_rmap_items"] == n
        assert stat["ksm_merging_pages"] == shared + sharing
        # The counters are stable: further scans change nothing.
        machine.wait_full_scans(2)
        again = machine.ksm.counters()
        assert (again["pages_shared"], again["pages_sharing"]) == (shared, sharing)
        # Every KSM page is mapped by at most max_page_sharing PTEs.
        pfns = machine.system.table(guest.id).ptes & np.uint64(PFN_MASK)
        assert np.bincount(pfns.astype(np.int64)).max() <= m
        assert_data(guest, [1] * n)
        machine.check()


def test_merge_across_guests() -> None:
    """The same content in three guests' processes merges into one KSM page."""
    machine, guests = merged_machine([[1, 2, 3]] * 3)
    with machine:
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (3, 6)
        for g in guests:
            assert g.ksm_stat()["ksm_merging_pages"] == 3
            assert_data(g, [1, 2, 3])
        kpfns = [machine.system.table(g.id).ptes[:3] & np.uint64(PFN_MASK) for g in guests]
        assert all((k == kpfns[0]).all() for k in kpfns), "one KSM page per content, mapped by every guest"
        machine.check()


# -- ksm_tests.c: unmerging by writes --------------------------------------------------------------


def test_unmerge_by_writes() -> None:
    machine, (guest,) = merged_machine([[1, 1]])
    with machine:
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (1, 1)
        # The writes happen between two full scans: the next one must drop both pages.
        pause(machine)
        machine.spawn(poke_each, guest, 0, 2, 0x41).join(10)
        lazy = machine.ksm.counters()
        assert (lazy["pages_shared"], lazy["pages_sharing"]) == (1, 1), "counters drop when ksmd visits, not before"
        resume(machine)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (0, 0), c
        view = guest.view()
        for i in range(2):
            assert view.read(i * PAGE_SIZE, PAGE_SIZE) == poke_byte(0x41, i) + content(1)[1:]
        distinct_frames(machine, [guest])
        machine.check()


# -- ksm_tests.c / ksm_functional_tests.c: zero pages ----------------------------------------------


@pytest.mark.parametrize("use_zero_pages", [0, 1])
def test_zero_pages(use_zero_pages: int) -> None:
    n = 10
    machine, (guest,) = merged_machine([[0] * n], use_zero_pages=use_zero_pages)
    with machine:
        machine.wait_full_scans(1)
        c = machine.ksm.counters()
        stat = guest.ksm_stat()
        ptes = machine.system.table(guest.id).ptes
        if use_zero_pages:
            assert (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"]) == (0, 0, n), c
            assert c["pages_unshared"] == 0, "a page on the zero page is on no tree"
            assert stat["ksm_zero_pages"] == n
            assert ((ptes & np.uint64(ZERO | KSM)) == np.uint64(ZERO | KSM)).all()
            # A page mapped to the zero page is not anonymous memory any more: its rmap item goes.
            assert c["general_profit"] == n * PAGE_SIZE - stat["ksm_rmap_items"] * RMAP_ITEM_BYTES
        else:
            assert (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"]) == (1, n - 1, 0), c
            assert stat["ksm_zero_pages"] == 0
        assert guest.view().read(0, n * PAGE_SIZE) == bytes(n * PAGE_SIZE)
        machine.check()


def test_unmerge_zero_pages() -> None:
    """ksm_functional_tests.c test_unmerge_zero_pages: MADV_UNMERGEABLE and writes drop ksm_zero_pages."""
    n = 512
    machine, (guest,) = merged_machine([[0] * n], use_zero_pages=1)
    with machine:
        assert machine.ksm.counters()["ksm_zero_pages"] == n
        assert guest.ksm_stat()["ksm_zero_pages"] == n
        pause(machine)
        machine.spawn(advise, guest, 0, n // 2, MADV_UNMERGEABLE).join(10)
        assert machine.ksm.counters()["ksm_zero_pages"] == n // 2
        assert guest.ksm_stat()["ksm_zero_pages"] == n // 2
        machine.spawn(poke_each, guest, n // 2, n // 2, 1).join(10)
        assert machine.ksm.counters()["ksm_zero_pages"] == 0
        assert guest.ksm_stat()["ksm_zero_pages"] == 0
        view = guest.view()
        assert view.read(0, n // 2 * PAGE_SIZE) == bytes(n // 2 * PAGE_SIZE)
        for i in range(n // 2):
            page = view.read((n // 2 + i) * PAGE_SIZE, PAGE_SIZE)
            assert page == poke_byte(1, i) + bytes(PAGE_SIZE - 1)
        machine.check()


# -- ksm_functional_tests.c: MADV_UNMERGEABLE, prctl off, run=2 ------------------------------------

KEYS = [1] * 40 + [2] * 20 + [0] * 8 + list(range(10, 34))


@pytest.mark.parametrize("how", ["madvise", "prctl", "run2"])
def test_unmerge_leaves_no_shared_frame(how: str) -> None:
    machine, guests = merged_machine([KEYS, KEYS], merge="prctl" if how == "prctl" else "madvise")
    with machine:
        c = machine.ksm.counters()
        # Contents 1, 2 and 0 within and across guests, and 24 pages common to both guests.
        assert (c["pages_shared"], c["pages_sharing"]) == (3 + 24, 79 + 39 + 15 + 24), c
        if how == "run2":
            machine.ksm.run = 2
            wait_until(lambda: machine.ksm.pages_shared == 0 and machine.ksm.pages_sharing == 0, 10,
                     "run=2 to unmerge everything")
        else:
            pause(machine)
            if how == "madvise":
                workers = [machine.spawn(advise, g, 0, len(KEYS), MADV_UNMERGEABLE) for g in guests]
            else:
                workers = [machine.spawn(merge_switch_off, g) for g in guests]
            for w in workers:
                w.join(10)
            distinct_frames(machine, guests)
            # Nothing left to scan: the counters drop as ksmd visits the guests again.
            resume(machine, 2)
            for g in guests:
                assert g.ksm_stat()["ksm_merge_any"] == 0
                assert g.ksm_stat()["ksm_mergeable"] == 0
        distinct_frames(machine, guests)
        machine.check()
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (0, 0, 0), c
        if how == "run2":
            assert c["full_scans"] == 0, "run=2 resets full_scans"
            for g in guests:
                assert g.ksm_stat()["ksm_rmap_items"] == 0
        for g in guests:
            assert g.ksm_stat()["ksm_merging_pages"] == 0
            assert_data(g, KEYS)


def test_run2_then_run1_merges_again() -> None:
    machine, guests = merged_machine([[1] * 8, [1] * 8])
    with machine:
        assert machine.ksm.pages_sharing == 15
        machine.ksm.run = 2
        wait_until(lambda: machine.ksm.pages_sharing == 0, 10, "run=2 to unmerge")
        distinct_frames(machine, guests)
        machine.ksm.run = 1
        machine.wait_full_scans(2)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (1, 15)
        for g in guests:
            assert_data(g, [1] * 8)
        machine.check()
