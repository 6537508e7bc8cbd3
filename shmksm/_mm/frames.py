"""The frame pool, frame metadata, the allocator and deferred reclamation.

The pool is ``uint8[nframes, 4096]`` in one segment; frame 0 is the zero page.
The metadata segment is organized as follows (``n`` = nframes)::

    int32[n]   mapcount   PTEs mapping the frame; while WAITING, the epoch it was dropped in (mod 2**32)
    uint32[n]  gen        bumped every time the frame is freed (or a KSM page becomes private)
    int32[n]   next       link of the free list or of the waiting list, -1 ends a list
    uint8[n]   flags      INUSE, WAITING, KSM
    uint16[b]  claims     (8-byte aligned) the parallel scanners' content claims, b = claim_buckets(n)
                          buckets, at least 4 per frame (shmksm._ksm.claims)

13 bytes per frame; with the 8-byte PTE, 21 bytes of metadata per 4 KiB page; and
the claims, 8 to 16 bytes per frame, read only with several scanners.

**Reclamation.**  A frame dropped by a copy-on-write, a merge or an unmap is
not free at once: a secondary MMU (a shadow worker) may still read it through
an entry it has not yet invalidated.  It goes to the tail of the waiting list,
tagged with the current *epoch*: the number of notifier events produced so
far (control field ``epoch``, the head of the notifier ring), which includes
the event that invalidated the frame's last mapping.  A *participant* (a
shadow worker) acknowledges how many events it has processed; a reclaim pass
moves every waiting frame whose tag is at most the oldest acknowledgment to
the free list.  With no participant, waiting frames are reusable at the next
pass: the scheme of RCU and the kernel's mmu_gather.  Tags are the low 32
bits of the epoch, compared modulo 2**32.

**NUMA nodes.**  The pool is split into ``nodes`` ranges of frames, node
``k`` holding frames ``[k * n // nodes, (k + 1) * n // nodes)``; each node
has its own free list (control's node area).  An allocation names the node
of the guest it is for: it takes a frame of that node, and only when that
node has none left after a reclaim pass, one of the next nodes in turn.  Each
is counted as the kernel's zone_statistics counts it (numa_hit, numa_miss,
numa_foreign, local_node, other_node: the allocating process runs on its
guest's node).  The waiting list is one for every node; a reclaim pass puts
each frame back on its own node's list.

**Deferred puts.**  Under mitigation "vusion" a write fault on a
write-protected page does not drop the old frame's mapping itself: what that
costs differs between a KSM page (its mapcount goes down, the frame stays)
and a private page (the frame is freed), and the attacker times the fault.
The fault queues the old frame on a ring in the control segment
(:meth:`Frames.defer_put`, the same steps for either), and the put — the
mapcount, the free, the ``cow_ksm`` or ``cow_faults`` count — is done later
by :meth:`Frames.drain_deferred`: by ksmd at every turn of its loop, by an
allocation that found no free frame, by a fault that found the ring full.
A queued frame counts one mapping more than its PTEs: the checker adds the
ring to its count, and recovery, which rebuilds mapcounts from the PTEs,
counts the ring's copies and empties it.  Every step writes the ring's
position word last on queueing and first on draining, so a death between
leaves a frame with a mapping too many (a leak until recovery), never one
put twice.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..errors import InternalError, OutOfFrames
from . import control, faults
from .locks import Lock, LockTable
from .waiting import poll_until

PAGE_SIZE: Final = 4096
PAGE_SHIFT: Final = 12
ZERO_PFN: Final = 0

# Frame flags.
INUSE: Final = 1
WAITING: Final = 2
KSM: Final = 4

META_BYTES_PER_FRAME: Final = 13
FRAME_DTYPE: Final = np.dtype((np.void, PAGE_SIZE))
NO_EPOCH_ACK: Final = 1 << 62
ZERO_PAGE_BYTES: Final = bytes(PAGE_SIZE)

# Control words of the allocator, resolved once: alloc and put are on the copy-on-write path.
_FREE_COUNT: Final = control.INDEX["free_count"]
_NODE_BASE: Final = control.NODE_BASE
_NODE_WORDS: Final = control.NODE_WORDS
_N_FREE_HEAD: Final = control.N_FREE_HEAD
_N_FREE_COUNT: Final = control.N_FREE_COUNT
_WAIT_HEAD: Final = control.INDEX["wait_head"]
_WAIT_TAIL: Final = control.INDEX["wait_tail"]
_WAIT_COUNT: Final = control.INDEX["wait_count"]
_EPOCH: Final = control.INDEX["epoch"]
_DEFERRED_HEAD: Final = control.INDEX["deferred_head"]
_DEFERRED_TAIL: Final = control.INDEX["deferred_tail"]
_DEFERRED_BASE: Final = control.DEFERRED_BASE
_DEFERRED_MASK: Final = control.DEFERRED_MASK
_DEFERRED_SLOTS: Final = control.DEFERRED_SLOTS
_COW_KSM: Final = control.INDEX["cow_ksm"]
_COW_FAULTS: Final = control.INDEX["cow_faults"]
_FRAME_WAIT_SECONDS: Final = 5.0  # how long with_frames waits for shadows to acknowledge


def epoch_tag(epoch: int) -> int:
    """The tag a frame dropped in ``epoch`` carries in its mapcount word: the epoch's low 32 bits, signed."""
    epoch &= 0xFFFFFFFF
    return epoch - ((epoch & 0x80000000) << 1)


