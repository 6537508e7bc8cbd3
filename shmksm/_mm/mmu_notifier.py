"""MMU notifiers: keeping secondary MMUs (shadow page tables) coherent with the PTEs.

DOC: Overview (after mm/mmu_notifier.c)
---------------------------------------
A secondary MMU — KVM's shadow or EPT tables here played by *shadow workers* —
caches translations of a guest's pages.  Whenever a PTE changes, the primary
MMU notifies every registered secondary so that it drops or updates its copy.
This module is the producer side and the shared layout; the broker
(``shmksm._kvm.broker``) fans events out to the shadows
(``shmksm._kvm.shadow``).

The seed of this project is Linux commit 828502d30073 (2009), which added
``set_pte_at_notify()`` and the ``change_pte`` callback so that KVM could point
its shadow entry at a newly merged KSM page at once, instead of dropping it
and taking a vmexit on the next access.  Three eras of the same call sites
are selectable (``notifier_era``), so the fate of that optimization can be
measured:

* ``2009`` — ``change_pte`` alone: the shadow updates its entry in place;
* ``2012`` — ``change_pte`` bracketed by ``invalidate_range_start/end``
  (commit 6bdb913f0a70): the shadow drops the entry at *start*, so
  ``change_pte`` finds nothing to update and the next access faults;
* ``2024`` — no ``change_pte`` at all (Linux 6.10): invalidate only;
* ``interval`` — the interval notifier: ``invalidate(range, cur_seq)`` and a
  seqcount-like read side in the shadow (read_begin → fault → lock → read_retry),
  with a sequence per interval of ``INTERVAL_PAGES`` pages; read_begin waits
  while an invalidation of its interval is in progress (between the
  ``invalidate`` and the ``INVALIDATE_END`` that marks the change done, as the
  kernel's interval tree makes its sequence even again at range_end).

A notifier registered without a ``change_pte`` callback receives
``invalidate_page`` instead in 2009 (``__mmu_notifier_change_pte``'s
fallback); from 2012 on it receives nothing for it — 6bdb913f0a70 deleted the
fallback, the range calls around it covering the change.  The broker
converts or drops (a 2012 change_pte record carries ``BRACKETED``).

How it is emulated
------------------
Producers (the scanner's merges, guests' copy-on-write, unmerge, munmap and
exit) append fixed-size records to one ring in shared memory, under the
*notify lock*: so the order of the ring is the order of the PTE changes.  As
the kernel does from 2012, the start of an invalidation comes *before* the PTE
changes (:meth:`Notifier.begin_change`, :meth:`Notifier.begin_range`, or the
start records of a run sent before its page-table lock is taken) and its end
after (:meth:`Notifier.end_change`, :meth:`Notifier.end_range`); change_pte
comes after the PTE change, under its page-table lock.  Delivery is
asynchronous: when a producer has changed a PTE, a shadow may still read
through its old entry until it has run the invalidation.  A shadow added with
``sync`` closes that window as the kernel's synchronous callbacks do: every
start of an invalidation waits until each such shadow has acknowledged it
(:meth:`Notifier.wait_synced`) before the PTE changes.  The ring's head —
the number of events ever produced — is also the reclamation epoch (control
field ``epoch``): a frame dropped after event ``s`` waits until every
registered shadow has processed every event up to ``s``
(:mod:`shmksm.frames`).  A shadow never reads a reused frame.

Every invalidation a producer starts is recorded as open, in the critical
section that publishes its start records, until the one that publishes its
end: a producer killed in between (ksmd sends a run's starts before it takes
the run's page-table lock) would otherwise leave the invalidation in progress
on every shadow for good.  Recovery ends those of dead processes
(:meth:`Notifier.close_dead_locked`).

A record is four int64 words::

    word 0   kind | gid << 8 | shadow << 16 | seq << 24
    word 1   page, or start of a range
    word 2   PTE (change_pte), or end of a range, or a request id
    word 3   time.monotonic_ns() when produced (message lag)

The segment is organized as follows (int64 words)::

    [0, HDR)                       header: broker state, counters (H_* below)
    [HDR, +4*MAIN_N)               the main ring, written by producers
    [.., +SLOT_WORDS*MAX_SHADOWS)  shadow slots (S_* below)
    [.., +4*SHADOW_N*MAX_SHADOWS)  one ring per shadow, written by the broker
    [.., +MAX_SHADOWS*YOUNG_PAGES/8)  per-shadow young-bit answers (uint8)
    [.., +OPEN_WORDS*MAX_OPEN)     open invalidations (O_* below)
    [.., +MAX_GUESTS)              registrations per guest (producers skip guests with none)

Left out: the RCU (SRCU from 2012) that protects the notifier list, sleeping
and non-sleeping variants, and the secondary TLB flush of arch hooks: a
shadow is a process reading frames.  ``test_young`` came in 2011 (Linux
2.6.38, for transparent huge pages): the 2009 era has ``clear_flush_young``
only.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..errors import InternalError, UsageError
from . import control
from .segments import pid_alive
from .waiting import poll_until

ERAS: Final = ("2009", "2012", "2024", "interval")

# Record kinds.
CHANGE_PTE: Final = 1
INVALIDATE_PAGE: Final = 2
RANGE_START: Final = 3
RANGE_END: Final = 4
INVALIDATE: Final = 5  # interval notifier: invalidate(range, cur_seq)
CLEAR_YOUNG: Final = 6
TEST_YOUNG: Final = 7
INVALIDATE_END: Final = 8  # interval notifier: the invalidation is over (the interval tree's seq even again)
RELEASE: Final = 9  # kinds from here on are handled by the broker at their place in the order
REGISTER: Final = 10  # control, for the broker
UNREGISTER: Final = 11  # control, for the broker
KIND_NAMES: Final = {CHANGE_PTE: "change_pte", INVALIDATE_PAGE: "invalidate_page",
                     RANGE_START: "invalidate_range_start", RANGE_END: "invalidate_range_end",
                     INVALIDATE: "invalidate", CLEAR_YOUNG: "clear_flush_young", TEST_YOUNG: "test_young",
                     INVALIDATE_END: "invalidate_end", RELEASE: "release", REGISTER: "register",
                     UNREGISTER: "unregister"}
INTERVAL_PAGES: Final = 512  # pages per interval of the interval notifier

MAX_SHADOWS: Final = 16
MAIN_N: Final = 1 << 16
SHADOW_N: Final = 1 << 15
YOUNG_PAGES: Final = 1 << 16  # pages per clear_flush_young request
REC: Final = 4
# A flag in a change_pte record's word (the shadow field, unused there): the
# call is bracketed by invalidate_range_start/end (2012), so a notifier without
# change_pte gets no invalidate_page for it.
BRACKETED: Final = 1 << 16

# Header words.
HDR: Final = 64
H_TAIL: Final = 0  # next record the broker reads
H_SLEEPING: Final = 1  # the broker waits on its doorbell
H_BROKER_PID: Final = 2
H_STOP: Final = 3
H_DELIVERED: Final = 4  # records written to shadow rings
H_BUSY_NS: Final = 5  # broker time spent delivering
H_BATCHES: Final = 6
H_SYNC: Final = 7  # live shadows added with sync: producers wait for their acknowledgement

# Shadow slot words.
SLOT_WORDS: Final = 32
S_STATE: Final = 0  # SLOT_FREE, SLOT_LIVE, SLOT_DEAD
S_PID: Final = 1
S_CHANGE_PTE: Final = 2  # the notifier has a change_pte callback
S_GUESTS: Final = 3  # bitmask of registered guests, as the broker sees it
S_HEAD: Final = 4  # shadow ring: written by the broker
S_TAIL: Final = 5  # shadow ring: read by the shadow
S_THROUGH: Final = 6  # every event < this was delivered (or filtered out) by the broker
S_ACKED: Final = 7  # every event < this was processed by the shadow
S_SLEEPING: Final = 8
S_PART: Final = 9  # reclamation participant slot
S_FAULTS: Final = 10
S_READS: Final = 11
S_RETRIES: Final = 12
S_RELEASES: Final = 13
S_MESSAGES: Final = 14
S_UPDATED: Final = 15  # change_pte that updated an entry in place
S_ROUND_REQ: Final = 16
S_ROUND_DONE: Final = 17
S_LAG_MAX_NS: Final = 18
S_STOP: Final = 19
S_AFTER_RELEASE: Final = 20  # callbacks for a guest after its release: must stay 0
S_REGISTERED: Final = 21  # bitmask of registrations the host made (never released twice)
S_STALE_READS: Final = 22  # reads through an entry whose frame generation changed: must stay 0
S_SYNC: Final = 23  # producers wait for this shadow's acknowledgement of an invalidation's start
S_DEAD_AT: Final = 24  # the ring's head when the host marked the slot dead: the broker frees it after

SLOT_FREE: Final = 0
SLOT_LIVE: Final = 1
SLOT_DEAD: Final = 2

# The open invalidations: an entry per invalidation whose start records a
# producer published and whose end it has not, so that recovery can send the
# ends a killed producer owed (Notifier.close_dead_locked).
MAX_OPEN: Final = 128  # invalidations open at once: a producer has one at a time, mostly
OPEN_WORDS: Final = 6
O_STATE: Final = 0  # OPEN_FREE, OPEN_PENDING, OPEN_LIVE, OPEN_CLOSING
O_SEQ: Final = 1  # sequence number of its first start record
O_WHO: Final = 2  # n | gid << 26 | era << 34 | pid << 36: its start records, guest, era and process
O_A: Final = 3  # the range of its first start record
O_B: Final = 4
O_CLOSE_SEQ: Final = 5  # sequence number of its first end record, while closing
OPEN_FREE: Final = 0
OPEN_PENDING: Final = 1  # its starts written, maybe not published (the head not yet moved past them)
OPEN_LIVE: Final = 2  # its starts published, its end not
OPEN_CLOSING: Final = 3  # its ends written, maybe not published
_END_OF: Final = {RANGE_START: RANGE_END, INVALIDATE: INVALIDATE_END}


def segment_words() -> int:
    return (HDR + REC * MAIN_N + SLOT_WORDS * MAX_SHADOWS + REC * SHADOW_N * MAX_SHADOWS
            + MAX_SHADOWS * YOUNG_PAGES // 8 + MAX_OPEN * OPEN_WORDS + control.MAX_GUESTS)


def era_number(era: str | int) -> int:
    """The index of an era name; UsageError for anything else."""
    if isinstance(era, int) and 0 <= era < len(ERAS):
        return era
    if str(era) in ERAS:
        return ERAS.index(str(era))
    raise UsageError(f"unknown notifier era {era!r}; eras: {', '.join(ERAS)}")


# Every Notifier of this process, for the fork hook below.
_NOTIFIERS: Final[weakref.WeakSet[Notifier]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for notifier in list(_NOTIFIERS):
        notifier.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class NotifyArea:
    """Views of the notifier segment in one process."""

    def __init__(self, buf: memoryview) -> None:
        words = segment_words()
        self.words: npt.NDArray[np.int64] = np.ndarray(words, np.int64, buf)
        off = HDR
        self.hdr = self.words[:HDR]
        self.ring = self.words[off:off + REC * MAIN_N].reshape(MAIN_N, REC)
        off += REC * MAIN_N
        self.slots = self.words[off:off + SLOT_WORDS * MAX_SHADOWS].reshape(MAX_SHADOWS, SLOT_WORDS)
        off += SLOT_WORDS * MAX_SHADOWS
        self.shadow_rings = self.words[off:off + REC * SHADOW_N * MAX_SHADOWS].reshape(MAX_SHADOWS, SHADOW_N, REC)
        off += REC * SHADOW_N * MAX_SHADOWS
        young_words = MAX_SHADOWS * YOUNG_PAGES // 8
        young = self.words[off:off + young_words]
        self.young: npt.NDArray[np.uint8] = young.view(np.uint8).reshape(MAX_SHADOWS, YOUNG_PAGES)
        off += young_words
        self.open_base = off
        self.open = self.words[off:off + MAX_OPEN * OPEN_WORDS].reshape(MAX_OPEN, OPEN_WORDS)
        off += MAX_OPEN * OPEN_WORDS
        self.nreg = self.words[off:off + control.MAX_GUESTS]
        # Scalar views for the hot paths.
        flat = self.words.data.cast("B").cast("q")
        self.v = flat
        self.ring_v = flat[HDR:HDR + REC * MAIN_N]
        self.nreg_v = flat[len(flat) - control.MAX_GUESTS:]

    def slot_base(self, slot: int) -> int:
        return HDR + REC * MAIN_N + SLOT_WORDS * slot

    def release_views(self) -> None:
        for view in (self.ring_v, self.nreg_v, self.v):
            view.release()
        del self.words, self.hdr, self.ring, self.slots, self.shadow_rings, self.young, self.open, self.nreg


class Notifier:
    """The producer side, in any process that changes PTEs (mmu_notifier_* calls).

    The records of a PTE change are appended while its page-table lock is
    held (the starts may come before it is taken); every append takes the
    notify lock.
    """

    def __init__(self, area: NotifyArea, ctl_view: memoryview, lock: Any, bell: Any) -> None:
        self.area = area
        self.cv = ctl_view
        self.lock = lock
        self.doorbell = bell.release
        self.nreg = area.nreg_v
        self.ring = area.ring_v
        self.v = area.v
        self.era_index = control.INDEX["notifier_era"]
        self.head_index = control.INDEX["epoch"]
        self.open_base = area.open_base
        # This process's open invalidations, innermost last, per thread: entries of the
        # area's table of open invalidations (-1: one the full table did not record).
        self._stacks: dict[int, list[int]] = {}
        self._tid = -1
        self._stack: list[int] = []
        self._pid = os.getpid()
        self._hint = self._pid % MAX_OPEN  # the entry this process tries first
        _NOTIFIERS.add(self)
        # A holder killed inside an append leaves its entry half done: repaired by the next.
        lock.on_owner_dead = self.repair_open_locked

    def active(self, gid: int) -> bool:
        """Does any notifier watch guest ``gid``?  (mm_has_notifiers)"""
        return bool(self.nreg[gid])

    # -- the calls of mm/, in the kernel's order ---------------------------------------

    def begin_change(self, gid: int, page: int) -> int:
        """Before a PTE change of ``page`` (set_pte_at_notify's call sites): invalidate_range_start.

        Returns the era the change is notified in (pass it to
        :meth:`end_change`), or -1 when no notifier watches the guest.  2009
        sends nothing here; 2012 and 2024 invalidate_range_start; the
        interval notifier its ``invalidate``.  With a ``sync`` shadow, waits
        until it has run the start.  May hold the PTL of ``page``.
        """
        if not self.nreg[gid]:
            return -1
        era = int(self.cv[self.era_index])
        if era:
            self.wait_synced(self.emit_many(self.start_records(page, page + 1, era), gid, opening=era))
        return era

    def end_change(self, gid: int, page: int, pte: int, era: int) -> None:
        """After the PTE change (its PTL held): change_pte and invalidate_range_end as era ``era`` had them.

        In 2009, with a ``sync`` shadow, waits until it has run the change_pte
        (the only call there is).
        """
        if era >= 0:
            records = self.end_records(page, page + 1, era, pte)
            seq = self.emit_many(records, gid, closing=era > 0)
            if era == 0:
                self.wait_synced(seq + len(records) - 1)

    def begin_range(self, gid: int, start: int, end: int) -> int:
        """invalidate_range_start before zapping [start, end) (munmap), in every era; the era, or -1."""
        if not self.nreg[gid]:
            return -1
        era = int(self.cv[self.era_index])
        self.wait_synced(self.emit_many(self.start_records(start, end, max(era, 2)), gid, opening=max(era, 2)))
        return era

    def end_range(self, gid: int, start: int, end: int, era: int) -> None:
        """invalidate_range_end after zapping [start, end)."""
        if era >= 0:
            self.emit_many(self.end_records(start, end, max(era, 2)), gid, closing=True)

    @staticmethod
    def start_records(start: int, end: int, era: int) -> tuple[tuple[int, int, int], ...]:
        """The records before a change of [start, end) in era ``era`` (none for a change in 2009)."""
        if era == 0:
            return ()
        return ((INVALIDATE if era == 3 else RANGE_START, start, end),)

    @staticmethod
    def end_records(start: int, end: int, era: int, pte: int = -1) -> tuple[tuple[int, int, int], ...]:
        """The records after a change of [start, end) in era ``era``: change_pte (``pte`` >= 0) and the end."""
        if era == 0:
            return ((CHANGE_PTE, start, pte),) if pte >= 0 else ()
        if era == 1:
            if pte >= 0:
                return ((CHANGE_PTE | BRACKETED, start, pte), (RANGE_END, start, end))
            return ((RANGE_END, start, end),)
        return ((INVALIDATE_END if era == 3 else RANGE_END, start, end),)

    def begin_pages(self, gid: int, pages: list[int], era: int) -> None:
        """invalidate_range_start of each of ``pages`` before their PTEs change, in era ``era`` (nothing in
        2009 or with no notifier, era -1); with a ``sync`` shadow, wait until it has run them."""
        if era > 0:
            records = [self.start_records(page, page + 1, era)[0] for page in pages]
            self.wait_synced(self.emit_many(records, gid, opening=era) + len(records) - 1)

    def end_pages(self, gid: int, pages: list[int], changes: list[tuple[int, int]], era: int) -> None:
        """After the changes (their PTL held): change_pte of each (page, pte) of ``changes`` (2009, 2012)
        and invalidate_range_end of each of ``pages`` (from 2012); a ``sync`` shadow has run a 2009 change_pte."""
        if era < 0:
            return
        kind = CHANGE_PTE if era == 0 else CHANGE_PTE | BRACKETED
        records = [(kind, page, pte) for page, pte in changes] if era <= 1 else []
        if era:
            records.extend(self.end_records(page, page + 1, era)[0] for page in pages)
        if records:
            seq = self.emit_many(records, gid, closing=era > 0)
            if era == 0:
                self.wait_synced(seq + len(records) - 1)

    def era(self, gid: int) -> int:
        """The era changes of guest ``gid`` are notified in now, or -1 when no notifier watches it."""
        return int(self.cv[self.era_index]) if self.nreg[gid] else -1

    def wait_synced(self, seq: int, timeout: float = 10.0) -> None:
        """Return once every live ``sync`` shadow has run event ``seq`` (the kernel's callbacks return
        when done).  Takes no lock; the broker and the shadows never wait for a page-table lock."""
        if not self.v[H_SYNC]:
            return
        area = self.area
        bases = [area.slot_base(slot) for slot in range(MAX_SHADOWS)]
        v = self.v

        def acked() -> bool:
            return all(v[b + S_STATE] != SLOT_LIVE or not v[b + S_SYNC] or v[b + S_ACKED] > seq for b in bases)

        if v[H_SLEEPING]:
            v[H_SLEEPING] = 0
            self.doorbell()
        poll_until(acked, timeout, lambda: InternalError("a sync shadow did not acknowledge an invalidation"),
                   first=0.00002, most=0.001)

    # -- recovery ---------------------------------------------------------------------------

    def invalidate_range_locked(self, gid: int, start: int, end: int) -> None:
        """invalidate_range_start and _end together, for a caller that holds the notify lock (recovery)."""
        era = max(int(self.cv[self.era_index]), 2)
        for kind, a, b in self.start_records(start, end, era) + self.end_records(start, end, era):
            self.emit_locked(kind, gid, a, b)

    # -- the ring ------------------------------------------------------------------------

    def emit(self, kind: int, gid: int, a: int, b: int, shadow: int = 0) -> int:
        """Append one record; return its sequence number.  Takes the notify lock."""
        lock = self.lock
        lock.acquire()
        try:
            return self.emit_locked(kind, gid, a, b, shadow)
        finally:
            lock.release()

    def emit_many(self, records: tuple[tuple[int, int, int], ...] | list[tuple[int, int, int]], gid: int,
                  opening: int = 0, closing: bool = False) -> int:
        """Append (kind, a, b) records of guest ``gid`` in one critical section; return the first's sequence.

        One head read, one time stamp and one doorbell check for all of them.
        ``opening`` (an era): the records start an invalidation, recorded as
        open by this thread until the append with ``closing`` that ends it
        (see :meth:`close_dead_locked`).  Takes the notify lock.
        """
        lock = self.lock
        lock.acquire()
        try:
            cv, v, ring = self.cv, self.v, self.ring
            n = len(records)
            seq = cv[self.head_index]
            while seq + n - v[H_TAIL] > MAIN_N:
                self._wait_for_room(seq + n - 1)
                seq = cv[self.head_index]
            now = time.monotonic_ns()
            word = gid << 8
            for i, (kind, a, b) in enumerate(records):
                base = ((seq + i) % MAIN_N) * REC
                ring[base] = kind | word | (seq + i) << 24
                ring[base + 1] = a
                ring[base + 2] = b
                ring[base + 3] = now
            entry = -1
            if opening:
                # An entry of the open invalidations for it (inline: this is the path of every
                # notified PTE change), pending until the head moves past its starts.
                entry = self._hint
                at = self.open_base + entry * OPEN_WORDS
                if v[at] != OPEN_FREE:
                    entry = self._free_entry_locked()
                    at = self.open_base + entry * OPEN_WORDS
                if entry >= 0:
                    v[at + O_SEQ] = seq
                    v[at + O_WHO] = n | gid << 26 | opening << 34 | self._pid << 36
                    v[at + O_A] = records[0][1]
                    v[at + O_B] = records[0][2]
                    v[at] = OPEN_PENDING
                self._thread_open().append(entry)
            elif closing:
                stack = self._thread_open()
                entry = stack.pop() if stack else -1
                if entry >= 0:
                    at = self.open_base + entry * OPEN_WORDS
                    v[at + O_CLOSE_SEQ] = seq
                    v[at] = OPEN_CLOSING
            cv[self.head_index] = seq + n
            if entry >= 0:
                v[at] = OPEN_LIVE if opening else OPEN_FREE  # published
            if v[H_SLEEPING]:
                v[H_SLEEPING] = 0
                self.doorbell()
            return int(seq)
        finally:
            lock.release()

    # -- open invalidations -----------------------------------------------------------------

    def _thread_open(self) -> list[int]:
        """This thread's open invalidations (entries; -1 for one not recorded), innermost last."""
        tid = threading.get_ident()
        if tid == self._tid:  # the thread that produced last (producers have one, mostly)
            return self._stack
        stack = self._stacks.get(tid)
        if stack is None:
            stack = self._stacks[tid] = []
        self._tid, self._stack = tid, stack
        return stack

    def forked(self) -> None:
        """In a fork's child: its parent's open invalidations are not its own."""
        self._stacks, self._tid, self._stack, self._pid = {}, -1, [], os.getpid()
        self._hint = self._pid % MAX_OPEN

    def _free_entry_locked(self) -> int:
        """A free entry of the open invalidations, this process's next try; -1 when all are taken."""
        v, base0 = self.v, self.open_base
        for k in range(1, MAX_OPEN + 1):
            entry = (self._hint + k) % MAX_OPEN
            if v[base0 + entry * OPEN_WORDS + O_STATE] == OPEN_FREE:
                self._hint = entry
                return entry
        return -1

    def repair_open_locked(self) -> None:
        """The notify lock was had from a dead holder: settle the entry it left half done.

        Pending or closing entries exist only inside an append, lock held, so
        any found now are the dead holder's: its records were published if
        the head moved past them.  A start published is live (recovery ends
        it); an end published frees its entry; one not published leaves it
        as it was before.
        """
        v, head = self.v, int(self.cv[self.head_index])
        for entry in range(MAX_OPEN):
            base = self.open_base + entry * OPEN_WORDS
            state = v[base + O_STATE]
            if state == OPEN_PENDING:
                v[base + O_STATE] = OPEN_LIVE if head > v[base + O_SEQ] else OPEN_FREE
            elif state == OPEN_CLOSING:
                v[base + O_STATE] = OPEN_FREE if head > v[base + O_CLOSE_SEQ] else OPEN_LIVE

    def close_dead_locked(self) -> int:
        """Send the ends a dead producer owed: for every open invalidation of a process that no
        longer runs, the end of each of its start records.  Notify lock held (recovery).

        A producer killed between the starts of an invalidation and their
        ends (ksmd sends a run's starts before it takes the run's page-table
        lock) would leave every shadow waiting for the ends: a fault on the
        guest waits while an invalidation is in progress.  The ends match the
        starts one by one, read back from the ring; once the ring has wrapped
        over them, from the entry (its first range, as many times as it had
        starts).  Returns the invalidations closed.
        """
        v, ring = self.v, self.ring
        head = int(self.cv[self.head_index])
        closed = 0
        for entry in range(MAX_OPEN):
            base = self.open_base + entry * OPEN_WORDS
            who = int(v[base + O_WHO])
            if v[base + O_STATE] != OPEN_LIVE or pid_alive(who >> 36):
                continue
            seq, n, gid, era = int(v[base + O_SEQ]), who & 0x3FFFFFF, who >> 26 & 0xFF, who >> 34 & 0x3
            ends: list[tuple[int, int, int]] = []
            if head - seq <= MAIN_N:
                for k in range(seq, seq + n):
                    at = (k % MAIN_N) * REC
                    word = ring[at]
                    if word >> 24 == k and word & 0xFF in _END_OF:
                        ends.append((_END_OF[word & 0xFF], ring[at + 1], ring[at + 2]))
            if len(ends) != n:
                ends = [self.end_records(int(v[base + O_A]), int(v[base + O_B]), era)[-1]] * n
            for kind, a, b in ends:
                self.emit_locked(kind, gid, a, b)
            v[base + O_STATE] = OPEN_FREE
            closed += 1
        return closed

    def emit_locked(self, kind: int, gid: int, a: int, b: int, shadow: int = 0) -> int:
        """Append one record with the notify lock held; wait while the ring is full."""
        cv, v = self.cv, self.v
        seq = cv[self.head_index]
        while seq - v[H_TAIL] >= MAIN_N:
            self._wait_for_room(seq)
            seq = cv[self.head_index]
        base = (seq % MAIN_N) * REC
        ring = self.ring
        ring[base] = kind | gid << 8 | shadow << 16 | seq << 24
        ring[base + 1] = a
        ring[base + 2] = b
        ring[base + 3] = time.monotonic_ns()
        cv[self.head_index] = seq + 1
        if v[H_SLEEPING]:
            v[H_SLEEPING] = 0
            self.doorbell()
        return int(seq)

    def _wait_for_room(self, seq: int) -> None:
        """The ring is full: wake the broker and wait, without the notify lock.

        The broker takes the notify lock to lower the registration counts, so
        waiting with it held could wait forever.  The caller still holds the
        page-table lock of its PTE, so no event of that PTE can overtake it.
        """
        def wake_broker() -> None:
            self.v[H_SLEEPING] = 0
            self.doorbell()

        self.lock.release()
        try:
            poll_until(lambda: seq - self.v[H_TAIL] < MAIN_N, 10.0,
                       lambda: InternalError("the notifier broker stopped draining its ring"),
                       check=wake_broker, first=0.0001, most=0.0001)
        finally:
            self.lock.acquire()
