"""The merge primitives of mm/ksm.c, on the emulated MMU.

These are the steps the scanner (and a test merging by hand) use.  Each runs
under the page-table lock of the page it changes, so a guest never sees half
a merge::

    try_to_merge_one_page(page, kpage)
        write_protect_page   PTE still maps the frame we hashed, nobody else maps
                             it → clear WRITE (a guest's next write faults)
        pages_identical      full byte compare, now that nobody can write
        replace_page         map the KSM page read-only; drop the old frame

With no ``kpage``, the page itself becomes a KSM page in place (the first half
of try_to_merge_two_pages).  A checksum is only a hint: nothing here trusts
one.  A KSM page is named by (pfn, gen): the generation changes when the frame
is freed, so a stale name is refused instead of merged into a reused frame.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import numpy as np
import numpy.typing as npt

from .._mm import control, faults
from .._mm.frames import KSM as FRAME_KSM
from .._mm.frames import PAGE_SIZE, ZERO_PFN, Frames, FramesPending, with_frames
from .._mm.pagetable import (
    DIRTY,
    KSM,
    KSM_ZERO_PTE,
    PFN_MASK,
    PRESENT,
    PRIVATE_MASK,
    UNMAPPED,
    WRITE,
    YOUNG,
    ZERO,
    PageTable,
    is_private,
)
from ..errors import OutOfFrames

ZERO_BYTES: Final = bytes(PAGE_SIZE)
ZERO_USED: Final = control.INDEX["ksm_zero_used"]  # set before KSM first maps the zero page
_NOT_WRITE: Final = ~WRITE
_KSM_PRESENT: Final = KSM | PRESENT
_DIRTY_YOUNG: Final = DIRTY | YOUNG
_WP_MASK: Final = np.uint64(PRIVATE_MASK | WRITE)
_PRIVATE_WRITABLE: Final = np.uint64(PRESENT | WRITE)
_NOT_WRITE_U64: Final = ~np.uint64(WRITE)

# How far down its free list a page considered under mitigation "vusion" may
# be placed: a random frame among that many (walked, so not the whole list).
PLACEMENT_SPREAD: Final = 256

# Bytes per rmap item: checksum 4, stable node 4, state 1, age 1, skips 1, plus
# the trees' share (a key table slot of 12 bytes, at a load of at most 0.7, per
# page on a tree).
RMAP_ITEM_BYTES: Final = 24


def page_bytes(frames: Frames, pfn: int) -> bytes:
    """A copy of frame ``pfn``'s content (the fastest way to compare pages in CPython)."""
    return bytes(frames.flat[pfn << 12:(pfn + 1) << 12])


def pages_identical(frames: Frames, a: int, b: int) -> bool:
    return page_bytes(frames, a) == page_bytes(frames, b)


def write_protect_page(table: PageTable, page: int, pfn: int) -> int:
    """Write-protect ``page`` if it still maps ``pfn`` alone; return the PTE or 0.  PTL held.

    0 means: the PTE changed since the scan looked at it, or the frame has
    another user (the kernel's page_mapcount + 1 != page_count check).
    """
    pte = table.pv[page]
    if not is_private(pte) or pte & PFN_MASK != pfn:
        return 0
    frames = table.frames
    if frames.mc[pfn] != 1 or frames.fl[pfn] & FRAME_KSM:
        return 0
    if pte & WRITE:
        pte &= ~WRITE
        table.set_pte_at_notify(page, pte)
    cv = frames.cv
    if cv[faults.ARMED]:
        faults.hit(cv, faults.KSM_AFTER_WRITE_PROTECT)
    return pte


def make_ksm_page(table: PageTable, page: int, pfn: int) -> int:
    """Turn ``page``'s own frame into a KSM page in place; return its generation, or -1.

    The first half of try_to_merge_two_pages.  PTL held; takes the frame lock.
    """
    pte = write_protect_page(table, page, pfn)
    if not pte:
        return -1
    frames = table.frames
    lock = frames.frame_lock(pfn)
    lock.acquire()
    frames.fl[pfn] |= FRAME_KSM
    gen: int = frames.gn[pfn]
    lock.release()
    table.pv[page] = pte | KSM
    return gen


def ptl_runs(pages: list[int]) -> Iterator[tuple[int, int]]:
    """(i, j) for each run pages[i:j] under one page-table lock; ``pages`` ascend."""
    i, n = 0, len(pages)
    while i < n:
        run = pages[i] >> 9
        j = i + 1
        while j < n and pages[j] >> 9 == run:
            j += 1
        yield i, j
        i = j


