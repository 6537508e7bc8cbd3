"""One machine's shared state, as any of its processes sees it.

:class:`SystemSpec` is what crosses process boundaries: segment names and the
lock table (whose semaphores pickle only while a process is being spawned).
:meth:`SystemSpec.attach` gives a :class:`System`: the frame pool, its
metadata, the control segment and the guests' page tables, attached lazily.
Only the host creates (:meth:`System.create`) and unlinks segments.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import UsageError
from . import control, mmu_notifier, pagetable, segments
from .frames import PAGE_SIZE, Frames, meta_size
from .locks import LockTable
from .pagetable import PageTable


def _buf(segment: shared_memory.SharedMemory) -> memoryview:
    """A segment's buffer (open segments always have one)."""
    buf = segment.buf
    assert buf is not None
    return buf


@dataclass(frozen=True)
class SystemSpec:
    """Names and locks of one machine: everything a worker needs to attach."""

    prefix: str
    nframes: int
    locks: LockTable
    nodes: int = 1

    def segment_name(self, what: str) -> str:
        return f"{self.prefix}_{what}"

    def attach(self) -> System:
        return System(self, owner=False)


class System:
    """The shared state of one machine in one process."""

    def __init__(self, spec: SystemSpec, owner: bool) -> None:
        self.spec = spec
        self.owner = owner
        self.locks = spec.locks
        open_ = segments.create if owner else (lambda name, size: segments.attach(name))
        self._segments: list[shared_memory.SharedMemory] = []
        self._guest_segments: dict[int, shared_memory.SharedMemory] = {}
        self.tables: dict[int, PageTable] = {}
        # Page tables of guests whose slot was reused since: others may still hold them.
        self._old_tables: list[tuple[PageTable, shared_memory.SharedMemory]] = []
        try:
            ctl_buf = self._open(open_, "ctl", 8 * control.WORDS)
            pool_buf = self._open(open_, "frames", PAGE_SIZE * spec.nframes)
            meta_buf = self._open(open_, "meta", meta_size(spec.nframes))
            notify_buf = self._open(open_, "notify", 8 * mmu_notifier.segment_words())
        except BaseException:
            self.close()
            raise
        self.ctl: npt.NDArray[np.int64] = np.ndarray(control.WORDS, np.int64, ctl_buf)
        if owner:
            for name, value in control.KNOB_DEFAULTS.items():
                self.ctl[control.INDEX[name]] = value
            self.ctl[control.INDEX["nodes"]] = spec.nodes
            Frames.format(np.ndarray((spec.nframes, PAGE_SIZE), np.uint8, pool_buf), meta_buf, self.ctl)
        self.frames = Frames(pool_buf, meta_buf, self.ctl, self.locks)
        self.notify_area = mmu_notifier.NotifyArea(notify_buf)
        self.notifier = mmu_notifier.Notifier(self.notify_area, self.frames.cv, self.locks.notify,
                                              self.locks.broker_bell)
        self.pid = os.getpid()
        # Page-table locks taken from dead holders, as the last recovery here saw them.
        self.ptl_deaths_seen = 0

    def _open(self, open_: Any, what: str, size: int) -> memoryview:
        seg: shared_memory.SharedMemory = open_(self.spec.segment_name(what), size)
        self._segments.append(seg)
        return _buf(seg)

    @classmethod
    def create(cls, nframes: int, locks: LockTable, nodes: int = 1) -> System:
        prefix = f"{segments.PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        return cls(SystemSpec(prefix, nframes, locks, nodes), owner=True)

    # -- knobs and counters ------------------------------------------------------------

    def get(self, field: str) -> int:
        return int(self.ctl[control.INDEX[field]])

    def set(self, field: str, value: int) -> None:
        self.ctl[control.INDEX[field]] = value

    # -- guests ----------------------------------------------------------------------------

    def guest_slot(self, gid: int) -> npt.NDArray[np.int64]:
        base = control.GUEST_BASE + control.GUEST_WORDS * gid
        return self.ctl[base:base + control.GUEST_WORDS]

    def guest_live(self, gid: int) -> bool:
        """Whether guest ``gid`` has an address space now (created, not yet torn down)."""
        return bool(self.ctl[control.GUEST_BASE + control.GUEST_WORDS * gid + control.G_STATE] == control.GUEST_LIVE)

    def live_guests(self) -> list[int]:
        return [g for g in range(control.MAX_GUESTS) if self.guest_live(g)]

    def create_guest(self, pages: int, node: int = 0, domain: int = 0) -> PageTable:
        """Make a new address space of ``pages`` untouched pages on NUMA ``node``, in security
        ``domain`` (host only).

        Takes a never used slot, else the one of a guest torn down: its next
        generation, under a new segment name.
        """
        states = [self.guest_slot(g)[control.G_STATE] for g in range(control.MAX_GUESTS)]
        for wanted in (control.GUEST_FREE, control.GUEST_GONE):
            if wanted in states:
                gid = states.index(wanted)
                break
        else:
            raise UsageError(f"at most {control.MAX_GUESTS} live guests per machine")
        slot = self.guest_slot(gid)
        generation = int(slot[control.G_GENERATION]) + 1
        seg = segments.create(self.spec.segment_name(self._guest_segment(gid, generation)),
                              pagetable.segment_size(pages))
        self._guest_segments[gid] = seg
        header = np.ndarray(pagetable.HEADER_WORDS, np.int64, seg.buf)
        header[pagetable.H_PAGES] = pages
        header[pagetable.H_NODE] = node
        header[pagetable.H_DOMAIN] = domain
        del header
        slot[control.G_PAGES] = pages
        slot[control.G_MERGE_ANY] = 0
        slot[control.G_GENERATION] = generation
        slot[control.G_STATE] = control.GUEST_LIVE
        return self.table(gid)

    @staticmethod
    def _guest_segment(gid: int, generation: int) -> str:
        return f"g{gid}" if generation <= 1 else f"g{gid}.{generation}"

    def current(self, table: PageTable) -> bool:
        """Is ``table`` the page table of a live guest (not of an earlier guest of its slot)?"""
        slot = self.guest_slot(table.gid)
        return bool(slot[control.G_STATE] == control.GUEST_LIVE and slot[control.G_GENERATION] == table.generation)

    def table(self, gid: int) -> PageTable:
        """The page table of guest ``gid``, attached on first use (again when the slot has a new guest)."""
        table = self.tables.get(gid)
        generation = int(self.guest_slot(gid)[control.G_GENERATION])
        if table is not None and table.generation != generation and not self.owner:
            # The slot's guest was torn down and a new one made: keep the old
            # mapping for whoever holds the old table, attach the new one.
            self._old_tables.append((self.tables.pop(gid), self._guest_segments.pop(gid)))
            table = None
        if table is None:
            seg = self._guest_segments.get(gid)
            if seg is None:
                seg = segments.attach(self.spec.segment_name(self._guest_segment(gid, generation)))
                self._guest_segments[gid] = seg
            table = self.tables[gid] = PageTable(gid, _buf(seg), self.frames)
            table.generation = generation
            table.notifier = self.notifier
        return table

    def forget_guest(self, gid: int, table: PageTable | None = None) -> None:
        """Detach from (and, on the host, unlink) a guest's page table.

        With ``table``, only if that is still the slot's table here (not a
        newer guest's, attached since).
        """
        if table is not None and self.tables.get(gid) is not table:
            return
        table = self.tables.pop(gid, None)
        if table is not None:
            table.release_views()
        seg = self._guest_segments.pop(gid, None)
        if seg is not None:
            if self.owner:
                self.guest_slot(gid)[control.G_STATE] = control.GUEST_GONE
                segments.unlink(seg)
            else:
                seg.close()

    def close(self) -> None:
        """Drop every view and close (on the host: unlink) every segment and semaphore name."""
        if self.owner:
            self.locks.unlink()
        for gid in list(self._guest_segments):
            self.forget_guest(gid)
        while self._old_tables:
            table, seg = self._old_tables.pop()
            table.release_views()
            seg.close()
        if hasattr(self, "notify_area"):
            self.notify_area.release_views()
            del self.notify_area, self.notifier
        if hasattr(self, "frames"):
            self.frames.release_views()
            del self.frames
        if hasattr(self, "ctl"):
            del self.ctl
        while self._segments:
            seg = self._segments.pop()
            if self.owner:
                segments.unlink(seg)
            else:
                seg.close()
