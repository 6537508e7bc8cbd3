"""Why pages do not merge: every page of every guest under exactly one reason.

Most of the answer is in shared memory already: a PTE says whether a page is
present, maps a KSM page or the zero page, and the guest's header says which
ranges are mergeable.  The rest — has ksmd seen the page, did its checksum
change, is it on the unstable tree, did smart_scan skip it — is in ksmd's
rmap items, in its private memory.  ksmd publishes them on request only, so
scanning pays nothing for it but one word read per batch:

1. the requester (the host, or ``shmksm explain`` attached from another
   process) creates the answer segment ``<prefix>_explain<pid>``, laid out as::

       int64[2 * MAX_GUESTS]   per guest: offset of its bytes, pages (0: no answer)
       int64                   areas: the scanners asked (``scanners`` when asked)
       uint8[areas][pages]     per guest, one area per scanner, one byte a page:
                               Scanner.item_states, | OWNED where the scanner owns the page

   and writes its request (pid << 20 | a sequence number) into the control
   word ``explain_request``;
2. each scanner process, between wake-ups (and while idle), attaches it,
   writes into its own area the states of the pages it has items for,
   detaches, and writes the request into ``explain_answer`` of its own
   entry of the control segment;
3. once every running scanner answered, the requester reads the states,
   then the PTEs, classifies, and unlinks the segment.

With several scanners a page's state is its owner's (:func:`combine`).  A
page whose content changed moves to the new checksum's owner; the scanner it
left keeps its item until its next visit frees it, and that item says what
that visit saw (the change: volatile).  So the owner's item, where it has
one, is the newer; where it has none yet, the previous owner's tells why the
page waits.  Each scanner writes only its own area: no byte is written by two.

Two requesters at once take turns: one whose request was overwritten asks
again once the other's was answered.  With no ksmd running every page counts
as not yet scanned; so do the pages of a scanner that is not running (killed,
or not started yet): its items died with it, and whoever scans the pages
next starts them from a first visit.

The reasons, in the order a page is tested against them (:data:`REASONS`):
not present; merged (maps a KSM page: the KSM page itself or a sharing
mapping); zero page; not mergeable (no MADV_MERGEABLE, no
PR_SET_MEMORY_MERGE); skipped by smart_scan at its last visit; volatile (its
checksum changed at its last visit, or it was written since it merged: the
kernel's pages_volatile); over max_page_sharing (its content's KSM pages are
all full: it waits to pair with another copy into a new dup, or stays alone);
unique so far (on the unstable tree, no copy found yet); waiting for its second
scan (a new page needs two visits with one checksum).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .._mm import control, pagetable, segments
from .._mm.pagetable import H_MERGE_ANY, H_NRANGES, H_RANGES, KSM, PRESENT, UNMAPPED, ZERO
from ..errors import ProcessDied
from .scanner import OVER_MAX_SHARING, SKIPPED, STABLE, UNSTABLE, VOLATILE, Scanner

REASONS: Final = ("not_present", "merged", "zero_page", "not_mergeable", "smart_scan_skipped", "volatile",
                  "over_max_page_sharing", "unique_so_far", "waiting_second_scan")
DESCRIPTIONS: Final = {
    "not_present": "never written, or unmapped",
    "merged": "maps a KSM page (the KSM page itself or a sharing mapping)",
    "zero_page": "maps the zero page (read before written, or use_zero_pages)",
    "not_mergeable": "no MADV_MERGEABLE and no PR_SET_MEMORY_MERGE",
    "smart_scan_skipped": "skipped by smart_scan: it kept failing to merge",
    "volatile": "changed since the last scan (pages_volatile)",
    "over_max_page_sharing": "its content's KSM pages are full (max_page_sharing): waits for a new dup",
    "unique_so_far": "no other page with its content found yet (pages_unshared)",
    "waiting_second_scan": "scanned fewer than twice: merging needs two scans with one checksum",
}
_HEADER_WORDS: Final = 2 * control.MAX_GUESTS + 1
_AREAS_WORD: Final = 2 * control.MAX_GUESTS  # the header's last word: scanners asked, one area each
OWNED: Final = 0x80  # in a scanner's area: the page is that scanner's (Scanner.owns)
_SEQ_BITS: Final = 20  # a request is the requester's pid << _SEQ_BITS | its sequence number
_requests = itertools.count(1)
_one_at_a_time = threading.Lock()  # one answer segment per process
_STATE_MASK: Final = OVER_MAX_SHARING - 1
ANSWER_SECONDS: Final = 10.0


def segment_name(prefix: str, pid: int) -> str:
    return f"{prefix}_explain{pid}"


def answer(scanner: Scanner, prefix: str, request: int) -> None:
    """ksmd's side: write every live guest's item states into this scanner's area of the answer
    segment of ``request``, with OWNED on the pages it owns."""
    try:
        seg = segments.attach(segment_name(prefix, request >> _SEQ_BITS))
    except FileNotFoundError:
        return  # the requester gave up meanwhile
    try:
        header = np.ndarray(_HEADER_WORDS, np.int64, seg.buf)
        if scanner.index < header[_AREAS_WORD]:
            for gid in scanner.system.live_guests():
                offset, pages = int(header[2 * gid]), int(header[2 * gid + 1])
                if pages:
                    states = scanner.item_states(gid)[:pages]
                    items = np.flatnonzero(states)
                    states[items[scanner.owns(gid, items)]] |= OWNED
                    np.ndarray(pages, np.uint8, seg.buf, offset + scanner.index * pages)[items] = states[items]
        del header
    finally:
        seg.close()


def combine(areas: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """One guest's states from the scanners' ``areas`` (one row per scanner): a page's owner's, if it has
    an item for it, else another scanner's (the item the page's previous owner has not freed yet)."""
    owned = (areas & OWNED) != 0
    mine = np.where(owned, areas & ~np.uint8(OWNED), 0).max(axis=0)
    states: npt.NDArray[np.uint8] = np.where(owned.any(axis=0), mine, areas.max(axis=0))
    return states


@contextmanager
def _answer_segment(prefix: str, pages: dict[int, int], areas: int) -> Iterator[memoryview]:
    """The requester's answer segment, laid out for guests of ``pages`` (gid → pages) and
    ``areas`` scanners; unlinked after."""
    size = 8 * _HEADER_WORDS + areas * sum(pages.values())
    seg = segments.create(segment_name(prefix, os.getpid()), size)
    try:
        buf = seg.buf
        assert buf is not None
        header = np.ndarray(_HEADER_WORDS, np.int64, buf)
        header[_AREAS_WORD] = areas
        offset = 8 * _HEADER_WORDS
        for gid, n in pages.items():
            header[2 * gid], header[2 * gid + 1] = offset, n
            offset += areas * n
        del header
        yield buf
    finally:
        segments.unlink(seg)


def _read_states(buf: memoryview, pages: dict[int, int]) -> dict[int, npt.NDArray[np.uint8]]:
    """The states of the guests of ``pages`` in an answered segment, each scanner's areas combined."""
    header = np.ndarray(_HEADER_WORDS, np.int64, buf)
    areas = int(header[_AREAS_WORD])
    states = {gid: combine(np.ndarray((areas, n), np.uint8, buf, int(header[2 * gid]))) for gid, n in pages.items()}
    del header
    return states


