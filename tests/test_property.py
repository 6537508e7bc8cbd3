"""A stateful property test: guests against plain bytearrays, whatever merging and unmerging did.

Hypothesis drives two small guests through writes, reads, copies of one page
onto another (to make duplicates), hand merges with the primitives of
mm/ksm.c, unmerges and munmaps, and checks after every step that every
address reads back the last value written to it and that the machine's
accounting holds.
"""

from __future__ import annotations

import numpy as np
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shmksm
from shmksm import PAGE_SIZE
from shmksm._ksm import ksm
from shmksm._ksm.ksm import break_ksm, unmerge_range
from shmksm._mm.pagetable import KSM, PFN_MASK, PRESENT, UNMAPPED, ZERO

NGUESTS = 2
PAGES = 6
SIZE = PAGES * PAGE_SIZE
PATTERNS = [bytes([0x11]) * PAGE_SIZE, bytes(range(256)) * 16, bytes(PAGE_SIZE)]

guests = st.integers(0, NGUESTS - 1)
pages = st.integers(0, PAGES - 1)
page_refs = st.tuples(guests, pages)
addresses = st.integers(0, SIZE - 1)
data = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda fill, n: bytes([fill]) * n, st.integers(0, 255), st.integers(PAGE_SIZE - 8, 2 * PAGE_SIZE + 8)),
    st.sampled_from(PATTERNS),
)


class GuestsAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.machine = shmksm.Machine(frames=NGUESTS * PAGES + 8, ksmd=False)
        self.guests = [self.machine.add_guest(pages=PAGES) for _ in range(NGUESTS)]
        self.views = [g.view() for g in self.guests]
        self.tables = [self.machine.system.table(g.id) for g in self.guests]
        self.models = [bytearray(SIZE) for _ in range(NGUESTS)]
        self.unmapped: list[set[int]] = [set() for _ in range(NGUESTS)]

    def teardown(self) -> None:
        try:
            self.machine.check()
        finally:
            self.machine.close()

    # -- helpers ---------------------------------------------------------------------------

    def pte(self, g: int, page: int) -> int:
        return int(self.tables[g].pv[page])

    def private(self, g: int, page: int) -> bool:
        """Maps a frame of its own: what the merge primitives accept."""
        return self.pte(g, page) & (PRESENT | ZERO | UNMAPPED | KSM) == PRESENT

    def content(self, g: int, page: int) -> bytes:
        return bytes(self.models[g][page * PAGE_SIZE:(page + 1) * PAGE_SIZE])

    def touches_unmapped(self, g: int, addr: int, n: int) -> bool:
        return n > 0 and any(p in self.unmapped[g] for p in range(addr // PAGE_SIZE, (addr + n - 1) // PAGE_SIZE + 1))

    # -- rules -----------------------------------------------------------------------------------

    @rule(g=guests, addr=addresses, payload=data)
    def write(self, g: int, addr: int, payload: bytes) -> None:
        payload = payload[:SIZE - addr]
        if self.touches_unmapped(g, addr, len(payload)):
            try:
                self.views[g].write(addr, payload)
            except shmksm.SegmentationFault:
                return  # and the invariant checks that nothing was written
            raise AssertionError("a write to an unmapped page did not fault")
        self.views[g].write(addr, np.frombuffer(payload, np.uint8) if len(payload) % 2 else payload)
        self.models[g][addr:addr + len(payload)] = payload

    @rule(g=guests, addr=addresses, n=st.integers(0, 2 * PAGE_SIZE + 1))
    def read(self, g: int, addr: int, n: int) -> None:
        n = min(n, SIZE - addr)
        if self.touches_unmapped(g, addr, n):
            try:
                self.views[g].read(addr, n)
            except shmksm.SegmentationFault:
                return
            raise AssertionError("a read of an unmapped page did not fault")
        assert self.views[g].read(addr, n) == self.models[g][addr:addr + n]

    @rule(ref=page_refs, pattern=st.sampled_from(PATTERNS))
    def write_pattern(self, ref: tuple[int, int], pattern: bytes) -> None:
        """A whole page from a small set: duplicates for the merge rules to find."""
        g, page = ref
        self.write(g, page * PAGE_SIZE, pattern)

    @rule(src=page_refs, dst=page_refs)
    def copy_page(self, src: tuple[int, int], dst: tuple[int, int]) -> None:
        """Make a duplicate for the merge rules to find."""
        (sg, sp), (dg, dp) = src, dst
        if sp not in self.unmapped[sg] and dp not in self.unmapped[dg]:
            self.write(dg, dp * PAGE_SIZE, self.content(sg, sp))

    def merge_two(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        (ga, pa), (gb, pb) = a, b
        expect = (self.private(ga, pa) and self.private(gb, pb) and a != b
                  and self.content(ga, pa) == self.content(gb, pb))
        apfn, bpfn = self.pte(ga, pa) & PFN_MASK, self.pte(gb, pb) & PFN_MASK
        kpfn, _ = ksm.try_to_merge_two_pages(self.tables[ga], pa, apfn, self.tables[gb], pb, bpfn)
        event(f"merge_two_pages {'merged' if kpfn > 0 else 'refused'}")
        assert (kpfn > 0) == expect
        if expect:
            assert self.pte(ga, pa) & PFN_MASK == self.pte(gb, pb) & PFN_MASK == kpfn
            assert self.pte(ga, pa) & self.pte(gb, pb) & KSM

    def merge_one(self, a: tuple[int, int], k: tuple[int, int]) -> None:
        """Merge page ``a`` into the KSM page that page ``k`` maps."""
        (ga, pa), (gk, pk) = a, k
        kpte = self.pte(gk, pk)
        assert kpte & (PRESENT | ZERO | KSM) == PRESENT | KSM
        kpfn = kpte & PFN_MASK
        kgen = int(self.machine.system.frames.gen[kpfn])
        expect = self.private(ga, pa) and self.content(ga, pa) == self.content(gk, pk)
        merged = ksm.try_to_merge_one_page(self.tables[ga], pa, self.pte(ga, pa) & PFN_MASK, kpfn, kgen)
        event(f"merge_one_page {'merged' if merged else 'refused'}")
        assert merged == expect
        if merged:
            assert self.pte(ga, pa) & PFN_MASK == kpfn

    def all_pages(self) -> list[tuple[int, int]]:
        return [(g, p) for g in range(NGUESTS) for p in range(PAGES)]

    @rule(a=page_refs, b=page_refs)
    def merge_any_two_pages(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        """Mostly refused: different content, not private, or the same page twice."""
        self.merge_two(a, b)

    @rule(choice=st.integers(0, 1 << 16))
    def merge_two_duplicates(self, choice: int) -> None:
        private = [ref for ref in self.all_pages() if self.private(*ref)]
        pairs = [(a, b) for a in private for b in private if a < b and self.content(*a) == self.content(*b)]
        if pairs:
            self.merge_two(*pairs[choice % len(pairs)])

    @rule(a=page_refs, k=page_refs)
    def merge_into_ksm_page(self, a: tuple[int, int], k: tuple[int, int]) -> None:
        if self.pte(*k) & (PRESENT | ZERO | KSM) == PRESENT | KSM:
            self.merge_one(a, k)

    @rule(choice=st.integers(0, 1 << 16))
    def merge_duplicate_into_ksm_page(self, choice: int) -> None:
        ksm_pages = [ref for ref in self.all_pages() if self.pte(*ref) & (PRESENT | ZERO | KSM) == PRESENT | KSM]
        pairs = [(a, k) for a in self.all_pages() if self.private(*a)
                 for k in ksm_pages if self.content(*a) == self.content(*k)]
        if pairs:
            self.merge_one(*pairs[choice % len(pairs)])

    @rule(ref=page_refs)
    def merge_with_zero_page(self, ref: tuple[int, int]) -> None:
        g, page = ref
        if not self.private(g, page):
            return
        table = self.tables[g]
        with table.ptl(page):  # type: ignore[attr-defined]
            merged = ksm.replace_with_zero_page(table, page, self.pte(g, page) & PFN_MASK)
        assert merged == (self.content(g, page) == bytes(PAGE_SIZE))

    @rule(g=guests, start=pages, n=st.integers(1, PAGES))
    def unmerge(self, g: int, start: int, n: int) -> None:
        end = min(PAGES, start + n)
        shared = sum(1 for p in range(start, end) if self.pte(g, p) & (KSM | PRESENT) == KSM | PRESENT)
        assert unmerge_range(self.tables[g], start, end) == shared
        assert not any(self.pte(g, p) & KSM for p in range(start, end))

    @rule(ref=page_refs)
    def break_one(self, ref: tuple[int, int]) -> None:
        g, page = ref
        was_ksm = self.pte(g, page) & (KSM | PRESENT) == KSM | PRESENT
        assert break_ksm(self.tables[g], page) == int(was_ksm)

    @rule(g=guests, start=pages, n=st.integers(1, 2))
    def munmap(self, g: int, start: int, n: int) -> None:
        end = min(PAGES, start + n)
        self.views[g].munmap(start * PAGE_SIZE, (end - start) * PAGE_SIZE)
        self.unmapped[g].update(range(start, end))

    @precondition(lambda self: self.machine.system.get("wait_count") > 0)
    @rule()
    def reclaim(self) -> None:
        self.machine.reclaim()
        assert self.machine.system.get("wait_count") == 0

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def every_address_reads_back_the_last_value_written(self) -> None:
        for g in range(NGUESTS):
            for page in range(PAGES):
                pte = self.pte(g, page)
                if page in self.unmapped[g]:
                    assert pte == UNMAPPED
                elif pte == 0:  # untouched: reading it would fault it in, so look at the model only
                    assert self.content(g, page) == bytes(PAGE_SIZE)
                else:
                    assert self.views[g].read(page * PAGE_SIZE, PAGE_SIZE) == self.content(g, page), (g, page)

    @invariant()
    def accounting_holds(self) -> None:
        self.machine.check()


GuestsAgainstModel.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
test_guests_against_a_bytearray_model = GuestsAgainstModel.TestCase