def oldest_first(waiting: npt.NDArray[np.intp], mapcount: npt.NDArray[np.int32], epoch: int) -> npt.NDArray[np.intp]:
    """Waiting frames in reclamation order: by the epoch each was dropped in, oldest first (mod 2**32)."""
    age = (epoch - mapcount[waiting].astype(np.int64)) & 0xFFFFFFFF
    return waiting[np.argsort(-age, kind="stable")]


def claim_buckets(nframes: int) -> int:
    """Entries of the scanners' table of content claims: a power of two, at least 4 per frame."""
    return 1 << max(10, (4 * nframes - 1).bit_length())


def _claims_offset(nframes: int) -> int:
    return -(-META_BYTES_PER_FRAME * nframes // 8) * 8


def meta_size(nframes: int) -> int:
    """The metadata segment: per frame its mapcount, generation, link and flags; then the
    parallel scanners' content claims (shmksm._ksm.claims), 2 bytes per bucket."""
    return _claims_offset(nframes) + 2 * claim_buckets(nframes)


def node_of(pfn: Any, nframes: int, nodes: int) -> Any:
    """The NUMA node of frame ``pfn`` (an int or an array of them)."""
    return ((pfn + 1) * nodes - 1) // nframes


def link_free_lists(nxt: npt.NDArray[np.int32], ctl: npt.NDArray[np.int64], free: npt.NDArray[np.intp]) -> None:
    """Make ``free`` (ascending pfns) the free lists, each frame on its node's; set the counts.

    The caller holds the allocator lock, or the machine is not running yet.
    """
    nodes = int(ctl[control.INDEX["nodes"]])
    of = node_of(free, len(nxt), nodes)
    for node in range(nodes):
        lst = free[of == node]
        base = _NODE_BASE + _NODE_WORDS * node
        if len(lst):
            nxt[lst[:-1]] = lst[1:]
            nxt[lst[-1]] = -1
        ctl[base + _N_FREE_HEAD] = int(lst[0]) if len(lst) else -1
        ctl[base + _N_FREE_COUNT] = len(lst)
    ctl[_FREE_COUNT] = len(free)


def link_waiting_list(nxt: npt.NDArray[np.int32], ctl: npt.NDArray[np.int64], waiting: npt.NDArray[np.intp]) -> None:
    """Make ``waiting`` (oldest first) the waiting list.  The allocator lock held."""
    if len(waiting):
        nxt[waiting[:-1]] = waiting[1:]
        nxt[waiting[-1]] = -1
    ctl[_WAIT_HEAD] = int(waiting[0]) if len(waiting) else -1
    ctl[_WAIT_TAIL] = int(waiting[-1]) if len(waiting) else -1
    ctl[_WAIT_COUNT] = len(waiting)


class FramesPending(Exception):
    """No free frame now, but some wait for acknowledgments: retry unlocked."""


class Frames:
    """The pool, its metadata and the allocator, as seen from one process."""

    def __init__(self, pool_buf: memoryview, meta_buf: memoryview,
                 ctl: npt.NDArray[np.int64], locks: LockTable) -> None:
        n = len(pool_buf) // PAGE_SIZE
        self.nframes = n
        self.pool: npt.NDArray[np.uint8] = np.ndarray((n, PAGE_SIZE), np.uint8, pool_buf)
        # The pool again, one item of 4096 bytes per frame: numpy gathers and
        # scatters whole frames by pfn with one memcpy each.
        self.rows: npt.NDArray[np.void] = np.ndarray(n, FRAME_DTYPE, pool_buf)
        self.flat: memoryview = pool_buf
        # The mmap under the pool's memoryview: its slices read into bytes and
        # assign from any buffer in one step, and move() copies a frame in place.
        if not isinstance(pool_buf.obj, mmap.mmap):
            raise InternalError(f"the frame pool must be a shared-memory mapping, not {type(pool_buf.obj).__name__}")
        self.mm: mmap.mmap = pool_buf.obj
        self.mapcount: npt.NDArray[np.int32] = np.ndarray(n, np.int32, meta_buf, 0)
        self.gen: npt.NDArray[np.uint32] = np.ndarray(n, np.uint32, meta_buf, 4 * n)
        self.next: npt.NDArray[np.int32] = np.ndarray(n, np.int32, meta_buf, 8 * n)
        self.flags: npt.NDArray[np.uint8] = np.ndarray(n, np.uint8, meta_buf, 12 * n)
        self.claims: npt.NDArray[np.uint16] = np.ndarray(claim_buckets(n), np.uint16, meta_buf, _claims_offset(n))
        # Scalar access through memoryviews is several times faster than numpy's.
        self.mc = meta_buf[0:4 * n].cast("i")
        self.nx = meta_buf[8 * n:12 * n].cast("i")
        self.fl = meta_buf[12 * n:13 * n]
        self.gn = meta_buf[4 * n:8 * n].cast("I")
        self.ctl = ctl
        self.cv = ctl.data.cast("B").cast("q")
        self.nodes = int(ctl[control.INDEX["nodes"]])
        self.locks = locks
        self.alloc_lock: Lock = locks.alloc
        self.stat_lock: Lock = locks.stat
        self.frame_locks: Sequence[Lock] = locks.frame
        self._nframe_locks = len(self.frame_locks)
        # A holder of the allocator lock died: its lists may be half-updated.
        locks.alloc.on_owner_dead = self.repair_lists_locked

    def release_views(self) -> None:
        """Drop every view so that the segments can be closed."""
        for view in (self.mc, self.nx, self.fl, self.gn, self.cv):
            view.release()
        del self.pool, self.rows, self.mapcount, self.gen, self.next, self.flags, self.claims, self.ctl

    @staticmethod
    def format(pool: npt.NDArray[np.uint8], meta_buf: memoryview, ctl: npt.NDArray[np.int64]) -> None:
        """Initialize a new machine: frame 0 is the zero page, the rest are free on their nodes' lists."""
        n = len(pool)
        nxt = np.ndarray(n, np.int32, meta_buf, 8 * n)
        flags = np.ndarray(n, np.uint8, meta_buf, 12 * n)
        flags[0] = INUSE
        link_free_lists(nxt, ctl, np.arange(1, n, dtype=np.intp))
        I = control.INDEX
        ctl[I["wait_head"]] = ctl[I["wait_tail"]] = -1
        ctl[I["wait_count"]] = 0
        for p in range(control.MAX_PARTICIPANTS):
            ctl[control.PART_BASE + 2 * p + 1] = NO_EPOCH_ACK

    # -- the allocator -------------------------------------------------------

    def alloc(self, count: int = -1, node: int = 0, depth: int = 0) -> int:
        """Take a free frame for a guest of NUMA ``node``; return its pfn, flagged INUSE with mapcount 0.

        Takes the allocator lock (callers may hold a page-table or frame lock).
        ``count``, a control word index, is incremented under the same lock
        (the copy-on-write path counts cow_ksm there: one lock, not two).
        The frame is the node's, else another node's (see the module's text):
        its list's first, or with ``depth`` the one that many further down
        (as far as the list goes), for a caller that places pages at random.
        Raises FramesPending when only waiting frames remain, OutOfFrames when
        none remain at all.  With no free frame on the node, the deferred puts
        are done first (:meth:`drain_deferred`): the caller may hold a
        page-table lock, not a frame lock.
        """
        cv = self.cv
        lock = self.alloc_lock
        lock.acquire()
        try:
            if cv[faults.ARMED] and faults.hit(cv, faults.FRAMES_ALLOC) == faults.FAIL:
                raise OutOfFrames("out of frames: injected failure (frames.alloc)")
            home = _NODE_BASE + _NODE_WORDS * node
            at = home
            pfn = cv[home + _N_FREE_HEAD]
            if pfn < 0 and cv[_DEFERRED_TAIL] != cv[_DEFERRED_HEAD]:
                # Puts deferred may free frames: do them (their frame locks
                # come before this lock), then look again.
                lock.release()
                try:
                    self.drain_deferred()
                finally:
                    lock.acquire()
                pfn = cv[home + _N_FREE_HEAD]
            if pfn < 0:
                at = self._fallback_locked(node)
                pfn = cv[at + _N_FREE_HEAD]
            if depth:
                nx = self.nx
                before = pfn
                for _ in range(min(depth, cv[at + _N_FREE_COUNT] - 1)):
                    before, pfn = pfn, nx[pfn]
                if before != pfn:
                    nx[before] = nx[pfn]  # unlinked from the middle of the list
                else:
                    cv[at + _N_FREE_HEAD] = nx[pfn]
            else:
                cv[at + _N_FREE_HEAD] = self.nx[pfn]
            cv[at + _N_FREE_COUNT] -= 1
            cv[_FREE_COUNT] -= 1
            if at == home:
                cv[home + control.N_NUMA_HIT] += 1
                cv[home + control.N_LOCAL_NODE] += 1
            else:
                cv[at + control.N_NUMA_MISS] += 1
                cv[home + control.N_NUMA_FOREIGN] += 1
                cv[at + control.N_OTHER_NODE] += 1
            self.fl[pfn] = INUSE
            self.mc[pfn] = 0
            if count >= 0:
                cv[count] += 1
            return pfn
        finally:
            lock.release()

    def alloc_many(self, k: int, counts: dict[int, int] | None = None, node: int = 0) -> list[int]:
        """Take ``k`` free frames of NUMA ``node`` in one critical section; their pfns, each INUSE with mapcount 0.

        All or nothing: raises FramesPending, having taken none, when the node
        has fewer than ``k`` free after a reclaim pass (the caller falls back
        to :meth:`alloc` frame by frame, which tells waiting frames from none
        and falls back to the other nodes).  ``counts``: control word index →
        how much it grows, under the same lock.  Takes the allocator lock.
        """
        cv, nx = self.cv, self.nx
        home = _NODE_BASE + _NODE_WORDS * node
        lock = self.alloc_lock
        lock.acquire()
        try:
            if cv[faults.ARMED] and faults.hit(cv, faults.FRAMES_ALLOC) == faults.FAIL:
                raise OutOfFrames("out of frames: injected failure (frames.alloc)")
            if cv[home + _N_FREE_COUNT] < k:
                self._reclaim_locked()
                if cv[home + _N_FREE_COUNT] < k:
                    raise FramesPending
            pfns = []
            pfn = cv[home + _N_FREE_HEAD]
            for _ in range(k):
                if pfn < 0:
                    raise InternalError(f"node {node}: free count {cv[home + _N_FREE_COUNT]} but its list ends early")
                pfns.append(pfn)
                pfn = nx[pfn]
            cv[home + _N_FREE_HEAD] = pfn
            cv[home + _N_FREE_COUNT] -= k
            cv[_FREE_COUNT] -= k
            cv[home + control.N_NUMA_HIT] += k
            cv[home + control.N_LOCAL_NODE] += k
            idx = np.array(pfns, np.intp)
            self.flags[idx] = INUSE
            self.mapcount[idx] = 0
            for word, grow in (counts or {}).items():
                cv[word] += grow
            return pfns
        finally:
            lock.release()

    def _fallback_locked(self, node: int) -> int:
        """``node`` has no free frame: reclaim, then try it and the next nodes in turn; the node area
        word base of one with a free frame.  Raises FramesPending or OutOfFrames as alloc does."""
        self._reclaim_locked()
        for k in range(self.nodes):
            base = _NODE_BASE + _NODE_WORDS * ((node + k) % self.nodes)
            if self.cv[base + _N_FREE_HEAD] >= 0:
                return base
        if self.cv[_WAIT_COUNT]:
            raise FramesPending
        raise OutOfFrames(f"out of frames: all {self.nframes - 1} frames of the pool are mapped")

    def free(self, pfn: int) -> None:
        """Drop a frame whose mapcount reached 0: it waits for reclamation.

        The caller holds the frame's lock; takes the allocator lock.
        """
        if pfn == ZERO_PFN:
            raise InternalError("the zero page is never freed")
        lock = self.alloc_lock
        lock.acquire()
        try:
            self.free_locked(pfn)
        finally:
            lock.release()

    def free_locked(self, pfn: int) -> None:
        """free() for a caller that holds the allocator lock."""
        cv = self.cv
        nx = self.nx
        # The order of the three stores matters twice.  The tag before the flag:
        # a process killed between them leaves the frame INUSE and unmapped,
        # which recovery drops with a current tag -- never WAITING with its old
        # mapcount read as a tag so old that the next pass reuses the frame
        # while a shadow still maps it.  The flag before the new generation: a
        # reader without locks (a shadow's vCPU) that sees the new generation
        # sees the frame waiting, not reused.
        self.mc[pfn] = epoch_tag(cv[_EPOCH])
        self.fl[pfn] = WAITING
        self.gn[pfn] = (self.gn[pfn] + 1) & 0xFFFFFFFF
        nx[pfn] = -1
        tail = cv[_WAIT_TAIL]
        if tail < 0:
            cv[_WAIT_HEAD] = pfn
        else:
            nx[tail] = pfn
        cv[_WAIT_TAIL] = pfn
        cv[_WAIT_COUNT] += 1

    def reclaim(self) -> int:
        """Run a reclaim pass; return how many frames became free.  Takes the allocator lock."""
        with self.alloc_lock:
            return self._reclaim_locked()

    def oldest_acknowledgment(self) -> int:
        """The epoch every participant has processed up to (NO_EPOCH_ACK with none)."""
        cv = self.cv
        return int(min(cv[control.PART_BASE + 2 * p + 1] for p in range(control.MAX_PARTICIPANTS)))

    def _reclaim_locked(self) -> int:
        cv, mc, nx, fl = self.cv, self.mc, self.nx, self.fl
        safe = self.oldest_acknowledgment()
        nodes, n = self.nodes, self.nframes
        moved = [0] * nodes
        heads = [cv[_NODE_BASE + _NODE_WORDS * k + _N_FREE_HEAD] for k in range(nodes)]
        head = cv[_WAIT_HEAD]
        while head >= 0 and (safe == NO_EPOCH_ACK or (safe - mc[head]) & 0xFFFFFFFF < 0x80000000):
            pfn = head
            head = nx[pfn]
            node = ((pfn + 1) * nodes - 1) // n  # node_of
            fl[pfn] = 0
            mc[pfn] = 0
            nx[pfn] = heads[node]
            heads[node] = pfn
            moved[node] += 1
        for k in range(nodes):
            base = _NODE_BASE + _NODE_WORDS * k
            cv[base + _N_FREE_HEAD] = heads[k]
            cv[base + _N_FREE_COUNT] += moved[k]
        cv[_WAIT_HEAD] = head
        if head < 0:
            cv[_WAIT_TAIL] = -1
        total = sum(moved)
        cv[_FREE_COUNT] += total
        cv[_WAIT_COUNT] -= total
        return total

    def repair_lists_locked(self) -> None:
        """Rebuild the free and waiting lists from the frame flags (allocator lock held).

        Run when the allocator lock is taken from a holder that died: an
        INUSE, WAITING or free transition is written to the flags under this
        lock first, so the flags say which list each frame belongs on, even
        where a death left a list half-linked.  Waiting frames keep their
        reclamation order (the epoch each was dropped in).  A frame taken off
        the free list whose caller died before mapping it stays INUSE: a leak
        until recovery rebuilds the metadata from the page tables.
        """
        flags = self.flags
        free = np.flatnonzero(flags == 0)
        free = free[free != ZERO_PFN]
        waiting = oldest_first(np.flatnonzero(flags == WAITING), self.mapcount, int(self.cv[_EPOCH]))
        # A holder killed between a waiting frame's flag and its new generation
        # left the old one: bump it, so that no stable node takes the frame for
        # the page it was once it is reused.  No PTE maps a waiting frame, and a
        # shadow's vCPU does not count a read of one that is waiting.
        self.gen[waiting] += np.uint32(1)
        self.mapcount[free] = 0
        nxt = self.next
        link_free_lists(nxt, self.ctl, free)
        link_waiting_list(nxt, self.ctl, waiting)

    # -- reclamation participants -------------------------------------------

    def register_participant(self, pid: int) -> int:
        """Register a reader that must acknowledge epochs; return its slot.  Takes the allocator lock."""
        with self.alloc_lock:
            for p in range(control.MAX_PARTICIPANTS):
                base = control.PART_BASE + 2 * p
                if self.cv[base] == 0:
                    self.cv[base] = pid
                    self.cv[base + 1] = self.cv[control.INDEX["epoch"]]
                    return p
        raise OutOfFrames("too many reclamation participants")

    def acknowledge(self, slot: int, epoch: int) -> None:
        """Participant ``slot`` has processed every event before ``epoch``."""
        self.cv[control.PART_BASE + 2 * slot + 1] = epoch

    def unregister_participant(self, slot: int) -> None:
        with self.alloc_lock:
            base = control.PART_BASE + 2 * slot
            self.cv[base] = 0
            self.cv[base + 1] = NO_EPOCH_ACK

    # -- frame-level helpers ---------------------------------------------------

    def frame_lock(self, pfn: int) -> Lock:
        return self.frame_locks[pfn % self._nframe_locks]

    def put(self, pfn: int) -> None:
        """Drop one mapping of ``pfn``; free it when none is left.  Takes its frame lock."""
        if pfn == ZERO_PFN:
            return
        lock = self.frame_locks[pfn % self._nframe_locks]
        lock.acquire()
        try:
            mc = self.mc
            left = mc[pfn] - 1
            mc[pfn] = left
            if left == 0:
                self.free(pfn)
            elif left < 0:
                raise InternalError(f"frame {pfn}: mapcount below zero")
        finally:
            lock.release()

    def defer_put(self, pfn: int) -> None:
        """Queue a put of ``pfn``, done later by :meth:`drain_deferred` (see the module's text).

        Mitigation "vusion"'s write fault: the same steps whether ``pfn`` is a
        KSM page or a private frame; nothing of the frame is read.  The caller
        holds a page-table lock and has remapped the page (:meth:`defer_puts`).
        """
        self.defer_puts([pfn])

    def defer_puts(self, pfns: list[int]) -> None:
        """defer_put for several frames, under one allocator lock while the ring has room.

        Takes the allocator lock; a full ring is drained here first (its frame
        locks after the caller's page-table lock, in order).
        """
        cv = self.cv
        lock = self.alloc_lock
        at = 0
        while at < len(pfns):
            lock.acquire()
            try:
                tail = cv[_DEFERRED_TAIL]
                room = min(len(pfns) - at, _DEFERRED_SLOTS - (tail - cv[_DEFERRED_HEAD]))
                for k in range(room):
                    cv[_DEFERRED_BASE + ((tail + k) & _DEFERRED_MASK)] = pfns[at + k]
                cv[_DEFERRED_TAIL] = tail + room
                at += room
            finally:
                lock.release()
            if at < len(pfns):
                self.drain_deferred()

    def drain_deferred(self) -> int:
        """Do every put queued by :meth:`defer_put`, oldest first; return how many this call did.

        Each is put(): the mapcount goes down and the frame is freed at 0,
        and the copy the fault made is counted, ``cow_ksm`` for a KSM page,
        ``cow_faults`` for a private one.  Takes each frame's lock, then the
        allocator lock (the caller holds neither; it may hold a page-table
        lock).  Returns once the ring was seen empty under the allocator
        lock: every put queued before the call, whoever did it, is counted.
        """
        cv, mc, fl = self.cv, self.mc, self.fl
        alloc_lock = self.alloc_lock
        done = 0
        while True:
            head = cv[_DEFERRED_HEAD]
            if head == cv[_DEFERRED_TAIL]:
                with alloc_lock:
                    if cv[_DEFERRED_HEAD] == cv[_DEFERRED_TAIL]:
                        return done
                continue
            pfn = cv[_DEFERRED_BASE + (head & _DEFERRED_MASK)]  # stays while head does: pushes stop at a full ring
            lock = self.frame_locks[pfn % self._nframe_locks]
            lock.acquire()
            alloc_lock.acquire()
            try:
                if cv[_DEFERRED_HEAD] != head:
                    continue  # another drainer did it
                cv[_DEFERRED_HEAD] = head + 1  # first: a death after it leaks the frame, never puts it twice
                cv[_COW_KSM if fl[pfn] & KSM else _COW_FAULTS] += 1
                # put()'s steps (kept inline there: it is on every copy-on-write's path).
                left = mc[pfn] - 1
                mc[pfn] = left
                if left == 0:
                    self.free_locked(pfn)
                elif left < 0:
                    raise InternalError(f"frame {pfn}: mapcount below zero (a deferred put)")
                done += 1
            finally:
                alloc_lock.release()
                lock.release()

    def deferred(self) -> npt.NDArray[np.intp]:
        """The frames whose puts are queued, oldest first (a frame once per put).

        The caller holds the allocator lock, or every lock (the checker).
        """
        head, tail = self.cv[_DEFERRED_HEAD], self.cv[_DEFERRED_TAIL]
        if not 0 <= tail - head <= _DEFERRED_SLOTS:
            raise InternalError(f"the deferred puts' ring runs from {head} to {tail}: not 0 to {_DEFERRED_SLOTS} long")
        at = np.arange(head, tail, dtype=np.intp) & _DEFERRED_MASK
        pfns: npt.NDArray[np.intp] = self.ctl[_DEFERRED_BASE + at].astype(np.intp)
        return pfns

    def take_last_mapping(self, pfn: int) -> bool:
        """Make KSM page ``pfn`` private again if one PTE maps it; return whether it did.

        Waits first (at most _FRAME_WAIT_SECONDS, else OutOfFrames) until
        every shadow has run the events produced so far, which include the
        invalidations of the page's other mappings.  The caller holds the PTL
        of that one mapping.  Takes the frame lock:
        once the KSM flag is gone, no merge can add a mapping (replace_page
        checks it under the same lock) and the scanner finds its node stale.
        """
        if self.mc[pfn] != 1 or not self.fl[pfn] & KSM:
            return False
        # The page's other mappings are gone, but a shadow may still read it
        # through an entry whose invalidation it has not run: the page's new
        # life (its writer's bytes) must wait for that, as a frame's reuse does.
        epoch = int(self.cv[_EPOCH])
        poll_until(lambda: self.oldest_acknowledgment() >= epoch, _FRAME_WAIT_SECONDS,
                   lambda: OutOfFrames("out of frames: the shadow workers did not acknowledge the invalidations "
                                       f"of KSM page {pfn}'s other mappings in {_FRAME_WAIT_SECONDS:g} s"))
        lock = self.frame_locks[pfn % self._nframe_locks]
        lock.acquire()
        try:
            if self.mc[pfn] != 1 or not self.fl[pfn] & KSM:
                return False
            self.fl[pfn] = INUSE
            # A new life for the frame: no stable node may take it for the KSM page it was.
            self.gn[pfn] = (self.gn[pfn] + 1) & 0xFFFFFFFF
            return True
        finally:
            lock.release()

    def drop_private(self, pfns: list[int]) -> None:
        """Free frames that were each mapped by one PTE, now replaced.  Takes the allocator lock.

        No frame lock is needed: no PTE maps these frames any more, so no one
        else can change their mapcounts.  free_locked for a batch, in numpy
        past a few frames: the scanner drops a frame for every page it merges.
        """
        if len(pfns) < 8:
            lock = self.alloc_lock
            lock.acquire()
            try:
                for pfn in pfns:
                    self._check_private(pfn)
                    self.free_locked(pfn)
            finally:
                lock.release()
            return
        idx = np.array(pfns, np.intp)
        lock = self.alloc_lock
        lock.acquire()
        try:
            bad = np.flatnonzero((self.mapcount[idx] != 1) | (self.flags[idx] & KSM != 0))
            if len(bad):
                self._check_private(pfns[bad[0]])
            cv = self.cv
            self.mapcount[idx] = epoch_tag(cv[_EPOCH])  # tag, flag, generation: free_locked's order
            self.flags[idx] = WAITING
            self.gen[idx] += np.uint32(1)  # wraps, as free_locked's & 0xFFFFFFFF
            self.next[idx[:-1]] = idx[1:]  # linked in order, then onto the waiting list's tail
            self.next[idx[-1]] = -1
            tail = cv[_WAIT_TAIL]
            if tail < 0:
                cv[_WAIT_HEAD] = pfns[0]
            else:
                self.nx[tail] = pfns[0]
            cv[_WAIT_TAIL] = pfns[-1]
            cv[_WAIT_COUNT] += len(pfns)
        finally:
            lock.release()

    def _check_private(self, pfn: int) -> None:
        if self.mc[pfn] != 1 or self.fl[pfn] & KSM:
            raise InternalError(f"frame {pfn}: dropped as private but mapcount {self.mc[pfn]}")

    def copy_frame(self, dst: int, src: int) -> None:
        """Copy frame ``src`` into frame ``dst``: one memmove, no view or array made."""
        self.mm.move(dst << 12, src << 12, PAGE_SIZE)

    def zero_frame(self, pfn: int) -> None:
        """Fill frame ``pfn`` with zeros."""
        self.mm[pfn << 12:(pfn + 1) << 12] = ZERO_PAGE_BYTES


class FrameWait:
    """Waits for frames pending acknowledgment: growing sleeps, OutOfFrames after a deadline.

    The caller holds no lock while it waits.
    """

    def __init__(self) -> None:
        self.deadline = time.monotonic() + _FRAME_WAIT_SECONDS
        self.delay = 0.0005

    def wait(self, what: str = "") -> None:
        """Sleep a little longer than last time; OutOfFrames once the deadline has passed.

        ``what``, appended to the error's message, says what the caller did so far.
        """
        if time.monotonic() > self.deadline:
            raise OutOfFrames(f"out of frames: dropped frames were never acknowledged by the shadow workers{what}")
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 0.02)


def with_frames(op: Any, *args: Any) -> Any:
    """Run ``op(*args)``, retrying while freed frames wait for acknowledgments.

    ``op`` raises FramesPending with no lock held; the wait happens unlocked.
    """
    waiting = FrameWait()
    while True:
        try:
            return op(*args)
        except FramesPending:
            pass
        waiting.wait()
