"""Guest page tables: PTEs, demand paging, copy-on-write, unmap.

A guest's segment is organized as follows::

    int64[HEADER_WORDS]  header: pages, merge_any, nranges, (three words unused),
                         ranges generation, NUMA node, security domain, from word 10
                         nranges (start, end) page-number pairs of MADV_MERGEABLE ranges, and
                         from H_KSM_STAT each scanner's (ksm_rmap_items, ksm_merging_pages)
    uint64[pages]        PTEs
    uint32[pages]        each page's checksum at ksmd's last visit (the kernel's rmap_item
                         oldchecksum), 0 for none: shared by the scanners, written by the
                         page's owner (scanner.py)

A PTE is one uint64::

    bits 0-39   pfn
    bit  40     PRESENT
    bit  41     WRITE      writable: a private page that nobody else maps
    bit  42     DIRTY
    bit  43     YOUNG      accessed since the last clear_flush_young
    bit  44     KSM        maps a KSM page (or, with ZERO, KSM placed the zero page)
    bit  45     ZERO       maps the zero page (frame 0)
    bit  46     UNMAPPED   no VMA here: munmap'ed, any access faults

A PTE of 0 is an untouched page of a mapped range.  Every change of a PTE, and
every access through it, happens under the page-table lock of its run of 512.
"""

from __future__ import annotations

import sys
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..errors import OutOfFrames, SegmentationFault
from . import control
from .control import MITIGATION_VUSION
from .frames import INUSE, PAGE_SHIFT, PAGE_SIZE, ZERO_PFN, Frames, FramesPending
from .frames import KSM as FRAME_KSM
from .locks import Lock

PFN_MASK: Final = (1 << 40) - 1
PRESENT: Final = 1 << 40
WRITE: Final = 1 << 41
DIRTY: Final = 1 << 42
YOUNG: Final = 1 << 43
KSM: Final = 1 << 44
ZERO: Final = 1 << 45
UNMAPPED: Final = 1 << 46

HEADER_WORDS: Final = 256
H_PAGES: Final = 0
H_MERGE_ANY: Final = 1
H_NRANGES: Final = 2
H_RANGES_GEN: Final = 6  # bumped by every change of the mergeable ranges or merge_any (mm lock held)
H_NODE: Final = 7  # the NUMA node the guest's memory is allocated on first (set at creation)
H_DOMAIN: Final = 8  # the guest's security domain (mitigation "domains"), set at creation
H_RANGES: Final = 10
# ksm_stat's rmap items and merging pages of this guest, a pair of words per
# scanner, each written by its scanner alone; /proc/PID/ksm_stat sums them.
H_KSM_STAT: Final = HEADER_WORDS - 2 * control.MAX_SCANNERS
MAX_RANGES: Final = (H_KSM_STAT - H_RANGES) // 2

# A PTE maps a frame of its own when it is PRESENT, not the zero page and not
# munmap'ed (FRAME_MASK); a private frame that ksmd may merge is, besides, not
# a KSM page (PRIVATE_MASK).  is_private() is the scalar test.
FRAME_MASK: Final = PRESENT | ZERO | UNMAPPED
PRIVATE_MASK: Final = FRAME_MASK | KSM


def is_private(pte: int) -> bool:
    """Whether ``pte`` maps a private frame: present, not the zero page, not unmapped, not KSM."""
    return pte & PRIVATE_MASK == PRESENT


ZERO_PTE: Final = PRESENT | ZERO | YOUNG
KSM_ZERO_PTE: Final = PRESENT | ZERO | KSM

# A PTE read as two uint32 halves, for the guests' hot paths: Python's bit
# operations on a 47-bit int cost more than the lock itself.  Under its PTL a
# PTE cannot change, so halves read one after the other are one PTE.  The high
# half is the flags and pfn bits 32-39 (0 in any pool under 16 TiB); where
# those are 0, the low half is the pfn.  A high half equal to HIGH_WRITABLE
# needs no fault to write; one with HIGH_READ_MASK bits equal to HIGH_READABLE
# needs no fault to read.
_LOW_HALF, _HIGH_HALF = (0, 1) if sys.byteorder == "little" else (1, 0)
HIGH_WRITABLE: Final = (PRESENT | WRITE | DIRTY | YOUNG) >> 32
HIGH_READABLE: Final = (PRESENT | YOUNG) >> 32
HIGH_READ_MASK: Final = HIGH_READABLE | PFN_MASK >> 32
HIGH_UNMAPPED: Final = UNMAPPED >> 32