class _RunNotes:
    """The PTE changes of one run, for its notifier records (sent when the run ends, its PTL held)."""

    __slots__ = ("changes",)

    def __init__(self) -> None:
        self.changes: list[tuple[int, int]] = []

    def changed(self, page: int, pte: int) -> None:
        """``page`` now has PTE ``pte``."""
        self.changes.append((page, pte))


@contextmanager
def _run_locked(table: PageTable, pages: list[int], dropped: list[int] | None = None) -> Iterator[_RunNotes | None]:
    """Send the starts of ``pages`` (one run), hold its PTL; yield where its changes are noted.

    Every page gets its start, changed or not, as write_protect_page and
    replace_page call invalidate_range_start for every page they try.  None
    when no notifier watches the guest.  That is asked before the PTL is
    taken and again under it, as set_pte_at_notify asks at each change: a
    shadow registered meanwhile, which may have filled entries of this run,
    gets the starts then, still before any change.  The change records and
    the ends go out together at the end, the PTL still held; then the frames
    put in ``dropped`` (mapped by nobody since this run's changes) go to the
    waiting list, tagged after those records, and before the PTL goes: a
    recovery never finds a frame unmapped and not dropped.
    """
    notifier = table.notifier
    gid = table.gid
    era = notifier.era(gid) if notifier is not None else -1
    if era > 0:
        notifier.begin_pages(gid, pages, era)
    lock = table.ptl(pages[0])
    lock.acquire()
    notes: _RunNotes | None = None
    try:
        if era < 0 and notifier is not None and (era := notifier.era(gid)) > 0:
            notifier.begin_pages(gid, pages, era)
        notes = _RunNotes() if era >= 0 else None
        yield notes
    finally:
        try:
            if notes is not None:
                notifier.end_pages(gid, pages, notes.changes, era)
            if dropped:
                table.frames.drop_private(dropped)
                dropped.clear()
        finally:
            lock.release()


def make_ksm_pages(table: PageTable, pages: list[int], pfns: list[int]) -> list[int]:
    """make_ksm_page for several pages of one guest (ascending); their generations, -1 where not.

    Takes each run's PTL once and sends its notifier records together.
    """
    frames = table.frames
    mc, fl, gn, pv = frames.mc, frames.fl, frames.gn, table.pv
    frame_locks = frames.frame_locks
    nlocks = len(frame_locks)
    gens = [-1] * len(pages)
    for i, j in ptl_runs(pages):
        with _run_locked(table, pages[i:j]) as notes:
            for k, page, pfn in zip(range(i, j), pages[i:j], pfns[i:j], strict=True):
                pte = pv[page]
                if pte & PRIVATE_MASK != PRESENT or pte & PFN_MASK != pfn or mc[pfn] != 1 or fl[pfn] & FRAME_KSM:
                    continue
                if pte & WRITE:
                    pte &= _NOT_WRITE
                    if notes is not None:
                        notes.changed(page, pte)
                klock = frame_locks[pfn % nlocks]
                klock.acquire()
                fl[pfn] |= FRAME_KSM
                gens[k] = gn[pfn]
                klock.release()
                pv[page] = pte | KSM
    return gens


def write_protect_pages(table: PageTable, pages: npt.NDArray[np.intp], rng: random.Random | None = None) -> int:
    """Clear WRITE on every private page of ``pages`` (ascending) that has it; return how many.

    Mitigation "vusion": every page the scanner considers for merging loses
    write access, merged or not, so that the next write to any of them faults
    and copies alike.  With ``rng``, each also moves to a frame taken at a
    random place of the free list (up to PLACEMENT_SPREAD frames down), as
    VUsion places the pages it considers at random frames: a KSM page, made
    later in place from one of them, lands where nobody chose.  A page stays
    where it is when no frame is free now.

    Takes each run's PTL (and the allocator lock); the notifier hears a
    change_pte for each page, as from write_protect_page and replace_page.
    """
    ptes, pv = table.ptes, table.pv
    protected = 0
    moved: list[int] = []  # a run's frames left behind, dropped before its PTL goes (_run_locked)
    for run in np.split(pages, np.flatnonzero(np.diff(pages >> 9)) + 1):
        # Looked at unlocked, so that the notifier hears only of pages about
        # to change; under the PTL, those that changed meanwhile drop out.
        candidates = run[(ptes[run] & _WP_MASK) == _PRIVATE_WRITABLE]
        if not len(candidates):
            continue
        with _run_locked(table, candidates.tolist(), moved) as notes:
            writable = candidates[(ptes[candidates] & _WP_MASK) == _PRIVATE_WRITABLE]
            ptes[writable] &= _NOT_WRITE_U64
            protected += len(writable)
            if rng is None and notes is None:
                continue
            for page in writable.tolist():
                pte = pv[page]
                if rng is not None:
                    pte = _move_page(table, page, pte, rng.randrange(PLACEMENT_SPREAD), moved)
                if notes is not None:
                    notes.changed(page, pte)
    return protected


