"""A secondary MMU, like KVM's shadow or EPT tables, and its vCPU.

For each guest it mirrors, the worker keeps a shadow page table ("sptes"):
one entry per guest page, holding the primary PTE it was filled from (with a
VALID bit) and the generation of the frame at that moment.  Its vCPU reads
guest memory through those entries, without the primary page-table lock, as
hardware walks EPT.  A missing entry is a *shadow fault* — the emulated
vmexit — counted, then filled from the primary PTE under its lock, as KVM's
page fault handler does:

    read_begin        note the guest's sequence of callbacks (KVM's mmu_invalidate_seq)
                      and the interval's (the interval notifier's; wait while an
                      invalidation of the interval is in progress)
    fault             lock the primary PTL, read (or fault in) the PTE, note the
                      notifier head; unlock
    catch up          process every event produced before that point
    read_retry        a callback touched the guest (or the interval) or ended an
                      invalidation of it since read_begin, or an invalidation is
                      in progress → retry
    install           the entry, with the frame's generation

The PTL is taken with a try, running callbacks between tries: a producer may
hold it while it waits for a ``sync`` shadow to acknowledge an invalidation.

Callbacks arrive in order from the broker.  ``change_pte`` does what KVM's
handler (kvm_set_pte_rmapp) did from the seed on: it touches only a valid
entry; a *read-only* new PTE (a merge: the KSM page, or the page itself
write-protected) repoints the entry in place, writable bit cleared — no fault,
the seed's point; a *writable* new PTE (copy-on-write) drops the entry, so the
next access faults whatever the era.  An invalidation drops entries;
``clear_flush_young`` reports and clears the accessed bits; ``release`` drops
the guest for good.  The interval notifier's ``invalidate`` drops entries and
sets the sequence of each interval it covers (``mn.INTERVAL_PAGES`` pages) to
its own sequence number, marking the interval's invalidation in progress until
``INVALIDATE_END``.  A read through an entry whose frame generation changed
would be a read of a reused frame: it is counted (``S_STALE_READS``) and must
never happen.

Callbacks in bulk
-----------------
The worker takes whatever the broker delivered since it last looked as one
batch.  A short batch runs record by record (:meth:`Shadow.callback`); a
longer one runs with numpy (:meth:`Shadow.run_batch`), with the same result as
running its records one by one in order: records that touch one page each
(change_pte, invalidate_page, a one-page invalidate_range_start or
interval invalidate, invalidate_range_end) are applied together, per guest —
a change_pte with a writable PTE counts as an invalidation of its page; an
entry ends up dropped if any invalidation of its page is in the run, and a
change_pte updates an entry (and counts) only if the entry was valid before
the run and no invalidation of its page came before it; the last such
change_pte gives the entry its PTE.  Every other record (wider ranges, young
queries, release) splits the run and goes through :meth:`Shadow.callback` at
its place.  Frame generations read when the batch runs are those of the
records' time: a frame named by a record is not reused before this worker
acknowledges a later event, and it acknowledges only after the batch.

Message lag (now - the producer's time stamp) is counted per batch in a
log-linear histogram (32 bins per power of two: p99 within 3 %), for the
summary's p99 over every message; ``S_LAG_MAX_NS`` is exact.

Waiting: an idle worker polls its ring for ``_SPIN_NS`` before it sleeps on
its doorbell (without sched_yield(), for the reason given in
``shmksm._kvm.broker``); a burst that follows a burst is taken without a
wake-up.

Modes: ``rounds`` reads every mirrored page once each time the host asks;
``free`` reads continuously, a chunk at a time.  Both look at the ring every
``_POLL_READS`` reads and run what arrived.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from .._mm import control, faults
from .._mm import mmu_notifier as mn
from .._mm.frames import WAITING
from .._mm.pagetable import PFN_MASK, PRESENT, UNMAPPED, WRITE, PageTable
from .._mm.system import System

VALID = 1 << 63
_VALID64 = np.uint64(VALID)
_READ_BYTES = 64
_FREE_CHUNK = 256
_POLL_READS = 8  # reads between two looks at the ring
_VECTOR_MIN = 16  # shorter batches run record by record
_SPIN_NS = 100_000  # an idle worker polls this long before sleeping on its doorbell
_CATCH_UP_SPIN_NS = 20_000  # a fault polls this long for the broker, then sleeps between looks
_LAG_BINS = 2048


class Released(LookupError):
    """The guest was released while the worker faulted one of its pages in."""


# -- message lag histogram: values below 64 ns exactly, then 32 bins per power of two --------------------


def lag_bin(lag: int) -> int:
    """The histogram bin of one lag in ns."""
    if lag < 64:
        return max(lag, 0)
    e = lag.bit_length()
    return min(64 + (e - 7) * 32 + ((lag >> (e - 6)) & 31), _LAG_BINS - 1)


def lag_bins(lags: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """lag_bin of every element (lags below 2**53 ns)."""
    lags = np.maximum(lags, 0)
    e = np.frexp(lags.astype(np.float64))[1].astype(np.int64)  # the bit length
    shifted = lags >> np.maximum(e - 6, 0)
    return np.where(lags < 64, lags, np.minimum(64 + (e - 7) * 32 + (shifted & 31), _LAG_BINS - 1))


def lag_bin_top(i: int) -> int:
    """The largest lag of bin ``i``."""
    if i < 64:
        return i
    e, m = (i - 64) // 32 + 7, (i - 64) % 32
    return ((33 + m) << (e - 6)) - 1


def lag_percentile(hist: npt.NDArray[np.int64], q: float) -> int:
    """The ``q``-th percentile (nearest rank) of the lags counted in ``hist``, as its bin's top; 0 if none."""
    total = int(hist.sum())
    if not total:
        return 0
    rank = max(1, -(-int(q * total) // 100))
    return lag_bin_top(int(np.searchsorted(np.cumsum(hist), rank)))


def apply_points(spte: npt.NDArray[np.uint64], sgen: npt.NDArray[np.uint32], gen: npt.NDArray[np.uint32],
                 kind: npt.NDArray[np.int64], pages: npt.NDArray[np.int64],
                 vals: npt.NDArray[np.int64]) -> tuple[int, int, int]:
    """Apply one guest's run of one-page records to its tables, as one by one in order.

    Returns (change_pte that updated an entry, invalidate_range_start minus
    _end, records that move the guest's sequence: every change_pte,
    invalidation and invalidate_range_end).
    A change_pte repoints a valid entry if its PTE is read-only, and drops
    it if the PTE is writable (kvm_set_pte_rmapp).
    """
    change = kind == mn.CHANGE_PTE
    zap = change & ((vals & WRITE) != 0)  # a writable new PTE: KVM drops the entry
    inval = (kind == mn.INVALIDATE_PAGE) | (kind == mn.RANGE_START) | (kind == mn.INVALIDATE) | zap
    in_progress = int(np.count_nonzero(kind == mn.RANGE_START)) - int(np.count_nonzero(kind == mn.RANGE_END))
    cpos = np.flatnonzero(change & ~zap)
    ipos = np.flatnonzero(inval)
    updated = 0
    if len(cpos):
        cpages = pages[cpos]
        live = spte[cpages] != 0  # valid before the run
        if len(ipos) and live.any():
            # ... and no invalidation of the same page before the change_pte
            ipages, first = np.unique(pages[ipos], return_index=True)
            j = np.minimum(np.searchsorted(ipages, cpages), len(ipages) - 1)
            live &= (ipages[j] != cpages) | (ipos[first][j] > cpos)
        updated = int(np.count_nonzero(live))
        if updated:
            # the last effective change_pte of each page gives the entry
            upages, last = np.unique(cpages[live][::-1], return_index=True)
            ptes = vals[cpos[live]][::-1][last]
            spte[upages] = ptes.view(np.uint64) | _VALID64
            sgen[upages] = gen[ptes & PFN_MASK]
    if len(ipos):
        spte[pages[ipos]] = 0
    ends = int(np.count_nonzero(kind == mn.RANGE_END))
    return updated, in_progress, len(cpos) + len(ipos) - int(np.count_nonzero(kind == mn.INVALIDATE)) + ends


# Records that move a guest's sequence (KVM's mmu_invalidate_seq); the interval's go per interval.
# The end of a range invalidation too, as kvm_mmu_invalidate_end: a fault whose read_begin came
# after the start may have read the PTE before the change, and sees no invalidation in progress
# once the end has run.
_TOUCHING = frozenset((mn.CHANGE_PTE, mn.INVALIDATE_PAGE, mn.RANGE_START, mn.RANGE_END))
_INTERVAL_SHIFT = mn.INTERVAL_PAGES.bit_length() - 1


class Shadow:
    """The worker's state: its shadow tables and counters."""

    def __init__(self, system: System, slot: int) -> None:
        self.system = system
        self.slot = slot
        area = system.notify_area
        self.area = area
        self.row = area.slots[slot]
        self.base = area.slot_base(slot)
        self.v = area.v
        self.ring = area.shadow_rings[slot]
        self.frames = system.frames
        self.flat = system.frames.flat
        self.gn = system.frames.gn
        self.fl = system.frames.fl
        self.gen = system.frames.gen
        self.cv = system.frames.cv
        self.epoch = control.INDEX["epoch"]
        self.sptes: dict[int, npt.NDArray[np.uint64]] = {}
        self.sgen: dict[int, npt.NDArray[np.uint32]] = {}
        self.accessed: dict[int, npt.NDArray[np.uint8]] = {}
        # Scalar views of the same arrays, for the vCPU's per-page reads.
        self.spte_v: dict[int, memoryview] = {}
        self.sgen_v: dict[int, memoryview] = {}
        self.accessed_v: dict[int, memoryview] = {}
        self.released: set[int] = set()
        # Per guest: callbacks that touched its entries (KVM's mmu_invalidate_seq),
        # and invalidate_range_start calls not yet ended (mmu_invalidate_in_progress).
        self.mmu_seq: dict[int, int] = {}
        self.in_progress: dict[int, int] = {}
        # Per guest and interval: the interval's sequence (set by invalidate to its
        # cur_seq) and the invalidations of it in progress (until INVALIDATE_END).
        self.iseq: dict[int, npt.NDArray[np.int64]] = {}
        self.iactive: dict[int, npt.NDArray[np.int32]] = {}
        self.lag_hist = np.zeros(_LAG_BINS, np.int64)
        self.part = int(self.row[mn.S_PART])

    # -- callbacks ---------------------------------------------------------------------

    def _table(self, gid: int) -> npt.NDArray[np.uint64]:
        spte = self.sptes.get(gid)
        if spte is None:
            pages = self.primary(gid).pages
            spte = self.sptes[gid] = np.zeros(pages, np.uint64)
            self.sgen[gid] = np.zeros(pages, np.uint32)
            self.accessed[gid] = np.zeros(pages, np.uint8)
            self.spte_v[gid] = spte.data.cast("B").cast("Q")
            self.sgen_v[gid] = self.sgen[gid].data.cast("B").cast("I")
            self.accessed_v[gid] = self.accessed[gid].data
            self.mmu_seq.setdefault(gid, 0)
            self.in_progress.setdefault(gid, 0)
            intervals = (pages + mn.INTERVAL_PAGES - 1) >> _INTERVAL_SHIFT
            self.iseq.setdefault(gid, np.zeros(intervals, np.int64))
            self.iactive.setdefault(gid, np.zeros(intervals, np.int32))
        return spte

    def primary(self, gid: int) -> PageTable:
        """The guest's page table; Released if the guest was torn down before this worker attached it."""
        try:
            return self.system.table(gid)
        except FileNotFoundError:
            raise Released(f"guest {gid} is gone") from None

    def process(self) -> int:
        """Run every callback the broker delivered; acknowledge; return how many ran."""
        v, b = self.v, self.base
        through = v[b + mn.S_THROUGH]  # read before the head: the broker writes it after
        head, tail = v[b + mn.S_HEAD], v[b + mn.S_TAIL]
        n = head - tail
        while tail != head:
            first = tail % mn.SHADOW_N
            k = min(head - tail, mn.SHADOW_N - first)
            recs = self.ring[first:first + k]
            if self.cv[faults.ARMED] and k > 1:
                self._apply(recs[:k // 2])
                faults.hit(self.cv, faults.SHADOW_MID_BATCH)
                self._apply(recs[k // 2:])
            else:
                self._apply(recs)
            tail += k
            v[b + mn.S_TAIL] = tail  # the broker may overwrite the records from here on
            v[b + mn.S_MESSAGES] += k
        if v[b + mn.S_HEAD] == tail:
            last = max(through, v[b + mn.S_ACKED])
            if last != v[b + mn.S_ACKED]:
                v[b + mn.S_ACKED] = last
                self.frames.acknowledge(self.part, last)
        return int(n)

    def _apply(self, recs: npt.NDArray[np.int64]) -> None:
        """Run the callbacks of ``recs``, in order, and count their lags."""
        if len(recs) < _VECTOR_MIN:
            rows = recs.tolist()
            for rec in rows:
                self.callback(rec)
            self._count_lags([rec[3] for rec in rows])
        else:
            self.run_batch(recs)
            self._count_lag_array(recs[:, 3])

    def _count_lags(self, stamps: list[int]) -> None:
        now = time.monotonic_ns()
        hist = self.lag_hist
        worst = 0
        for t in stamps:
            lag = now - t
            hist[lag_bin(lag)] += 1
            worst = max(worst, lag)
        i = self.base + mn.S_LAG_MAX_NS
        self.v[i] = max(self.v[i], worst)

    def _count_lag_array(self, stamps: npt.NDArray[np.int64]) -> None:
        lags = time.monotonic_ns() - stamps
        self.lag_hist += np.bincount(lag_bins(lags), minlength=_LAG_BINS)
        worst = int(lags.max())
        i = self.base + mn.S_LAG_MAX_NS
        self.v[i] = max(self.v[i], worst)

    def callback(self, rec: list[int]) -> None:
        """Run one record's callback."""
        word, a, b, _t = rec
        kind, gid = word & 0xFF, (word >> 8) & 0xFF
        v, base = self.v, self.base
        if kind == mn.REGISTER:
            # A new registration (after a release, too): mirror the guest afresh.
            self.released.discard(gid)
            with contextlib.suppress(Released):
                self._table(gid)
            return
        if gid in self.released:
            v[base + mn.S_AFTER_RELEASE] += 1
            return
        try:
            spte = self._table(gid)
        except Released:
            return  # torn down before this worker first looked: its release is on the way
        if kind in _TOUCHING:
            self.mmu_seq[gid] += 1
        elif kind in (mn.INVALIDATE, mn.INVALIDATE_END):
            i, j = a >> _INTERVAL_SHIFT, ((b - 1) >> _INTERVAL_SHIFT) + 1
            if kind == mn.INVALIDATE:
                self.iseq[gid][i:j] = word >> 24  # mmu_interval_set_seq(cur_seq)
                self.iactive[gid][i:j] += 1
            else:
                self.iactive[gid][i:j] -= 1
        if kind == mn.CHANGE_PTE:
            if not spte[a]:
                return  # kvm_set_pte_rmapp walks existing sptes only
            if b & WRITE:
                spte[a] = 0  # a writable host PTE: drop, the next access faults
            else:
                spte[a] = b | VALID  # read-only: the new frame, not writable
                self.sgen[gid][a] = self.gn[b & PFN_MASK]
                v[base + mn.S_UPDATED] += 1
        elif kind == mn.INVALIDATE_PAGE:
            spte[a] = 0
        elif kind == mn.RANGE_START:
            spte[a:b] = 0
            self.in_progress[gid] += 1
        elif kind == mn.RANGE_END:
            self.in_progress[gid] -= 1
        elif kind == mn.INVALIDATE:
            spte[a:b] = 0
        elif kind in (mn.CLEAR_YOUNG, mn.TEST_YOUNG):
            end = min(b, a + mn.YOUNG_PAGES)
            acc = self.accessed[gid]
            self.area.young[self.slot, :end - a] = acc[a:end]
            if kind == mn.CLEAR_YOUNG:
                acc[a:end] = 0
        elif kind == mn.RELEASE:
            self.released.add(gid)
            del self.sptes[gid], self.sgen[gid], self.accessed[gid]
            del self.spte_v[gid], self.sgen_v[gid], self.accessed_v[gid]
            # Invalidations in progress end with the registration: a new one starts afresh.
            del self.iseq[gid], self.iactive[gid]
            self.in_progress[gid] = 0
            v[base + mn.S_RELEASES] += 1

    def run_batch(self, recs: npt.NDArray[np.int64]) -> None:
        """Run the callbacks of ``recs`` in order: runs of one-page records with numpy, the rest one by one."""
        kind = recs[:, 0] & 0xFF
        ranged = (kind == mn.RANGE_START) | (kind == mn.INVALIDATE) | (kind == mn.INVALIDATE_END)
        young = (kind == mn.CLEAR_YOUNG) | (kind == mn.TEST_YOUNG)
        special = np.flatnonzero(young | (kind >= mn.RELEASE) | (ranged & (recs[:, 2] - recs[:, 1] != 1)))
        if not len(special):
            self._run_points(recs, kind)
            return
        start = 0
        for at in [*special.tolist(), len(recs)]:
            if at - start >= _VECTOR_MIN:
                self._run_points(recs[start:at], kind[start:at])
            elif at > start:
                for rec in recs[start:at].tolist():
                    self.callback(rec)
            if at < len(recs):
                self.callback(recs[at].tolist())
            start = at + 1

    def _run_points(self, recs: npt.NDArray[np.int64], kind: npt.NDArray[np.int64]) -> None:
        """Callbacks of records that each touch at most one page (no young query, no release)."""
        gids = (recs[:, 0] >> 8) & 0xFF
        g0 = int(gids[0])
        if (gids == g0).all():
            self._run_guest_points(g0, kind, recs[:, 1], recs[:, 2], recs[:, 0] >> 24)
            return
        for g in np.flatnonzero(np.bincount(gids)).tolist():
            sel = gids == g
            self._run_guest_points(g, kind[sel], recs[sel, 1], recs[sel, 2], recs[sel, 0] >> 24)

    def _run_guest_points(self, gid: int, kind: npt.NDArray[np.int64], pages: npt.NDArray[np.int64],
                          vals: npt.NDArray[np.int64], seqs: npt.NDArray[np.int64]) -> None:
        v, base = self.v, self.base
        if gid in self.released:
            v[base + mn.S_AFTER_RELEASE] += len(kind)
            return
        try:
            spte = self._table(gid)
        except Released:
            return
        updated, in_progress, touched = apply_points(spte, self.sgen[gid], self.gen, kind, pages, vals)
        self.in_progress[gid] += in_progress
        self.mmu_seq[gid] += touched
        if updated:
            v[base + mn.S_UPDATED] += updated
        inval, end = kind == mn.INVALIDATE, kind == mn.INVALIDATE_END
        if inval.any() or end.any():
            at = pages[inval] >> _INTERVAL_SHIFT
            np.maximum.at(self.iseq[gid], at, seqs[inval])  # the last invalidate's cur_seq
            np.add.at(self.iactive[gid], at, 1)
            np.subtract.at(self.iactive[gid], pages[end] >> _INTERVAL_SHIFT, 1)

    def warm_up(self) -> None:
        """Run the batch path once on scratch tables: numpy's first calls import modules (tens of ms)."""
        kind = np.array([mn.CHANGE_PTE, mn.RANGE_START, mn.CHANGE_PTE, mn.RANGE_END, mn.INVALIDATE], np.int64)
        apply_points(np.full(4, _VALID64), np.zeros(4, np.uint32), self.gen, kind,
                     np.array([0, 1, 1, 1, 2], np.int64), np.zeros(5, np.int64))
        lag_bins(np.arange(0, 1 << 20, 4099, dtype=np.int64))
        lag_percentile(self.lag_hist, 99)

    # -- the vCPU --------------------------------------------------------------------------------

    def read(self, gid: int, page: int) -> bytes:
        """Read through the shadow entry, faulting it in if it is missing.  Released if the guest is gone."""
        if gid in self.released:
            raise Released(f"guest {gid} was released")
        sv = self.spte_v.get(gid)
        if sv is None:
            self._table(gid)
            sv = self.spte_v[gid]
        e = sv[page]
        if not e:
            e = self.fault(gid, page)
            if not e:
                return b""  # unmapped: no memory there (KVM would find no memory slot)
        pfn = e & PFN_MASK
        v, base = self.v, self.base
        if (self.gn[pfn] != self.sgen_v[gid][page] and self.fl[pfn] != WAITING
                and self.primary(gid).pv[page] & PFN_MASK != pfn):
            # A new life since the entry was filled, not waiting for this
            # shadow's acknowledgment, and not the page's own frame any more:
            # the frame was reused under the entry.
            v[base + mn.S_STALE_READS] += 1
        self.accessed_v[gid][page] = 1
        v[base + mn.S_READS] += 1
        return bytes(self.flat[pfn << 12:(pfn << 12) + _READ_BYTES])

    def fault(self, gid: int, page: int) -> int:
        """A shadow fault: fill the entry from the primary PTE; return it.  Released if the guest went meanwhile."""
        v, base = self.v, self.base
        v[base + mn.S_FAULTS] += 1
        table = self.primary(gid)
        interval = page >> _INTERVAL_SHIFT
        while True:
            self.process()
            # read_begin: mmu_interval_read_begin waits while an invalidation of the interval is in progress.
            self._await(lambda: not self.iactive[gid][interval], gid)
            seq0, iseq0 = self.mmu_seq[gid], self.iseq[gid][interval]
            lock = table.ptl(page)
            while not lock.acquire(False):
                self.process()  # its holder may wait for this shadow to run an invalidation
            try:
                pte = table.pv[page]
                if pte & UNMAPPED:
                    return 0
                if not pte & PRESENT:
                    pte = table.handle_read_fault(page)
                gen = self.gn[pte & PFN_MASK]
                seen = self.cv[self.epoch]
            finally:
                lock.release()
            self.catch_up(seen)
            if gid in self.released:
                raise Released(f"guest {gid} was released")
            if (self.mmu_seq[gid] != seq0 or self.in_progress[gid] or self.iseq[gid][interval] != iseq0
                    or self.iactive[gid][interval]):
                # read_retry: a callback touched this guest's entries (or the
                # interval) since read_begin, so the PTE read may be stale
                # already — and its invalidation acknowledged (KVM's
                # mmu_invalidate_retry, mmu_interval_read_retry).  An
                # invalidation still in progress is waited out first.
                v[base + mn.S_RETRIES] += 1
                self._await(lambda: not self.in_progress[gid], gid)
                continue
            entry = pte | VALID
            self.sptes[gid][page] = entry
            self.sgen[gid][page] = gen
            return int(entry)

    def _await(self, cond: Any, gid: int, timeout: float = 10.0) -> None:
        """Run callbacks until ``cond()``: the end of an invalidation comes after the producer's PTE change.

        Released as soon as the guest is (its release, run by this worker's
        last look at the ring, drops the tables ``cond`` reads).
        """
        deadline = time.monotonic() + timeout
        while True:
            if gid in self.released:
                raise Released(f"guest {gid} was released")
            if cond():
                return
            self.process()
            if self.v[mn.H_SLEEPING]:
                self.v[mn.H_SLEEPING] = 0
                self.system.locks.broker_bell.release()
            if time.monotonic() > deadline:
                raise TimeoutError("an invalidation did not end in time")
            time.sleep(0.00005)

    def catch_up(self, seq: int, timeout: float = 10.0) -> None:
        """Process callbacks until every event before ``seq`` has been seen.

        Polls for ``_CATCH_UP_SPIN_NS``, then sleeps 50 us between looks: a
        reading shadow faults often, and a longer poll would take the CPU from
        the broker it waits for.
        """
        v, base = self.v, self.base
        start = time.monotonic_ns()
        deadline = start + int(timeout * 1e9)
        while True:
            self.process()
            if v[base + mn.S_ACKED] >= seq:
                return
            if v[mn.H_SLEEPING]:
                v[mn.H_SLEEPING] = 0
                self.system.locks.broker_bell.release()
            now = time.monotonic_ns()
            if now > deadline:
                raise TimeoutError("the notifier broker did not deliver in time")
            if now - start >= _CATCH_UP_SPIN_NS:
                time.sleep(0.00005)

    def ring_pending(self) -> bool:
        """Is there anything to run or to acknowledge?"""
        v, b = self.v, self.base
        return bool(v[b + mn.S_HEAD] != v[b + mn.S_TAIL] or v[b + mn.S_THROUGH] != v[b + mn.S_ACKED])

    def read_run(self, gid: int, start: int, end: int) -> None:
        """Read pages [start, end) of guest ``gid`` once each, running callbacks as they arrive."""
        v, b = self.v, self.base
        read = self.read
        for page in range(start, end):
            if not (page - start) % _POLL_READS and v[b + mn.S_HEAD] != v[b + mn.S_TAIL]:
                self.process()
            if gid in self.released:
                return
            try:
                read(gid, page)
            except Released:
                return

    def round(self) -> None:
        """Read every page of every mirrored, unreleased guest once."""
        for gid in sorted(self.sptes):
            if gid in self.sptes:
                self.read_run(gid, 0, len(self.sptes[gid]))

    def wait(self, bell: Any) -> None:
        """Idle: poll for ``_SPIN_NS``, then sleep on the doorbell until the broker rings or 20 ms pass."""
        v, base = self.v, self.base
        deadline = time.monotonic_ns() + _SPIN_NS
        while time.monotonic_ns() < deadline:
            if (self.ring_pending() or v[base + mn.S_STOP]
                    or v[base + mn.S_ROUND_REQ] > v[base + mn.S_ROUND_DONE]):
                return
        v[base + mn.S_SLEEPING] = 1
        if not self.ring_pending():
            bell.acquire(timeout=0.02)
        v[base + mn.S_SLEEPING] = 0

    def summary(self) -> dict[str, Any]:
        row = self.row
        return {
            "slot": self.slot, "faults": int(row[mn.S_FAULTS]), "reads": int(row[mn.S_READS]),
            "retries": int(row[mn.S_RETRIES]), "messages": int(row[mn.S_MESSAGES]),
            "updated_in_place": int(row[mn.S_UPDATED]), "releases": int(row[mn.S_RELEASES]),
            "stale_reads": int(row[mn.S_STALE_READS]), "after_release": int(row[mn.S_AFTER_RELEASE]),
            "lag_max_us": round(int(row[mn.S_LAG_MAX_NS]) / 1000, 1),
            "lag_p99_us": round(min(lag_percentile(self.lag_hist, 99), int(row[mn.S_LAG_MAX_NS])) / 1000, 1),
        }


def shadow(system: System, slot: int, guests: list[int], mode: str = "rounds") -> dict[str, Any]:
    """The shadow worker's main loop: callbacks, and reads as ``mode`` says."""
    s = Shadow(system, slot)
    s.warm_up()
    for gid in guests:
        with contextlib.suppress(Released):
            s._table(gid)
    v, base = s.v, s.base
    bell = system.locks.shadow_bells[slot]
    host = os.getppid()
    cursor = 0
    while not v[base + mn.S_STOP]:
        ran = s.process()
        if mode == "rounds" and v[base + mn.S_ROUND_REQ] > v[base + mn.S_ROUND_DONE]:
            req = v[base + mn.S_ROUND_REQ]
            s.round()
            s.process()
            v[base + mn.S_ROUND_DONE] = req
            continue
        if mode == "free" and s.sptes:
            gids = sorted(s.sptes)
            gid = gids[cursor % len(gids)]
            pages = len(s.sptes[gid])
            start = (cursor // len(gids) * _FREE_CHUNK) % pages
            s.read_run(gid, start, min(start + _FREE_CHUNK, pages))
            cursor += 1
            continue
        if not ran:
            s.wait(bell)
            if os.getppid() != host:
                break
    s.process()
    return s.summary()
