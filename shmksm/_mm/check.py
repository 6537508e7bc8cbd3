"""The accounting checker and the recovery after a death.

Invariants (DESIGN.md, "Accounting"):

* every frame but the zero page is free, waiting, or mapped by exactly
  ``mapcount`` PTEs (plus its puts still deferred, frames.Frames.defer_put),
  and is on the free list, on the waiting list, or flagged in use accordingly;
* the zero page is all zeros;
* no PTE maps a free or waiting frame, nor a frame outside the pool;
* a writable PTE maps a frame nobody else maps and that is not a KSM page;
* a KSM PTE maps a KSM page (or, with ZERO, the zero page).

:func:`check` reports the first violation.  :func:`recover` rebuilds the
metadata from the page tables — the truth, which deferred puts only
anticipate — after a process died in the middle of an update, and tears
down the address spaces of dead guests.
Both run with every page-table, frame, allocator and notify lock held
(:func:`locks.stop_the_world`), never the mm locks: neither reads what they
guard, and a lock of a dead holder is had at once (robust mutexes), so
neither waits for a live process that waits for the dead.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..errors import CheckError
from . import control, faults
from .frames import INUSE, WAITING, ZERO_PFN, epoch_tag, link_free_lists, link_waiting_list, node_of, oldest_first
from .frames import KSM as FRAME_KSM
from .locks import stop_the_world
from .mmu_notifier import RELEASE
from .pagetable import FRAME_MASK, KSM, PFN_MASK, PRESENT, WRITE, ZERO, describe
from .system import System


def _walk(nxt: npt.NDArray[np.int32], head: int, limit: int, what: str) -> list[int]:
    out = []
    while head >= 0:
        out.append(head)
        if len(out) > limit:
            raise CheckError(f"the {what} list has a cycle")
        head = int(nxt[head])
    return out


def _mapcounts(system: System) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """How many PTEs map each frame, and which frames a KSM PTE maps."""
    n = system.frames.nframes
    counts = np.zeros(n, np.int64)
    ksm = np.zeros(n, np.bool_)
    for gid in system.live_guests():
        ptes = system.table(gid).ptes
        mapped = (ptes & np.uint64(FRAME_MASK)) == np.uint64(PRESENT)
        pfns = (ptes[mapped] & np.uint64(PFN_MASK)).astype(np.int64)
        if len(pfns) and int(pfns.max()) >= n:
            bad = int(np.flatnonzero(mapped)[int(np.argmax(pfns >= n))])
            raise CheckError(f"guest {gid} page {bad:#x}: PTE maps frame {int(ptes[bad]) & PFN_MASK} "
                             f"outside the pool of {n}")
        counts += np.bincount(pfns, minlength=n)
        ksm_pfns = (ptes[mapped & ((ptes & np.uint64(KSM)) != 0)] & np.uint64(PFN_MASK)).astype(np.int64)
        ksm[ksm_pfns] = True
    return counts, ksm


def check_locked(system: System) -> None:
    """check() for a caller that holds every lock (or a stopped machine)."""
    frames = system.frames
    n = frames.nframes
    if frames.pool[ZERO_PFN].any():
        raise CheckError("the zero page (frame 0) is not all zeros")
    counts, _ = _mapcounts(system)
    flags = frames.flags
    for gid in system.live_guests():
        ptes = system.table(gid).ptes
        zero = (ptes & np.uint64(PRESENT | ZERO)) == np.uint64(PRESENT | ZERO)
        bad = np.flatnonzero(zero & ((ptes & np.uint64(PFN_MASK | WRITE)) != 0))
        if len(bad):
            raise CheckError(f"guest {gid} page {int(bad[0]):#x}: zero-page PTE is writable or has a pfn "
                             f"({describe(int(ptes[bad[0]]))})")
        mapped = (ptes & np.uint64(FRAME_MASK)) == np.uint64(PRESENT)
        pfn = (ptes & np.uint64(PFN_MASK)).astype(np.int64)
        writable = mapped & ((ptes & np.uint64(WRITE)) != 0)
        shared = writable & ((counts[pfn] > 1) | ((flags[pfn] & FRAME_KSM) != 0))
        if shared.any():
            page = int(np.flatnonzero(shared)[0])
            raise CheckError(f"guest {gid} page {page:#x}: writable PTE maps frame {pfn[page]} that is shared "
                             f"(mapcount {counts[pfn[page]]}) or a KSM page")
        ksm_pte = mapped & ((ptes & np.uint64(KSM)) != 0) & ((flags[pfn] & FRAME_KSM) == 0)
        if ksm_pte.any():
            page = int(np.flatnonzero(ksm_pte)[0])
            raise CheckError(f"guest {gid} page {page:#x}: KSM PTE maps frame {pfn[page]}, which is not a KSM page")
    mapcount = frames.mapcount
    inuse = (flags & INUSE) != 0
    inuse[ZERO_PFN] = False
    # A frame whose put is deferred keeps that mapping in its mapcount until it is done.
    deferred = frames.deferred()
    if len(deferred):
        outside = deferred[(deferred <= ZERO_PFN) | (deferred >= n)]
        if len(outside):
            raise CheckError(f"a put of frame {int(outside[0])} is deferred: the zero page or outside the pool")
        stray = deferred[~inuse[deferred]]
        if len(stray):
            raise CheckError(f"frame {int(stray[0])} has a deferred put but is not in use")
        counts = counts + np.bincount(deferred, minlength=n)
    unmapped_inuse = np.flatnonzero(inuse & (counts == 0))
    unmapped_inuse = unmapped_inuse[unmapped_inuse != ZERO_PFN]
    if len(unmapped_inuse):
        f = int(unmapped_inuse[0])
        raise CheckError(f"frame {f} is in use but no PTE maps it (leaked)")
    wrong = np.flatnonzero(inuse & (mapcount != counts))
    if len(wrong):
        f = int(wrong[0])
        raise CheckError(f"frame {f}: mapcount {int(mapcount[f])} but {int(counts[f])} PTEs map it")
    notinuse_mapped = np.flatnonzero(~inuse & (counts > 0))
    notinuse_mapped = notinuse_mapped[notinuse_mapped != ZERO_PFN]
    if len(notinuse_mapped):
        f = int(notinuse_mapped[0])
        state = "waiting" if flags[f] & WAITING else "free"
        raise CheckError(f"frame {f} is {state} but {int(counts[f])} PTEs map it")
    free: list[int] = []
    for node in range(frames.nodes):
        base = control.NODE_BASE + control.NODE_WORDS * node
        mine = _walk(frames.next, int(system.ctl[base + control.N_FREE_HEAD]), n, f"node {node} free")
        if len(mine) != system.ctl[base + control.N_FREE_COUNT]:
            raise CheckError(f"node {node}'s free list holds {len(mine)} frames, "
                             f"its count says {int(system.ctl[base + control.N_FREE_COUNT])}")
        stray = np.flatnonzero(node_of(np.array(mine, np.intp), n, frames.nodes) != node)
        if len(stray):
            raise CheckError(f"frame {mine[int(stray[0])]} is on node {node}'s free list but not of that node")
        free += mine
    waiting = _walk(frames.next, system.get("wait_head"), n, "waiting")
    if len(free) != system.get("free_count"):
        raise CheckError(f"the free lists hold {len(free)} frames, free_count says {system.get('free_count')}")
    if len(waiting) != system.get("wait_count"):
        raise CheckError(f"the waiting list holds {len(waiting)} frames, wait_count says {system.get('wait_count')}")
    if free and (flags[free] != 0).any():
        raise CheckError(f"frame {free[int(np.argmax(flags[free] != 0))]} is on the free list but not free")
    if waiting and (flags[waiting] != WAITING).any():
        first = waiting[int(np.argmax(flags[waiting] != WAITING))]
        raise CheckError(f"frame {first} is on the waiting list but not waiting")
    nfree = int((flags[1:] == 0).sum())
    nwait = int((flags[1:] == WAITING).sum())
    if nfree != len(free) or nwait != len(waiting):
        raise CheckError(f"{nfree} free and {nwait} waiting frames, but the lists hold {len(free)} and {len(waiting)}")
    stray = np.flatnonzero(((flags & FRAME_KSM) != 0) & ~inuse)
    if len(stray):
        raise CheckError(f"frame {int(stray[0])} is flagged KSM but not in use")


def check(system: System, timeout: float | None = None) -> None:
    """Verify every accounting invariant; raise CheckError naming the first violation.

    Stops the world for the duration (a live machine pauses); raises
    LockTimeout, holding nothing, if a lock is not had within ``timeout``.
    """
    with stop_the_world(system.locks, timeout):
        check_locked(system)


def recover(system: System, dead_guests: list[int], timeout: float | None = None) -> int:
    """Rebuild frame metadata from the page tables after a death; return frames reclaimed.

    Tears down the address spaces of ``dead_guests`` (exit_mmap) first.
    Stops the world: locks of dead holders are had at once and repaired;
    raises LockTimeout, having changed nothing, if a live holder does not let
    go within ``timeout``.  If a page-table lock was taken from a dead
    holder since the last recovery, every guest a notifier watches is
    invalidated whole: a process that died between changing PTEs and sending
    their notifier records (a merge sends a run's records together) leaves
    secondary MMUs with entries that nobody would invalidate otherwise.  The
    invalidations a dead process started and did not end are ended
    (``Notifier.close_dead_locked``).
    """
    with stop_the_world(system.locks, timeout):
        # The ends a dead producer owed, before the releases: a shadow ignores
        # what comes for a guest after its release.
        system.notifier.close_dead_locked()
        for gid in dead_guests:
            # release runs before the guest's frames are freed: they are
            # dropped after this event, so none is reused before every
            # shadow has run it (mmu_notifier_release in exit_mmap).
            if system.notifier.active(gid):
                system.notifier.emit_locked(RELEASE, gid, 0, 0)
            system.table(gid).ptes[:] = 0
        cv = system.frames.cv
        if cv[faults.ARMED]:
            faults.hit(cv, faults.CHECK_RECOVER)
        ptl_deaths = sum(lock.owner_deaths for lock in system.locks.ptl)
        if ptl_deaths != system.ptl_deaths_seen:
            for gid in system.live_guests():
                if gid not in dead_guests and system.notifier.active(gid):
                    system.notifier.invalidate_range_locked(gid, 0, system.table(gid).pages)
            system.ptl_deaths_seen = ptl_deaths
        return rebuild_locked(system)


def rebuild_locked(system: System) -> int:
    """Recompute mapcounts and both frame lists from the PTEs; return frames newly dropped.

    Deferred puts are subsumed: the copies they stand for are counted, the ring emptied.
    """
    frames = system.frames
    deferred = frames.deferred()
    if len(deferred):
        into_ksm = int(np.count_nonzero(frames.flags[deferred] & FRAME_KSM))
        system.ctl[control.INDEX["cow_ksm"]] += into_ksm
        system.ctl[control.INDEX["cow_faults"]] += len(deferred) - into_ksm
    system.ctl[control.INDEX["deferred_head"]] = system.ctl[control.INDEX["deferred_tail"]]
    counts, ksm = _mapcounts(system)
    flags, mapcount, nxt = frames.flags, frames.mapcount, frames.next
    was_inuse = (flags & INUSE) != 0
    mapped = counts > 0
    mapped[ZERO_PFN] = True
    dropped = np.flatnonzero(~mapped & was_inuse)
    waiting = np.flatnonzero(~mapped & ~was_inuse & ((flags & WAITING) != 0))
    epoch = system.get("epoch")
    # Old waiting frames keep their order (by the epoch they were dropped in);
    # frames this recovery drops follow, tagged with the current epoch.
    waiting = oldest_first(waiting, mapcount, epoch)
    # Tag, flag, then the new generation, in free_locked's order: shadows read
    # on while the world is stopped, and a vCPU that sees the new generation of
    # a frame must see it waiting, not taken for reused.
    mapcount[dropped] = epoch_tag(epoch)
    flags[dropped] = WAITING
    frames.gen[dropped] += np.uint32(1)
    wait_all = np.concatenate([waiting, dropped])
    free = np.flatnonzero(~mapped & ~was_inuse & ((flags & WAITING) == 0))
    keep_ksm = ksm | ((flags & FRAME_KSM) != 0)
    flags[mapped] = np.where(keep_ksm[mapped], INUSE | FRAME_KSM, INUSE).astype(np.uint8)
    flags[ZERO_PFN] = INUSE
    mapcount[mapped] = counts[mapped]
    mapcount[ZERO_PFN] = 0
    flags[wait_all] = WAITING
    flags[free] = 0
    mapcount[free] = 0
    link_free_lists(nxt, system.ctl, free)
    link_waiting_list(nxt, system.ctl, wait_all)
    return len(dropped)
