"""Shadow-table worker: a secondary MMU, like KVM's shadow or EPT tables, and its vCPU.

For each guest it mirrors, the worker keeps a shadow page table ("sptes"):
one entry per guest page, holding the primary PTE it was filled from (with a
VALID bit) and the generation of the frame at that moment.  Its vCPU reads
guest memory through those entries, without the primary page-table lock, as
hardware walks EPT.  A missing entry is a *shadow fault* — the emulated
vmexit — counted, then filled from the primary PTE under its lock, as KVM's
page fault handler does:

    read_begin        (interval era: note the interval's sequence)
    fault             lock the primary PTL, read (or fault in) the PTE, note the
                      notifier head; unlock
    catch up          process every event produced before that point
    read_retry        (interval era: an invalidation bumped the sequence → retry)
    install           the entry, with the frame's generation

Callbacks arrive in order from the broker.  ``change_pte`` updates a valid
entry in place (no fault: the seed's point); an invalidation drops entries;
``clear_flush_young`` reports and clears the accessed bits; ``release`` drops
the guest for good.  A read through an entry whose frame generation changed
would be a read of a reused frame: it is counted (``S_STALE_READS``) and must
never happen.

Modes: ``rounds`` reads every mirrored page once each time the host asks;
``free`` reads continuously, a chunk at a time, between callbacks.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from shmksm import control, mmu_notifier as mn
from shmksm.pagetable import PFN_MASK, PRESENT
from shmksm.system import System

VALID = 1 << 63
_READ_BYTES = 64
_FREE_CHUNK = 256
_LAG_SAMPLES = 1 << 16


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
        self.cv = system.frames.cv
        self.epoch = control.INDEX["epoch"]
        self.sptes: dict[int, np.ndarray] = {}
        self.sgen: dict[int, np.ndarray] = {}
        self.accessed: dict[int, np.ndarray] = {}
        self.released: set[int] = set()
        self.interval_seq: dict[int, int] = {}
        self.in_progress = 0
        self.lags: list[int] = []
        self.lag_seen = 0
        self.part = int(self.row[mn.S_PART])

    # -- callbacks ---------------------------------------------------------------------

    def _table(self, gid: int) -> np.ndarray:
        spte = self.sptes.get(gid)
        if spte is None:
            pages = self.system.table(gid).pages
            spte = self.sptes[gid] = np.zeros(pages, np.uint64)
            self.sgen[gid] = np.zeros(pages, np.uint32)
            self.accessed[gid] = np.zeros(pages, np.uint8)
            self.interval_seq[gid] = 0
        return spte

    def process(self) -> int:
        """Run every callback the broker delivered; acknowledge; return how many ran."""
        v, b = self.v, self.base
        through = v[b + mn.S_THROUGH]  # read before the head: the broker writes it after
        head, tail = v[b + mn.S_HEAD], v[b + mn.S_TAIL]
        n = head - tail
        if n:
            first = tail % mn.SHADOW_N
            k = min(n, mn.SHADOW_N - first)
            recs = self.ring[first:first + k].tolist()
            for rec in recs:
                self.callback(rec)
            v[b + mn.S_TAIL] = tail + k
            v[b + mn.S_MESSAGES] += k
            if k < n:
                return k + self.process()
        if v[b + mn.S_TAIL] == v[b + mn.S_HEAD]:
            last = max(through, v[b + mn.S_ACKED])
            if last != v[b + mn.S_ACKED]:
                v[b + mn.S_ACKED] = last
                self.frames.acknowledge(self.part, last)
        return n

    def callback(self, rec: list[int]) -> None:
        word, a, b, t = rec
        kind, gid = word & 0xFF, (word >> 8) & 0xFF
        lag = time.monotonic_ns() - t
        v, base = self.v, self.base
        if lag > v[base + mn.S_LAG_MAX_NS]:
            v[base + mn.S_LAG_MAX_NS] = lag
        self.lag_seen += 1
        if len(self.lags) < _LAG_SAMPLES:
            self.lags.append(lag)
        else:
            j = int(np.random.randint(0, self.lag_seen))
            if j < _LAG_SAMPLES:
                self.lags[j] = lag
        if gid in self.released:
            v[base + mn.S_AFTER_RELEASE] += 1
            return
        spte = self._table(gid)
        if kind == mn.CHANGE_PTE:
            if spte[a]:
                pfn = b & PFN_MASK
                spte[a] = b | VALID
                self.sgen[gid][a] = self.gn[pfn]
                v[base + mn.S_UPDATED] += 1
        elif kind == mn.INVALIDATE_PAGE:
            spte[a] = 0
        elif kind == mn.RANGE_START:
            spte[a:b] = 0
            self.in_progress += 1
        elif kind == mn.RANGE_END:
            self.in_progress -= 1
        elif kind == mn.INVALIDATE:
            spte[a:b] = 0
            self.interval_seq[gid] += 1
        elif kind in (mn.CLEAR_YOUNG, mn.TEST_YOUNG):
            end = min(b, a + mn.YOUNG_PAGES)
            acc = self.accessed[gid]
            self.area.young[self.slot, :end - a] = acc[a:end]
            if kind == mn.CLEAR_YOUNG:
                acc[a:end] = 0
        elif kind == mn.RELEASE:
            self.released.add(gid)
            del self.sptes[gid], self.sgen[gid], self.accessed[gid]
            v[base + mn.S_RELEASES] += 1

    # -- the vCPU --------------------------------------------------------------------------------

    def read(self, gid: int, page: int) -> bytes:
        """Read through the shadow entry, faulting it in if it is missing."""
        spte = self._table(gid)
        e = int(spte[page])
        if not e:
            e = self.fault(gid, page)
        pfn = e & PFN_MASK
        if self.gn[pfn] != self.sgen[gid][page]:
            self.v[self.base + mn.S_STALE_READS] += 1
        self.accessed[gid][page] = 1
        self.v[self.base + mn.S_READS] += 1
        return bytes(self.flat[pfn << 12:(pfn << 12) + _READ_BYTES])

    def fault(self, gid: int, page: int) -> int:
        """A shadow fault: fill the entry from the primary PTE; return it."""
        v, base = self.v, self.base
        v[base + mn.S_FAULTS] += 1
        table = self.system.table(gid)
        while True:
            seq0 = self.interval_seq[gid]
            lock = table.ptl(page)
            lock.acquire()  # type: ignore[attr-defined]
            try:
                pte = table.pv[page]
                if not pte & PRESENT:
                    pte = table.handle_read_fault(page)
                gen = self.gn[pte & PFN_MASK]
                seen = self.cv[self.epoch]
            finally:
                lock.release()  # type: ignore[attr-defined]
            self.catch_up(seen)
            if gid in self.released:
                raise LookupError(f"guest {gid} was released")
            if self.interval_seq[gid] != seq0:
                v[base + mn.S_RETRIES] += 1
                continue
            entry = pte | VALID
            self.sptes[gid][page] = entry
            self.sgen[gid][page] = gen
            return entry

    def catch_up(self, seq: int, timeout: float = 10.0) -> None:
        """Process callbacks until every event before ``seq`` has been seen."""
        deadline = time.monotonic() + timeout
        v, base = self.v, self.base
        while True:
            self.process()
            if v[base + mn.S_ACKED] >= seq:
                return
            if v[mn.H_SLEEPING]:
                v[mn.H_SLEEPING] = 0
                self.system.locks.broker_bell.release()
            if time.monotonic() > deadline:
                raise TimeoutError("the notifier broker did not deliver in time")
            time.sleep(0.00005)

    def round(self) -> None:
        """Read every page of every mirrored, unreleased guest once."""
        for gid in sorted(self.sptes):
            pages = len(self.sptes[gid])
            for page in range(pages):
                if gid in self.released:
                    break
                self.read(gid, page)
                if page % 64 == 0:
                    self.process()

    def summary(self) -> dict[str, Any]:
        row = self.row
        lags = np.array(self.lags or [0], np.int64)
        return {
            "slot": self.slot, "faults": int(row[mn.S_FAULTS]), "reads": int(row[mn.S_READS]),
            "retries": int(row[mn.S_RETRIES]), "messages": int(row[mn.S_MESSAGES]),
            "updated_in_place": int(row[mn.S_UPDATED]), "releases": int(row[mn.S_RELEASES]),
            "stale_reads": int(row[mn.S_STALE_READS]), "after_release": int(row[mn.S_AFTER_RELEASE]),
            "lag_max_us": round(int(row[mn.S_LAG_MAX_NS]) / 1000, 1),
            "lag_p99_us": round(float(np.percentile(lags, 99)) / 1000, 1),
        }


def shadow(system: System, slot: int, guests: list[int], mode: str = "rounds") -> dict[str, Any]:
    """The shadow worker's main loop: callbacks, and reads as ``mode`` says."""
    s = Shadow(system, slot)
    for gid in guests:
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
            for page in range(start, min(start + _FREE_CHUNK, pages)):
                if gid in s.released:
                    break
                s.read(gid, page)
            cursor += 1
            continue
        if not ran:
            v[base + mn.S_SLEEPING] = 1
            if v[base + mn.S_HEAD] == v[base + mn.S_TAIL] and v[base + mn.S_THROUGH] == v[base + mn.S_ACKED]:
                bell.acquire(timeout=0.02)
            v[base + mn.S_SLEEPING] = 0
            if os.getppid() != host:
                break
    s.process()
    return s.summary()