def _running(ctl: npt.NDArray[np.int64], areas: int) -> list[int]:
    """The scanners among the first ``areas`` whose process runs (its pid in its entry, alive)."""
    pids = (int(ctl[control.scanner_word(i, "scanner_pid")]) for i in range(areas))
    return [i for i, pid in enumerate(pids) if pid and segments.pid_alive(pid)]


def _answered(ctl: npt.NDArray[np.int64], request: int, areas: int) -> bool:
    """Has every running scanner among the first ``areas`` answered ``request`` (each in its own
    entry's explain_answer)?"""
    n = min(areas, max(1, int(ctl[control.INDEX["scanners"]])))
    return all(ctl[control.scanner_word(i, "explain_answer")] == request for i in _running(ctl, n))


def request_states(prefix: str, pages: dict[int, int], ctl: npt.NDArray[np.int64]
                   ) -> dict[int, npt.NDArray[np.uint8]]:
    """Ask ksmd for the item states of the guests of ``pages`` (gid → pages); zeros if no ksmd runs.

    ``ctl`` is the machine's control words.  Each running scanner writes the
    states of the pages it has items for (:func:`combine` keeps the owner's);
    a scanner that is not running answers nothing.  ProcessDied if a scanner
    runs but does not answer within ANSWER_SECONDS.
    """
    request_word = control.INDEX["explain_request"]
    areas = max(1, min(int(ctl[control.INDEX["scanners"]]), control.MAX_SCANNERS))
    me = os.getpid() << _SEQ_BITS | next(_requests) % (1 << _SEQ_BITS)
    if not _running(ctl, areas):
        return {gid: np.zeros(n, np.uint8) for gid, n in pages.items()}
    with _one_at_a_time, _answer_segment(prefix, pages, areas) as buf:
        ctl[request_word] = me
        deadline = time.monotonic() + ANSWER_SECONDS
        while not _answered(ctl, me, areas):
            other = int(ctl[request_word])
            if other != me and _answered(ctl, other, areas):
                ctl[request_word] = me  # another requester's turn is over
            if time.monotonic() > deadline:
                raise ProcessDied(f"ksmd did not answer the explain request in {ANSWER_SECONDS:g} s")
            time.sleep(0.002)
        return _read_states(buf, pages)