def _move_page(table: PageTable, page: int, pte: int, depth: int, moved: list[int]) -> int:
    """Copy ``page`` (PTE ``pte``, private) to the free frame ``depth`` down the list and map it
    there; return the new PTE (``pte`` if no frame is free now).  PTL held; takes the allocator
    lock.  The old frame is appended to ``moved``, for the caller to drop."""
    frames = table.frames
    try:
        pfn = frames.alloc(node=table.node, depth=depth)
    except (FramesPending, OutOfFrames):
        return pte
    old = pte & PFN_MASK
    frames.copy_frame(pfn, old)
    frames.mc[pfn] = 1
    pte = pte & ~PFN_MASK | pfn
    table.pv[page] = pte
    moved.append(old)
    return pte


def replace_page(table: PageTable, page: int, pfn: int, kpfn: int, kgen: int) -> bool:
    """Merge ``page`` (mapping ``pfn``) into KSM page (``kpfn``, ``kgen``); return success.

    write_protect_page → pages_identical → replace_page.  PTL held; takes the
    KSM page's frame lock, then the old frame's.  The scanner's hottest path:
    locks are taken with their raw acquire/release.
    """
    pte = write_protect_page(table, page, pfn)
    if not pte:
        return False
    frames = table.frames
    lock = frames.frame_lock(kpfn)
    lock.acquire()
    try:
        mc = frames.mc
        if frames.gn[kpfn] != kgen or not frames.fl[kpfn] & FRAME_KSM or mc[kpfn] <= 0:
            return False
        flat = frames.flat
        if bytes(flat[pfn << 12:(pfn + 1) << 12]) != bytes(flat[kpfn << 12:(kpfn + 1) << 12]):
            return False
        mc[kpfn] += 1
    finally:
        lock.release()
    new = kpfn | PRESENT | KSM | (pte & (DIRTY | YOUNG))
    table.set_pte_at_notify(page, new)
    frames.drop_private([pfn])
    return True


def replace_pages(table: PageTable, pages: list[int], pfns: list[int],
                  kpfns: list[int], kgens: list[int]) -> list[bool]:
    """replace_page for several pages of one guest, page k into KSM page (kpfns[k], kgens[k]).

    A kpfn of ZERO_PFN maps KSM's zero page instead, if the page is still all
    zeros (replace_with_zero_page).

    Returns which ones merged.  ``pages`` ascend.  The same steps as
    :func:`replace_page` for every page (write_protect_page inlined), with
    the locks amortized: each run of pages under one page-table lock is done
    in one critical section, and a KSM page is read once for consecutive
    pages that merge into it.  The old frames were mapped only by the PTEs
    just replaced (checked under the PTL), so nobody else can reach their
    mapcounts: each run's are dropped together, under one allocator lock, before
    its PTL goes (:func:`_run_locked`).
    """
    frames = table.frames
    mm, mc, fl, gn, pv, cv = frames.mm, frames.mc, frames.fl, frames.gn, table.pv, frames.cv
    frame_locks = frames.frame_locks
    nlocks = len(frame_locks)
    merged = [False] * len(pages)
    dropped: list[int] = []
    # The last KSM page read, kept for the next page that merges into it.  Only
    # one: 4 KiB objects kept by the hundred grow the heap, which glibc gives
    # back when they go, and the next batch faults it in again.
    kb_pfn, kb_gen, kb = -1, -1, b""
    for i, j in ptl_runs(pages):
        with _run_locked(table, pages[i:j], dropped) as notes:
            for k, page, pfn, kpfn, kgen in zip(range(i, j), pages[i:j], pfns[i:j], kpfns[i:j], kgens[i:j],
                                                strict=True):
                pte = pv[page]
                if pte & PRIVATE_MASK != PRESENT or pte & PFN_MASK != pfn or mc[pfn] != 1 or fl[pfn] & FRAME_KSM:
                    continue
                if pte & WRITE:
                    pte &= _NOT_WRITE
                    pv[page] = pte
                    if notes is not None:
                        notes.changed(page, pte)
                if cv[faults.ARMED]:
                    faults.hit(cv, faults.KSM_AFTER_WRITE_PROTECT)
                if kpfn == ZERO_PFN:  # use_zero_pages: the zero page, which no one counts
                    if mm[pfn << 12:(pfn + 1) << 12] != ZERO_BYTES:
                        continue
                    frames.cv[ZERO_USED] = 1
                    new = KSM_ZERO_PTE
                else:
                    klock = frame_locks[kpfn % nlocks]
                    klock.acquire()
                    try:
                        if gn[kpfn] != kgen or not fl[kpfn] & FRAME_KSM or mc[kpfn] <= 0:
                            continue
                        if kpfn != kb_pfn or kgen != kb_gen:  # one life of a KSM page: one content
                            kb_pfn, kb_gen, kb = kpfn, kgen, mm[kpfn << 12:(kpfn + 1) << 12]
                        if mm[pfn << 12:(pfn + 1) << 12] != kb:
                            continue
                        mc[kpfn] += 1
                    finally:
                        klock.release()
                    new = kpfn | _KSM_PRESENT | (pte & _DIRTY_YOUNG)
                pv[page] = new
                if notes is not None:
                    notes.changed(page, new)
                merged[k] = True
                dropped.append(pfn)
    return merged