WRITABLE_PTE: Final = PRESENT | WRITE | DIRTY | YOUNG  # needs no fault to write
_WRITABLE_BITS: Final = np.uint64(WRITABLE_PTE)
_RW: Final = np.uint64(PRESENT | WRITE)
_PRESENT64: Final = np.uint64(PRESENT)
_ZERO64: Final = np.uint64(ZERO)
_DIRTY_YOUNG64: Final = np.uint64(DIRTY | YOUNG)
_PFN64: Final = np.uint64(PFN_MASK)

_COW_KSM: Final = control.INDEX["cow_ksm"]
_COW_FAULTS: Final = control.INDEX["cow_faults"]
_MITIGATION: Final = control.INDEX["mitigation"]


def segment_size(pages: int) -> int:
    return 8 * (HEADER_WORDS + pages) + 4 * pages


def describe(pte: int) -> str:
    """A PTE as text, for error messages: ``pfn 12 PRESENT|WRITE``."""
    names = [n for n, b in (("PRESENT", PRESENT), ("WRITE", WRITE), ("DIRTY", DIRTY),
                            ("YOUNG", YOUNG), ("KSM", KSM), ("ZERO", ZERO),
                            ("UNMAPPED", UNMAPPED)) if pte & b]
    return f"pfn {pte & PFN_MASK} {'|'.join(names) or 'none'}"