def mergeable_mask(header: npt.NDArray[np.int64], pages: int) -> npt.NDArray[np.bool_]:
    """Which pages of a guest KSM may scan: all with merge_any, else its MADV_MERGEABLE ranges."""
    mask = np.zeros(pages, np.bool_)
    if header[H_MERGE_ANY]:
        mask[:] = True
        return mask
    for i in range(int(header[H_NRANGES])):
        mask[int(header[H_RANGES + 2 * i]):int(header[H_RANGES + 2 * i + 1])] = True
    return mask


def classify(ptes: npt.NDArray[np.uint64], header: npt.NDArray[np.int64],
             states: npt.NDArray[np.uint8]) -> dict[str, int]:
    """Pages of one guest by reason (every page under exactly one: the counts sum to its pages)."""
    present = (ptes & np.uint64(PRESENT | UNMAPPED)) == np.uint64(PRESENT)
    ksm = present & ((ptes & np.uint64(KSM | ZERO)) == np.uint64(KSM))
    zero = present & ((ptes & np.uint64(ZERO)) != 0)
    rest = present & ~ksm & ~zero
    unmergeable = rest & ~mergeable_mask(header, len(ptes))
    rest &= ~unmergeable
    state = states & _STATE_MASK
    skipped = rest & (state == SKIPPED)
    volatile = rest & ((state == VOLATILE) | (state == STABLE))  # STABLE without a KSM PTE: written since
    unstable = rest & (state == UNSTABLE)
    over = unstable & ((states & OVER_MAX_SHARING) != 0)
    masks = {
        "not_present": ~present, "merged": ksm, "zero_page": zero, "not_mergeable": unmergeable,
        "smart_scan_skipped": skipped, "volatile": volatile, "over_max_page_sharing": over,
        "unique_so_far": unstable & ~over,
        "waiting_second_scan": rest & ~skipped & ~volatile & ~unstable,
    }
    return {reason: int(np.count_nonzero(masks[reason])) for reason in REASONS}


@dataclass(frozen=True)
class Explanation:
    """Every page of every guest under one reason: ``guests`` gid → reason → pages, and their ``total``."""

    guests: dict[int, dict[str, int]]
    total: dict[str, int]
    counters: dict[str, int]  # the machine's KSM counters when asked

    def as_dict(self) -> dict[str, Any]:
        return {"reasons": dict(DESCRIPTIONS), "guests": {str(g): row for g, row in self.guests.items()},
                "total": self.total, "counters": self.counters}


def explain(prefix: str, tables: dict[int, tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]],
            ctl: npt.NDArray[np.int64], counters: Callable[[], dict[str, int]]) -> Explanation:
    """The explanation of the guests of ``tables`` (gid → (PTEs, header)): ksmd's states, then the PTEs."""
    states = request_states(prefix, {gid: len(ptes) for gid, (ptes, _) in tables.items()}, ctl)
    rows = {gid: classify(ptes, header, states[gid]) for gid, (ptes, header) in tables.items()}
    return Explanation(rows, {reason: sum(row[reason] for row in rows.values()) for reason in REASONS},
                       counters())


@contextmanager
def attached_guests(prefix: str, ctl: npt.NDArray[np.int64]
                    ) -> Iterator[dict[int, tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]]]:
    """The (PTEs, header) of every live guest of the machine ``prefix``, attached from another process."""
    attached = []
    tables = {}
    try:
        for gid in range(control.MAX_GUESTS):
            if ctl[control.GUEST_BASE + control.GUEST_WORDS * gid + control.G_STATE] != control.GUEST_LIVE:
                continue
            try:
                seg = segments.attach(f"{prefix}_g{gid}")
            except FileNotFoundError:
                continue  # torn down meanwhile
            attached.append(seg)
            header = np.ndarray(pagetable.HEADER_WORDS, np.int64, seg.buf)
            tables[gid] = (np.ndarray(int(header[0]), np.uint64, seg.buf, 8 * pagetable.HEADER_WORDS), header)
        yield tables
    finally:
        tables.clear()
        for seg in attached:
            seg.close()
