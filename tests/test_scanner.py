"""ksmd: when it merges, what copy-on-write leaves behind, smart_scan, a killed scanner, and a model.

Most tests run the real scanner process.  Where a test must act between two
full scans it lets ksmd finish one and sleep (:func:`pause`), and acts while
it sleeps.  The tests that need exact control drive a
:class:`shmksm._ksm.scanner.Scanner` in the test process instead (``ksmd=False``).
"""

from __future__ import annotations

import signal
from collections import Counter

import numpy as np
import pytest
from helpers import (
    FAST,
    assert_data,
    content,
    fill,
    full_scans,
    ideal,
    ksm_mappings,
    merged_machine,
    pause,
    resume,
    start_ksmd,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shmksm.workers import guest_random

import shmksm
from shmksm import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE
from shmksm._ksm.scanner import RMAP_ITEM_BYTES, Scanner
from shmksm._mm.pagetable import KSM, PFN_MASK, WRITE, ZERO


def write_at(view: shmksm.GuestView, addr: int, data: bytes) -> None:
    """Guest workload: one write."""
    view.write(addr, data)


# -- when merging happens ---------------------------------------------------------------------------


def test_merging_happens_on_the_second_full_scan() -> None:
    n = 64
    # One batch is one full scan, and ksmd sleeps long enough after it for the test to look.
    with shmksm.Machine(frames=2 * n + 16, pages_to_scan=100_000, sleep_millisecs=600) as machine:
        guest = machine.add_guest(pages=n)
        machine.spawn(fill, guest, [1] * n).join(10)
        machine.ksm.run = 1
        machine.wait_full_scans(1)
        c = machine.ksm.counters()
        # The first visit records each page's checksum: every page is volatile.
        assert c["full_scans"] == 1
        assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (0, 0, 0), c
        assert c["pages_volatile"] == n
        assert c["pages_scanned"] == n
        assert ksm_mappings(machine) == (0, 0)
        machine.wait_full_scans(1)
        c = machine.ksm.counters()
        assert c["full_scans"] == 2
        assert (c["pages_shared"], c["pages_sharing"], c["pages_volatile"]) == (1, n - 1, 0), c
        assert ksm_mappings(machine) == (1, n)
        machine.check()


def test_a_guest_made_mergeable_before_run_is_in_the_first_full_scan() -> None:
    with shmksm.Machine(frames=64, ksmd=False, pages_to_scan=100_000, sleep_millisecs=600) as machine:
        a, b = machine.add_guest(pages=4), machine.add_guest(pages=4)
        machine.spawn(fill, a, [1] * 4).join(10)
        start_ksmd(machine)
        machine.spawn(fill, b, [1] * 4).join(10)
        machine.ksm.run = 1
        machine.wait_full_scans(1)
        assert machine.ksm.pages_volatile == 8, "both guests are in the first full scan"
        machine.wait_full_scans(1)
        assert (machine.ksm.pages_shared, machine.ksm.pages_sharing) == (1, 7)


def test_a_range_made_unmergeable_during_a_batch_is_not_merged(machine: shmksm.Machine,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    guest = machine.add_guest(pages=4)
    view = guest.view()
    for page in range(4):
        view.write(page * PAGE_SIZE, content(1))
    view.madvise(0, 4 * PAGE_SIZE, MADV_MERGEABLE)
    scanner = Scanner(machine.system)
    scanner.do_scan(100)
    scan_pages = Scanner._scan_pages

    def unmergeable_meanwhile(self: Scanner, slot: object, pages: object) -> None:
        # The guest's madvise lands after the batch picked its pages, before it merges them.
        view.madvise(0, 4 * PAGE_SIZE, MADV_UNMERGEABLE)
        scan_pages(self, slot, pages)  # type: ignore[arg-type]

    monkeypatch.setattr(Scanner, "_scan_pages", unmergeable_meanwhile)
    scanner.do_scan(100)
    ptes = machine.system.table(guest.id).ptes
    assert not (ptes & np.uint64(KSM)).any(), "pages of a range made unmergeable were merged"


def test_batches_and_full_scans_in_process(machine: shmksm.Machine) -> None:
    """A batch processes at most pages_to_scan pages and ends at the end of a full scan."""
    guest = machine.add_guest(pages=10)
    view = guest.view()
    for page in range(10):
        view.write(page * PAGE_SIZE, content(1))
    view.madvise(0, 10 * PAGE_SIZE, MADV_MERGEABLE)
    scanner = Scanner(machine.system)
    assert [scanner.do_scan(4) for _ in range(3)] == [4, 4, 2]
    assert scanner.full_scans == 1
    assert scanner.pages_shared == 0, "nothing merges on the first full scan"
    assert scanner.do_scan(100) == 10
    assert scanner.full_scans == 2
    assert (scanner.pages_shared, scanner.pages_sharing) == (1, 9)
    c = machine.ksm.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["full_scans"], c["pages_scanned"]) == (1, 9, 2, 20)


@pytest.mark.parametrize("pages", [400, 430])  # a full scan ends at the end of a batch, or inside one
def test_batches_run_together_scan_what_they_would_one_by_one(pages: int) -> None:
    """ksmd's wake-up: ten batches of 100 scanned as one (do_scan_batches) give the same pages, counters
    and batch count, wake-up after wake-up, as ten do_scan(100), full scans ending inside a wake-up."""
    keys = [[1 + (g * 7 + p) % 90 if p % 3 else 1000 * g + p for p in range(pages)] for g in range(3)]
    names = ("pages_scanned", "full_scans", "pages_shared", "pages_sharing", "pages_unshared")
    runs = []
    for together in (False, True):
        with shmksm.Machine(frames=3 * pages * 2, ksmd=False, smart_scan=0) as machine:
            for g, k in zip([machine.add_guest(pages=pages) for _ in keys], keys, strict=True):
                machine.spawn(fill, g, k).join(30)
            scanner = Scanner(machine.system)
            batches, seen = 0, []
            for _ in range(6):
                if together:
                    left = 10
                    while left:
                        ran = scanner.do_scan_batches(100, left)
                        left -= ran
                        batches += ran
                else:
                    for _ in range(10):
                        scanner.do_scan(100)
                        batches += 1
                scanner.publish()
                seen.append((batches, *(getattr(scanner, n) for n in names)))
            machine.check()
        runs.append(seen)
    assert runs[0] == runs[1]
    assert runs[1][-1][2] >= 4 and runs[1][-1][4] > 0, "full scans ended inside wake-ups, and pages merged"


def test_zero_pages_in_the_batch_that_maps_them(machine: shmksm.Machine) -> None:
    """use_zero_pages: empty pages go to the zero page in the pass that merges them, and on no tree."""
    machine.ksm.use_zero_pages = 1
    guest = machine.add_guest(pages=12)
    view = guest.view()
    for page, key in enumerate([0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 0, 4]):
        view.write(page * PAGE_SIZE, content(key) if key else bytes(PAGE_SIZE))
    view.madvise(0, 12 * PAGE_SIZE, MADV_MERGEABLE)
    scanner = Scanner(machine.system)
    scanner.do_scan(100)
    scanner.do_scan(100)
    assert scanner.full_scans == 2
    c = machine.ksm.counters()
    assert (c["ksm_zero_pages"], c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (7, 1, 1, 3), c
    assert view.read(0, 6 * PAGE_SIZE) == bytes(6 * PAGE_SIZE)


def test_a_page_that_keeps_changing_is_never_merged(machine: shmksm.Machine) -> None:
    machine.ksm.smart_scan = 0
    guest = machine.add_guest(pages=4)
    view = guest.view()
    for page, key in enumerate([1, 1, 2, 2]):
        view.write(page * PAGE_SIZE, content(key))
    view.madvise(0, 4 * PAGE_SIZE, MADV_MERGEABLE)
    scanner = Scanner(machine.system)
    for scan in range(6):
        view.write(4 * PAGE_SIZE - 1, bytes([scan + 1]))  # page 3 changes between every two visits
        scanner.do_scan(100)
    c = machine.ksm.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"], c["pages_volatile"]) == (1, 1, 1, 1), c
    ptes = machine.system.table(guest.id).ptes
    assert [bool(p & KSM) for p in ptes.tolist()] == [True, True, False, False]
    assert view.read(2 * PAGE_SIZE, PAGE_SIZE) == content(2)
    assert view.read(3 * PAGE_SIZE, PAGE_SIZE) == content(2)[:-1] + bytes([6])


# -- copy-on-write and ksm_stat --------------------------------------------------------------------


def test_copy_on_write_after_merging_and_ksm_stat() -> None:
    pages = 16
    keys = list(range(1, pages + 1))
    # Without smart_scan, a page that is identical again merges at the second visit.
    machine, guests = merged_machine([keys] * 3, smart_scan=0)
    with machine:
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (pages, 2 * pages)
        tables = [machine.system.table(g.id) for g in guests]
        kpfn = int(tables[0].pv[5]) & PFN_MASK
        assert all(int(t.pv[5]) & PFN_MASK == kpfn for t in tables)

        pause(machine)
        cow = machine.system.get("cow_ksm")
        machine.spawn(write_at, guests[0], 5 * PAGE_SIZE + 100, b"private").join(10)
        assert machine.system.get("cow_ksm") == cow + 1
        pte = int(tables[0].pv[5])
        assert pte & (WRITE | KSM) == WRITE and pte & PFN_MASK != kpfn, "the writer got a private copy"
        for t in tables[1:]:
            assert int(t.pv[5]) & (PFN_MASK | KSM) == kpfn | KSM, "the other guests still map the KSM page"
        assert guests[0].view().read(5 * PAGE_SIZE, PAGE_SIZE) == content(6)[:100] + b"private" + content(6)[107:]
        for g in guests[1:]:
            assert_data(g, keys)
        lazy = machine.ksm.counters()
        assert (lazy["pages_shared"], lazy["pages_sharing"]) == (pages, 2 * pages), "counters are lazy"

        resume(machine)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (pages, 2 * pages - 1)
        stats = [g.ksm_stat() for g in guests]
        assert [s["ksm_merging_pages"] for s in stats] == [pages - 1, pages, pages]
        assert [s["ksm_rmap_items"] for s in stats] == [pages] * 3
        for s in stats:
            profit = (s["ksm_merging_pages"] + s["ksm_zero_pages"]) * PAGE_SIZE - s["ksm_rmap_items"] * RMAP_ITEM_BYTES
            assert s["ksm_process_profit"] == profit
            assert (s["ksm_mergeable"], s["ksm_merge_any"]) == (1, 0)
        assert sum(s["ksm_merging_pages"] for s in stats) == c["pages_shared"] + c["pages_sharing"]
        items = sum(s["ksm_rmap_items"] for s in stats)
        assert c["general_profit"] == (c["pages_sharing"] + c["ksm_zero_pages"]) * PAGE_SIZE - items * RMAP_ITEM_BYTES
        assert ksm_mappings(machine) == (pages, 3 * pages - 1)

        # Identical again: merged again, two full scans later.
        machine.spawn(write_at, guests[0], 5 * PAGE_SIZE + 100, content(6)[100:107]).join(10)
        machine.wait_full_scans(3)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (pages, 2 * pages)
        assert guests[0].ksm_stat()["ksm_merging_pages"] == pages
        for g in guests:
            assert_data(g, keys)
        machine.check()


def test_a_guest_that_goes_away_leaves_the_counters() -> None:
    machine, guests = merged_machine([[1, 1, 2, 3], [1, 2, 3, 3]])
    with machine:
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (3, 5)
        machine.remove_guest(guests[1])
        machine.wait_full_scans(2)
        c = machine.ksm.counters()
        # Contents 2 and 3 keep a KSM page mapped once: shared, but nothing saved.
        assert (c["pages_shared"], c["pages_sharing"]) == (3, 1), c
        assert guests[0].ksm_stat()["ksm_merging_pages"] == 4
        assert_data(guests[0], [1, 1, 2, 3])
        machine.check()



def test_a_guest_removed_as_a_pass_begins_is_left_out_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The host may remove a guest between the scanner's look at the live guests
    # and its attach to the guest's segment, unlinked by then: that guest is left out.
    with shmksm.Machine(frames=256, ksmd=False) as machine:
        guests = [machine.add_guest(pages=4) for _ in range(2)]
        for g in guests:
            machine.spawn(fill, g, [1, 2, 3, 4]).join(60)
        machine.ksm.run = 1
        scanner = Scanner(machine.system)
        table = machine.system.table

        def gone(gid: int) -> object:
            if gid == guests[0].id:
                raise FileNotFoundError(f"the segment of guest {gid}")
            return table(gid)

        monkeypatch.setattr(machine.system, "table", gone)
        scanner.do_scan(100)
        assert [slot.gid for slot in scanner.slots] == [guests[1].id]
        monkeypatch.undo()
        for _ in range(6):
            scanner.do_scan(100)
        assert (machine.system.get("pages_shared"), machine.system.get("pages_sharing")) == (4, 4)


# -- smart_scan -------------------------------------------------------------------------------------


def random_pages(view: shmksm.GuestView, seed: int) -> None:
    """Guest workload: every page gets random bytes (nothing to merge), then MADV_MERGEABLE."""
    data = np.random.default_rng(seed).integers(0, 256, view.size, dtype=np.uint8)
    view.write(0, data)
    view.madvise(0, view.size, MADV_MERGEABLE)


@pytest.mark.parametrize("smart_scan", [0, 1])
def test_smart_scan_skips_pages_that_never_merge(smart_scan: int) -> None:
    n = 256
    with shmksm.Machine(frames=n + 16, smart_scan=smart_scan, **FAST) as machine:
        guest = machine.add_guest(pages=n)
        machine.spawn(random_pages, guest, 7).join(10)
        machine.ksm.run = 1
        machine.wait_full_scans(8)
        pause(machine)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (0, 0)
        if smart_scan:
            assert c["pages_skipped"] > 0
            assert c["pages_scanned"] < c["full_scans"] * n, "skipped pages are not counted as scanned"
        else:
            assert c["pages_skipped"] == 0
            assert c["pages_scanned"] == c["full_scans"] * n
        machine.check()


# -- a scanner killed in the middle of merging ------------------------------------------------------


def test_ksmd_killed_while_merging_then_restarted() -> None:
    nguests, pages, m = 4, 1500, 64
    rng = np.random.default_rng(5)
    # Most pages from 30 contents (about 160 copies each, so several KSM pages per content), 200 unique.
    keys_per_guest = [[int(k) for k in rng.integers(100, 130, pages - 200)] + [10_000 * (g + 1) + i for i in range(200)]
                      for g in range(nguests)]
    want = ideal([k for keys in keys_per_guest for k in keys], m)
    # Batches of 16 pages: the kill must come mid-way also when the host gets the CPU late.
    with shmksm.Machine(frames=nguests * pages * 2, ksmd=False, pages_to_scan=16, sleep_millisecs=0,
                        max_page_sharing=m) as machine:
        guests = [machine.add_guest(pages=pages) for _ in range(nguests)]
        for w in [machine.spawn(fill, g, keys) for g, keys in zip(guests, keys_per_guest, strict=True)]:
            w.join(60)
        start_ksmd(machine)
        machine.ksm.run = 1
        wait_until(lambda: machine.ksm.pages_sharing >= want[1] // 8, 60, "ksmd to start merging")
        ksmd = machine.ksmd
        assert ksmd is not None
        ksmd.kill()
        at_kill = machine.ksm.counters()
        assert at_kill["pages_sharing"] < want[1], "killed before it was done"
        wait_until(lambda: any(d.pid == ksmd.pid for d in machine.deaths), 30, "the host to record ksmd's death")
        death = next(d for d in machine.deaths if d.pid == ksmd.pid)
        assert (death.name, death.signal, death.guest) == ("ksmd", signal.SIGKILL, None)
        machine.check()
        for g, keys in zip(guests, keys_per_guest, strict=True):
            assert_data(g, keys)

        machine.start_ksmd()
        wait_until(lambda: (machine.ksm.pages_shared, machine.ksm.pages_sharing) == want, 60,
                 f"the new ksmd to reach {want}")
        machine.wait_full_scans(2)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == want
        assert ksm_mappings(machine) == (want[0], want[0] + want[1])
        machine.check()
        for g, keys in zip(guests, keys_per_guest, strict=True):
            assert_data(g, keys)


# -- guests writing while ksmd merges ----------------------------------------------------------------


def test_guests_write_while_ksmd_merges() -> None:
    nguests, pages = 3, 64
    with shmksm.Machine(frames=nguests * pages * 2, ksmd=False, pages_to_scan=64, sleep_millisecs=0) as machine:
        guests = [machine.add_guest(pages=pages) for _ in range(nguests)]
        for g in guests:
            g.view().set_memory_merge(True)
        start_ksmd(machine)
        machine.ksm.run = 1
        workers = [machine.spawn(guest_random.run, g, 100 + i, 1.5) for i, g in enumerate(guests)]
        assert [w.join(60) for w in workers] == [0] * nguests, "a guest read back something it did not write"
        assert machine.system.get("cow_ksm") > 0, "no write ever hit a merged page: the race was not exercised"
        machine.wait_full_scans(3)
        machine.ksm.pages_to_scan = 100_000
        pause(machine)
        c = machine.ksm.counters()
        shared, mapped = ksm_mappings(machine)
        assert (c["pages_shared"], c["pages_sharing"]) == (shared, mapped - shared)
        machine.check()


# -- a model: every address reads back the last value written, whatever the scanner did ----------------

NGUESTS = 2
PAGES = 6
ALPHABET = 4  # page contents 0 (empty) to 3

guest_ids = st.integers(0, NGUESTS - 1)
page_ids = st.integers(0, PAGES - 1)
ops = st.one_of(
    st.tuples(st.just("page"), guest_ids, page_ids, st.integers(0, ALPHABET - 1)),
    st.tuples(st.just("poke"), guest_ids, st.integers(0, PAGES * PAGE_SIZE - 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("scan"), st.integers(1, 2 * NGUESTS * PAGES)),
    st.tuples(st.just("scan"), st.just(10_000)),
    st.tuples(st.just("madvise"), guest_ids, page_ids, st.integers(1, PAGES), st.booleans()),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(initial=st.lists(st.integers(0, ALPHABET - 1), min_size=NGUESTS * PAGES, max_size=NGUESTS * PAGES),
       steps=st.lists(ops, max_size=50), max_page_sharing=st.sampled_from([2, 3, 256]),
       use_zero_pages=st.integers(0, 1), smart_scan=st.integers(0, 1))
def test_model_every_address_reads_back_the_last_write(initial: list[int], steps: list[tuple[object, ...]],
                                                       max_page_sharing: int, use_zero_pages: int,
                                                       smart_scan: int) -> None:
    with shmksm.Machine(frames=4 * NGUESTS * PAGES + 8, ksmd=False, max_page_sharing=max_page_sharing,
                        use_zero_pages=use_zero_pages, smart_scan=smart_scan) as machine:
        guests = [machine.add_guest(pages=PAGES) for _ in range(NGUESTS)]
        views = [g.view() for g in guests]
        model = [bytearray(PAGES * PAGE_SIZE) for _ in guests]
        mergeable = [np.ones(PAGES, np.bool_) for _ in guests]
        for i, key in enumerate(initial):
            g, page = divmod(i, PAGES)
            views[g].write(page * PAGE_SIZE, content(key))
            model[g][page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = content(key)
        for v in views:
            v.madvise(0, PAGES * PAGE_SIZE, MADV_MERGEABLE)
        scanner = Scanner(machine.system)
        full_scans(scanner, 2)

        for step in steps:
            match step:
                case ("page", int(g), int(page), int(key)):
                    views[g].write(page * PAGE_SIZE, content(key))
                    model[g][page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = content(key)
                case ("poke", int(g), int(addr), bytes(data)):
                    data = data[:PAGES * PAGE_SIZE - addr]
                    views[g].write(addr, data)
                    model[g][addr:addr + len(data)] = data
                case ("scan", int(n)):
                    scanner.do_scan(n)
                case ("madvise", int(g), int(page), int(n), bool(merge)):
                    n = min(n, PAGES - page)
                    views[g].madvise(page * PAGE_SIZE, n * PAGE_SIZE, MADV_MERGEABLE if merge else MADV_UNMERGEABLE)
                    mergeable[g][page:page + n] = merge
            for v, want in zip(views, model, strict=True):
                assert v.read(0, PAGES * PAGE_SIZE) == want

        full_scans(scanner, 3)
        for v, want in zip(views, model, strict=True):
            assert v.read(0, PAGES * PAGE_SIZE) == want
        machine.check()

        # The counters agree with the page tables once every page was visited since the last write.
        c = machine.ksm.counters()
        shared, mapped = ksm_mappings(machine)
        assert (c["pages_shared"], c["pages_sharing"]) == (shared, mapped - shared)
        assert sum(g.ksm_stat()["ksm_merging_pages"] for g in guests) == mapped
        frames = machine.system.frames
        private: Counter[bytes] = Counter()
        ksm_by_content: dict[bytes, list[int]] = {}
        for g in range(NGUESTS):
            ptes = machine.system.table(guests[g].id).ptes
            for page in range(PAGES):
                pte = int(ptes[page])
                data = bytes(model[g][page * PAGE_SIZE:(page + 1) * PAGE_SIZE])
                if pte & KSM and not pte & ZERO:
                    assert frames.mapcount[pte & PFN_MASK] <= max_page_sharing
                    ksm_by_content.setdefault(data, []).append(pte & PFN_MASK)
                if not mergeable[g][page]:
                    assert not pte & KSM, "a page outside every mergeable range maps a KSM page"
                elif not pte & KSM:
                    private[data] += 1
                if pte & ZERO and pte & KSM:
                    assert use_zero_pages and data == bytes(PAGE_SIZE)
        if not smart_scan:
            # No merge was missed: at most one page per content stays private, and only
            # when every KSM page of that content is full.
            for data, count in private.items():
                assert count <= 1, "two identical mergeable pages were left unmerged"
                assert not (use_zero_pages and data == bytes(PAGE_SIZE)), "an empty page missed the zero page"
                for kpfn in set(ksm_by_content.get(data, [])):
                    assert frames.mapcount[kpfn] == max_page_sharing, "a KSM page with room was not used"