class PageTable:
    """One guest's page table as seen from one process (host, guest, scanner)."""

    def __init__(self, gid: int, buf: memoryview, frames: Frames) -> None:
        self.gid = gid
        self.generation = 0  # of the guest slot (control.G_GENERATION), set by System.table
        self.header: npt.NDArray[np.int64] = np.ndarray(HEADER_WORDS, np.int64, buf, 0)
        self.pages = int(self.header[H_PAGES])
        self.node = int(self.header[H_NODE])
        self.ptes: npt.NDArray[np.uint64] = np.ndarray(self.pages, np.uint64, buf, 8 * HEADER_WORDS)
        self.pv = buf[8 * HEADER_WORDS:8 * (HEADER_WORDS + self.pages)].cast("Q")
        self.oldchecksums: npt.NDArray[np.uint32] = np.ndarray(self.pages, np.uint32, buf,
                                                               8 * (HEADER_WORDS + self.pages))
        halves = self.pv.cast("B").cast("I")
        self.pte_low = halves[_LOW_HALF::2]
        self.pte_high = halves[_HIGH_HALF::2]
        # The same halves as arrays, for the bulk paths' vectorized looks.
        words = self.ptes.view(np.uint32)
        self.low_halves: npt.NDArray[np.uint32] = words[_LOW_HALF::2]
        self.high_halves: npt.NDArray[np.uint32] = words[_HIGH_HALF::2]
        self.frames = frames
        locks = frames.locks
        self.ptl_table = locks.ptl
        self.mm_lock = locks.mm[gid]
        self._hv = self.header.data
        self._ranges: list[tuple[int, int]] = []
        self._ranges_gen = -1
        # ptl_index(gid, page) is (gid * 97 + (page >> 9)) % NPTL: precompute the base,
        # and the lock of every run of 512 PTEs, so that a hot path finds it with one index.
        self.ptl_base = gid * 97
        self.nptl = len(self.ptl_table)
        self.run_locks: list[Lock] = [self.ptl_table[(self.ptl_base + run) % self.nptl]
                                     for run in range((self.pages + 511) >> 9)]
        self.notifier: Any = None

    def release_views(self) -> None:
        for view in (self.pte_low, self.pte_high, self.pv, self._hv):
            view.release()
        del self.header, self.ptes, self.low_halves, self.high_halves, self.oldchecksums

    def ptl(self, page: int) -> Lock:
        """The page-table lock of ``page``."""
        return self.run_locks[page >> 9]

    # -- faults: called with the page's PTL held ----------------------------------

    def handle_read_fault(self, page: int) -> int:
        """Map the zero page on a read of an untouched page; return the new PTE.  PTL held."""
        pte = self.pv[page]
        if pte & UNMAPPED:
            raise SegmentationFault(f"guest {self.gid}: read of unmapped page {page:#x}")
        if not pte & PRESENT:
            pte = ZERO_PTE
            self.pv[page] = pte
        return pte

    def handle_read_faults(self, start: int, end: int) -> None:
        """A read of pages ``[start, end)`` (one run): mark the mapped ones young.  PTL held.

        Untouched pages stay untouched, the zero page is not mapped for them:
        their PTE's pfn is 0, so a read through it reads the zero page anyway.
        SegmentationFault at an unmapped page.
        """
        ptes = self.ptes[start:end]
        unmapped = np.flatnonzero(ptes & np.uint64(UNMAPPED))
        if len(unmapped):
            raise SegmentationFault(f"guest {self.gid}: read of unmapped page {start + int(unmapped[0]):#x}")
        present = (ptes & _PRESENT64) != 0
        ptes[present] |= np.uint64(YOUNG)

    def handle_write_fault(self, page: int, whole: bool = False) -> int:
        """Make ``page`` writable; return the new PTE.  PTL held.

        Untouched → a new frame (zeroed unless ``whole``, when the caller is
        about to overwrite it); the zero page or a KSM page → copy-on-write;
        a write-protected private page nobody else maps → reuse in place,
        except under mitigation "vusion": the scanner write-protected it when
        it considered it for merging, and it is copied exactly as a KSM page
        is (wp_page_copy_alike), so that a write's cost does not tell whether
        it was merged.
        Raises FramesPending / OutOfFrames before changing anything.
        """
        pv = self.pv
        pte = pv[page]
        if pte & UNMAPPED:
            raise SegmentationFault(f"guest {self.gid}: write to unmapped page {page:#x}")
        frames = self.frames
        if not pte & PRESENT or pte & ZERO:
            # do_anonymous_page, or wp_page_copy from the zero page.
            pfn = frames.alloc(-1, self.node)
            if not whole:
                frames.zero_frame(pfn)
            frames.mc[pfn] = 1
            new = pfn | PRESENT | WRITE | DIRTY | YOUNG
            if pte & PRESENT:
                self.set_pte_at_notify(page, new)
            else:
                pv[page] = new
            return new
        if frames.cv[_MITIGATION] == MITIGATION_VUSION:
            return self.wp_page_copy_alike(page, pte)
        old = pte & PFN_MASK
        if not frames.fl[old] & FRAME_KSM and frames.mc[old] == 1:
            # do_wp_page reuse: write-protected by a merge that did not happen.
            new = pte | WRITE | DIRTY | YOUNG
            pv[page] = new
            return new
        return self.cow(page, pte, dirty=True)

    def wp_page_copy_alike(self, page: int, pte: int) -> int:
        """The write fault on write-protected ``page`` (PTE ``pte``) under mitigation "vusion"; the new PTE.

        A KSM page and a private page take the same steps, and none reads
        the old frame's metadata: a new frame, the copy, the remap, and the
        old frame queued for its put (Frames.defer_put).  The put itself —
        a mapcount that goes down for a KSM page, a frame freed for a private
        one, and which of cow_ksm and cow_faults counts the copy — differs
        between the two, and is done out of the fault (Frames.drain_deferred).
        With no frame left at all, the fault is the kernel's (reuse in place,
        or a KSM page's last mapping): out of memory, the time of a write
        tells more than this anyway.  PTL held; takes the allocator lock.
        """
        frames = self.frames
        old = pte & PFN_MASK
        try:
            pfn = frames.alloc(-1, self.node)
        except OutOfFrames:
            if not frames.fl[old] & FRAME_KSM and frames.mc[old] == 1:
                new = pte | WRITE | DIRTY | YOUNG
                self.pv[page] = new
                return new
            return self.cow(page, pte, dirty=True)
        frames.copy_frame(pfn, old)
        frames.mc[pfn] = 1
        new = pfn | WRITABLE_PTE
        self.set_pte_at_notify(page, new)
        frames.defer_put(old)
        return new

    def handle_write_faults(self, pages: npt.NDArray[np.intp], whole: npt.NDArray[np.bool_]
                            ) -> tuple[int, Exception | None]:
        """handle_write_fault for ``pages`` (ascending, one run of 512), resolved together.  PTL held.

        ``whole[i]``: the caller overwrites all of ``pages[i]`` before it
        releases the PTL (a new frame need not be zeroed, nor a copy made).
        What no order can change is done at once: the new frames of
        untouched pages, of the zero page and of copy-on-write come from one
        allocator call; PTEs change in numpy; the change_pte records of the
        run go out in one emit_many, before the old frames are put (a frame
        dropped is tagged with an epoch that includes its invalidation).

        Returns ``(k, None)`` when every page is writable, dirty and young
        now; ``(k, error)`` when ``pages[k]`` could not be made so: then
        ``pages[:k]`` are, nothing of ``pages[k:]`` changed, and ``error`` is
        what handle_write_fault raised for ``pages[k]`` (FramesPending,
        OutOfFrames, SegmentationFault).  When frames run short, or a page
        is unmapped, the pages are faulted one by one in address order.
        """
        ptes = self.ptes
        old = ptes[pages]
        if (old & np.uint64(UNMAPPED)).any():
            return self._write_faults_in_order(pages, whole)
        rw = old & _RW
        present = (old & _PRESENT64) != 0
        new_frame = ~present | ((old & _ZERO64) != 0)
        protected = present & ~new_frame & (rw != _RW)
        frames = self.frames
        old_pfns = (old & _PFN64).astype(np.intp)
        ksm_frame = (frames.flags[old_pfns] & FRAME_KSM) != 0
        # Under mitigation "vusion" every write-protected page is copied and its
        # old frame's put deferred, as handle_write_fault does; otherwise a
        # private one is reused in place.
        vusion = frames.cv[_MITIGATION] == MITIGATION_VUSION
        cow = protected if vusion else protected & (ksm_frame | (frames.mapcount[old_pfns] != 1))
        fresh = new_frame | cow
        nfresh = int(np.count_nonzero(fresh))
        try:
            counts = None  # vusion: counted as the deferred puts are done
            if not vusion:
                into_ksm = int(np.count_nonzero(cow & ksm_frame))
                counts = {_COW_KSM: into_ksm, _COW_FAULTS: int(np.count_nonzero(cow)) - into_ksm}
            pfns = frames.alloc_many(nfresh, counts, self.node) if nfresh else []
        except FramesPending:
            return self._write_faults_in_order(pages, whole)
        # Everything below changes state and cannot fail.
        new = old | _WRITABLE_BITS  # dirty and young, and writable where protected but private (do_wp_page reuse)
        if nfresh:
            at = np.flatnonzero(fresh)
            new_pfns = np.array(pfns, np.uint64)
            new[at] = new_pfns | _WRITABLE_BITS
            # The content before the PTE points at it: zeros or a copy, unless the caller overwrites it all.
            for i, pfn in zip(at.tolist(), pfns, strict=True):
                if whole[i]:
                    continue
                if cow[i]:
                    frames.copy_frame(pfn, int(old_pfns[i]))
                else:
                    frames.zero_frame(pfn)
            frames.mapcount[new_pfns.astype(np.intp)] = 1
        # The zero page or a copied frame replaced: a secondary MMU may map the old one.
        replaced = np.flatnonzero(fresh & present)
        notifier = self.notifier
        era = notifier.era(self.gid) if notifier is not None and len(replaced) else -1
        changed = pages[replaced].tolist()
        if era > 0:
            notifier.begin_pages(self.gid, changed, era)  # invalidate_range_start before the PTEs change
        ptes[pages] = new
        if era >= 0:
            notifier.end_pages(self.gid, changed, list(zip(changed, new[replaced].tolist(), strict=True)), era)
        if nfresh:
            if vusion:
                frames.defer_puts(old_pfns[cow].tolist())
            else:
                for pfn in old_pfns[cow].tolist():
                    frames.put(pfn)
        return len(pages), None

    def _write_faults_in_order(self, pages: npt.NDArray[np.intp], whole: npt.NDArray[np.bool_]
                               ) -> tuple[int, Exception | None]:
        """handle_write_faults one page at a time, in address order, up to the first that fails.  PTL held."""
        pv = self.pv
        for i, page in enumerate(pages.tolist()):
            if pv[page] & WRITABLE_PTE == WRITABLE_PTE:
                continue
            try:
                if pv[page] & WRITE:
                    pv[page] |= DIRTY | YOUNG
                else:
                    self.handle_write_fault(page, bool(whole[i]))
            except (FramesPending, OutOfFrames, SegmentationFault) as error:
                return i, error
        return len(pages), None

    def cow(self, page: int, pte: int, dirty: bool) -> int:
        """Give ``page`` a private copy of the frame ``pte`` maps; return the new PTE.

        The kernel's wp_page_copy, also used to break KSM sharing (break_ksm).
        PTL held; takes the allocator lock and the old frame's lock.
        """
        frames = self.frames
        old = pte & PFN_MASK
        try:
            pfn = frames.alloc(_COW_KSM if frames.fl[old] & FRAME_KSM else _COW_FAULTS, self.node)
        except OutOfFrames:
            # Out of frames: the last mapping of a KSM page may keep the page
            # itself, made private again, instead of a copy (no new frame).
            if not frames.take_last_mapping(old):
                raise
            new = old | PRESENT | WRITE | YOUNG | (DIRTY if dirty else pte & DIRTY)
            self.set_pte_at_notify(page, new)
            return new
        frames.copy_frame(pfn, old)
        frames.mc[pfn] = 1
        new = pfn | PRESENT | WRITE | YOUNG | (DIRTY if dirty else pte & DIRTY)
        self.set_pte_at_notify(page, new)
        frames.put(old)
        return new

    def set_pte_at_notify(self, page: int, pte: int) -> None:
        """Write ``pte`` with the notifier calls of the era around it.  PTL held.

        invalidate_range_start before the write (from 2012; with a ``sync``
        shadow it has run the start when the write happens), change_pte and
        invalidate_range_end after it.
        """
        notifier = self.notifier
        era = notifier.begin_change(self.gid, page) if notifier is not None else -1
        self.pv[page] = pte
        if era >= 0:
            notifier.end_change(self.gid, page, pte, era)

    def zap(self, page: int, unmap: bool) -> None:
        """Drop the mapping of ``page`` (munmap or exit).  PTL held.

        The caller brackets its range of zaps with invalidate_range_start/end
        (``Notifier.begin_range``, ``end_range``), as unmap_vmas does.
        """
        pte = self.pv[page]
        self.pv[page] = UNMAPPED if unmap else 0
        if pte & PRESENT and not pte & ZERO:
            self.frames.put(pte & PFN_MASK)

    # -- mergeable ranges (the VMAs' VM_MERGEABLE), under the mm lock -------------

    def mergeable_ranges(self) -> list[tuple[int, int]]:
        """The page ranges KSM may scan, sorted; merge_any means the whole guest.

        Cached per process, and read again only when the ranges' generation
        word changed: the scanner asks before every merge.
        """
        gen = self._hv[H_RANGES_GEN]
        if gen != self._ranges_gen:
            ranges = [(0, self.pages)] if self._hv[H_MERGE_ANY] else self.stored_ranges()
            self._ranges, self._ranges_gen = ranges, gen
        return self._ranges

    def is_mergeable(self, page: int) -> bool:
        """Is ``page`` in a mergeable range?  (mm lock held: the VMA's VM_MERGEABLE)"""
        return any(start <= page < end for start, end in self.mergeable_ranges())

    def mergeable_indices(self, pages: list[int]) -> list[int]:
        """The indices k of ``pages`` whose page is in a mergeable range.  mm lock held."""
        ranges = self.mergeable_ranges()
        if ranges == [(0, self.pages)]:
            return list(range(len(pages)))
        return [k for k, page in enumerate(pages) if any(start <= page < end for start, end in ranges)]

    def set_merge_any(self, enable: bool) -> None:
        """Set the whole-guest merge switch.  mm lock held."""
        self._hv[H_MERGE_ANY] = int(enable)
        self._hv[H_RANGES_GEN] += 1

    def stored_ranges(self) -> list[tuple[int, int]]:
        """The ranges madvise(MADV_MERGEABLE) marked, whatever merge_any says."""
        h = self.header
        n = int(h[H_NRANGES])
        return [(int(h[H_RANGES + 2 * i]), int(h[H_RANGES + 2 * i + 1])) for i in range(n)]

    def set_mergeable_ranges(self, ranges: list[tuple[int, int]]) -> None:
        from ..errors import UsageError

        if len(ranges) > MAX_RANGES:
            raise UsageError(f"more than {MAX_RANGES} separate mergeable ranges")
        h = self.header
        for i, (start, end) in enumerate(ranges):
            h[H_RANGES + 2 * i] = start
            h[H_RANGES + 2 * i + 1] = end
        h[H_NRANGES] = len(ranges)
        h[H_RANGES_GEN] += 1



__all__ = ["PAGE_SIZE", "PAGE_SHIFT", "ZERO_PFN", "INUSE", "PageTable"]