def replace_with_zero_page(table: PageTable, page: int, pfn: int) -> bool:
    """use_zero_pages: map KSM's zero page if ``page`` is still all zeros; return success.  PTL held."""
    pte = write_protect_page(table, page, pfn)
    if not pte or page_bytes(table.frames, pfn) != ZERO_BYTES:
        return False
    table.frames.cv[ZERO_USED] = 1
    table.set_pte_at_notify(page, KSM_ZERO_PTE)
    table.frames.put(pfn)
    return True


@contextmanager
def mergeable_vma(table: PageTable, page: int) -> Iterator[bool]:
    """Hold the guest's mm lock; yield whether ``page`` is still mergeable (find_mergeable_vma).

    The scanner picked the page under the mm lock, but merges later: a
    concurrent MADV_UNMERGEABLE (or the merge switch turned off) must win.
    """
    with table.mm_lock:
        yield table.is_mergeable(page)


def try_to_merge_one_page(table: PageTable, page: int, pfn: int, kpfn: int, kgen: int,
                          check_vma: bool = False) -> bool:
    """replace_page under ``page``'s PTL (which it takes), and its mm lock with ``check_vma``."""
    mm = table.mm_lock if check_vma else None
    if mm is not None:
        mm.__enter__()
    try:
        if mm is not None and not table.is_mergeable(page):
            return False
        lock = table.ptl(page)
        lock.acquire()
        try:
            return replace_page(table, page, pfn, kpfn, kgen)
        finally:
            lock.release()
    finally:
        if mm is not None:
            mm.__exit__()


def try_to_merge_two_pages(a: PageTable, apage: int, apfn: int, b: PageTable, bpage: int, bpfn: int,
                           check_vma: bool = False) -> tuple[int, int]:
    """Merge two pages into a new KSM page made of the first; return (kpfn, kgen) or (-1, -1).

    Takes each page's PTL (and with ``check_vma`` its mm lock) in turn, never
    both.  If the second half fails, the first page's sharing is broken
    again, as the kernel's break_cow.
    """
    mm = a.mm_lock if check_vma else None
    if mm is not None:
        mm.__enter__()
    try:
        if mm is not None and not a.is_mergeable(apage):
            return -1, -1
        lock = a.ptl(apage)
        lock.acquire()
        try:
            kgen = make_ksm_page(a, apage, apfn)
        finally:
            lock.release()
    finally:
        if mm is not None:
            mm.__exit__()
    if kgen < 0:
        return -1, -1
    if try_to_merge_one_page(b, bpage, bpfn, apfn, kgen, check_vma):
        return apfn, kgen
    if check_vma:
        with a.mm_lock:
            with_frames(break_ksm, a, apage)
    else:
        with_frames(break_ksm, a, apage)
    return -1, -1


def unmerge_range(table: PageTable, start: int, end: int) -> int:
    """Break every KSM mapping in ``[start, end)`` (break_ksm); return how many.

    Takes each page's PTL; waits unlocked when frames are pending reclamation.
    """
    ptes = table.ptes
    candidates = np.flatnonzero((ptes[start:end] & np.uint64(KSM | PRESENT)) == np.uint64(KSM | PRESENT)) + start
    broken = 0
    for page in candidates.tolist():
        broken += with_frames(break_ksm, table, page)
    return broken


def break_ksm(table: PageTable, page: int) -> int:
    """Give ``page`` a private copy if it maps a KSM page (or KSM's zero page); return 1 if so."""
    with table.ptl(page):
        pte = table.pv[page]
        if pte & (KSM | PRESENT | UNMAPPED) != KSM | PRESENT:
            return 0
        if pte & ZERO:
            table.handle_write_fault(page)
            table.pv[page] &= ~DIRTY
        else:
            table.cow(page, pte, dirty=False)
        return 1

__all__ = [
    "RMAP_ITEM_BYTES", "ZERO_PFN", "break_ksm", "replace_with_zero_page", "try_to_merge_one_page",
    "try_to_merge_two_pages", "unmerge_range", "write_protect_pages",
]
