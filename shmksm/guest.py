"""The guest API: a process's view of its own address space.

A :class:`GuestView` is what ``machine.spawn(fn, guest)`` hands to ``fn``.
Every access goes through the PTE under its page-table lock, as a CPU goes
through its MMU: the view never holds a writable mapping of a frame.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from ._ksm.ksm import unmerge_range
from ._mm import control
from ._mm.frames import PAGE_SIZE, FramesPending, with_frames
from ._mm.pagetable import (
    DIRTY,
    H_MERGE_ANY,
    HIGH_READ_MASK,
    HIGH_READABLE,
    HIGH_WRITABLE,
    PFN_MASK,
    PRESENT,
    WRITE,
    YOUNG,
    PageTable,
)
from ._mm.system import System
from .errors import AddressError, DataTypeError, UsageError

MADV_MERGEABLE: Final = 12
MADV_UNMERGEABLE: Final = 13
_ADVICE_NAMES: Final = {MADV_MERGEABLE: "MADV_MERGEABLE", MADV_UNMERGEABLE: "MADV_UNMERGEABLE"}
_DIRTY_YOUNG: Final = DIRTY | YOUNG
_UINT8: Final = np.dtype(np.uint8)
_NDARRAY: Final = np.ndarray  # one global load instead of a module attribute on the hot path


def as_bytes_view(data: Any) -> memoryview:
    """A flat, contiguous byte view of ``data``; DataTypeError if it is not bytes-like."""
    if isinstance(data, str):
        raise DataTypeError("data must be bytes-like or a numpy array, not str")
    try:
        view = memoryview(data)
    except TypeError:
        raise DataTypeError(f"data must be bytes-like or a numpy array, not {type(data).__name__}") from None
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    if not view.nbytes:
        return memoryview(b"")  # cast() refuses a shape with a zero in it
    if not view.c_contiguous:
        view = np.ascontiguousarray(data).data
    return view.cast("B")


def _check_addr(addr: Any, name: str = "address") -> int:
    if isinstance(addr, bool) or not isinstance(addr, (int, np.integer)):
        raise AddressError(f"{name} must be an integer, not {type(addr).__name__}")
    return int(addr)


class GuestView:
    """Read, write, madvise and munmap one guest's address space."""

    def __init__(self, system: System, gid: int) -> None:
        self.system = system
        self.gid = gid
        self.table: PageTable = system.table(gid)
        self.pages = self.table.pages
        self.size = self.pages * PAGE_SIZE
        # Bound once for the hot paths: the PTEs (whole, and as the halves that
        # the hot paths test, see pagetable.HIGH_WRITABLE), the pool's mmap (its
        # slices copy in one step, from bytes and arrays alike) and the lock of
        # every run of 512 PTEs.
        self._pv = self.table.pv
        self._pte_low = self.table.pte_low
        self._pte_high = self.table.pte_high
        self._mm = system.frames.mm
        self._run_locks = self.table.run_locks

    def __repr__(self) -> str:
        return f"<GuestView guest={self.gid} pages={self.pages}>"

    # -- read ---------------------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        """The ``n`` bytes at ``addr``.  Takes each page's PTL while it copies."""
        if type(addr) is not int or type(n) is not int:
            addr, n = _check_addr(addr), _check_addr(n, "length")
        if addr < 0 or n < 0 or addr + n > self.size:
            raise AddressError(f"read of {n} bytes at {addr:#x} is outside guest {self.gid} ({self.size:#x} bytes)")
        page = addr >> 12
        off = addr & 4095
        if 0 < n <= PAGE_SIZE - off:
            return self._read_page(page, off, n)
        if not n:
            return b""
        out = bytearray(n)
        done = 0
        while done < n:
            chunk = min(PAGE_SIZE - off, n - done)
            out[done:done + chunk] = self._read_page(page, off, chunk)
            done += chunk
            page += 1
            off = 0
        return bytes(out)

    def _read_page(self, page: int, off: int, n: int) -> bytes:
        """``n`` bytes at ``off`` in ``page``.  Takes its PTL."""
        lock = self._run_locks[page >> 9]
        lock.acquire()
        try:
            if self._pte_high[page] & HIGH_READ_MASK == HIGH_READABLE:
                o = (self._pte_low[page] << 12) | off
            else:
                pte = self._pv[page]
                if not pte & PRESENT:
                    pte = self.table.handle_read_fault(page)
                elif not pte & YOUNG:
                    self._pv[page] = pte | YOUNG
                o = ((pte & PFN_MASK) << 12) | off
            return self._mm[o:o + n]
        finally:
            lock.release()

    # -- write --------------------------------------------------------------------

    def write(self, addr: int, data: Any) -> None:
        """Write ``data`` at ``addr``: faults in, copies on write, marks DIRTY.

        Takes each page's PTL.  All pages are faulted in before any byte is
        written, so an error (out of frames, an unmapped page) writes nothing.
        """
        # The hot path of every guest: a write within one page already mapped
        # writable, dirty and young.  Bad arguments fail one of its steps before
        # anything is written (no len(), or the mmap refusing data that is not
        # n plain bytes) and take the general path, which says what is wrong.
        if type(addr) is int:
            try:
                n = len(data)
            except TypeError:
                n = PAGE_SIZE + 1
            page = addr >> 12
            if 0 <= page < self.pages and (off := addr & 4095) + n <= PAGE_SIZE:
                lock = self._run_locks[page >> 9]
                lock.acquire()
                try:
                    if self._pte_high[page] == HIGH_WRITABLE:
                        o = (self._pte_low[page] << 12) | off
                        self._mm[o:o + n] = data
                        return
                except (TypeError, ValueError, IndexError, BufferError):
                    pass  # str, another dtype, a strided view or array: nothing was written
                finally:
                    lock.release()
        self._write(addr, data)

    def _write(self, addr: int, data: Any) -> None:
        """write(), past its hot path: faults, page crossings, any bytes-like data, errors."""
        # bytes and uint8 arrays skip the memoryview: a slice of the mmap takes
        # their bytes as they are (a non-contiguous array is copied, below).
        tp = type(data)
        if tp is bytes:
            n = len(data)
        elif tp is _NDARRAY and data.dtype is _UINT8:
            n = data.nbytes
        else:
            data = as_bytes_view(data)
            n = len(data)
        # Within one page (then addr < size keeps it inside the guest): faults,
        # copy-on-write above all, with _write_page inlined (through with_frames
        # and _write_page, a COW break costs a third of a microsecond more).
        if type(addr) is int and 0 <= addr < self.size and 0 < n <= PAGE_SIZE - (off := addr & 4095):
            page = addr >> 12
            lock = self._run_locks[page >> 9]
            lock.acquire()
            try:
                if self._pte_high[page] == HIGH_WRITABLE:
                    o = (self._pte_low[page] << 12) | off
                else:
                    o = ((self._make_writable(page, n == PAGE_SIZE) & PFN_MASK) << 12) | off
                try:
                    self._mm[o:o + n] = data
                except ValueError:  # numpy exports no plain buffer of a non-contiguous array
                    self._mm[o:o + n] = data.tobytes()
                return
            except FramesPending:
                pass  # nothing changed: wait for frames with the lock released, below
            finally:
                lock.release()
            with_frames(self._write_page, page, off, data)
            return
        if type(addr) is not int:
            addr = _check_addr(addr)
        if addr < 0 or addr + n > self.size:
            raise AddressError(f"write of {n} bytes at {addr:#x} is outside guest {self.gid} ({self.size:#x} bytes)")
        if n:
            self._write_pages(addr, as_bytes_view(data))

    def _write_pages(self, addr: int, view: memoryview) -> None:
        """A write that crosses pages: fault every page in, then copy page by page."""
        n = len(view)
        off = addr & 4095
        first, last = addr >> 12, (addr + n - 1) >> 12
        for page in range(first, last + 1):
            with_frames(self._prefault, page)
        done = 0
        page = first
        while done < n:
            chunk = min(PAGE_SIZE - off, n - done)
            with_frames(self._write_page, page, off, view[done:done + chunk])
            done += chunk
            page += 1
            off = 0

    def _make_writable(self, page: int, whole: bool) -> int:
        """Make ``page``'s PTE writable, dirty and young, faulting if need be; return it.  PTL held.

        ``whole``: the caller overwrites the whole page (a new frame need not be zeroed).
        Raises FramesPending (nothing changed) when frames wait for reclamation.
        """
        pte = self._pv[page]
        if not pte & WRITE:
            return self.table.handle_write_fault(page, whole)
        pte |= _DIRTY_YOUNG
        self._pv[page] = pte
        return pte

    def _write_page(self, page: int, off: int, data: Any) -> None:
        """Copy ``data`` (bytes-like, within one page) to ``off`` in ``page``.  Takes its PTL."""
        if type(data) is np.ndarray:
            data = as_bytes_view(data)
        n = len(data)
        lock = self._run_locks[page >> 9]
        lock.acquire()
        try:
            o = ((self._make_writable(page, n == PAGE_SIZE) & PFN_MASK) << 12) | off
            self._mm[o:o + n] = data
        finally:
            lock.release()

    def _prefault(self, page: int) -> None:
        """Make ``page`` writable ahead of a multi-page copy.  Takes its PTL.

        A new frame is zeroed even where the copy will cover it: the copy takes
        the lock again later, and until then nobody may see what a recycled
        frame held before.
        """
        lock = self._run_locks[page >> 9]
        lock.acquire()
        try:
            if not self._pv[page] & WRITE:
                self.table.handle_write_fault(page)
        finally:
            lock.release()

    # -- madvise, munmap, prctl ----------------------------------------------------------

    def _page_range(self, addr: Any, length: Any, what: str) -> tuple[int, int]:
        addr, length = _check_addr(addr), _check_addr(length, "length")
        if addr % PAGE_SIZE:
            raise UsageError(f"{what}: address {addr:#x} is not page-aligned (EINVAL)")
        if length < 0:
            raise UsageError(f"{what}: negative length {length} (EINVAL)")
        end = addr + -(-length // PAGE_SIZE) * PAGE_SIZE
        if addr < 0 or end > self.size:
            raise AddressError(f"{what}: range {addr:#x}-{end:#x} is outside guest {self.gid} (ENOMEM)")
        return addr // PAGE_SIZE, end // PAGE_SIZE

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """MADV_MERGEABLE or MADV_UNMERGEABLE on ``[addr, addr+length)``, as madvise(2).

        Takes the guest's mm lock; unmerging breaks every KSM mapping of the
        range at once (the kernel's unmerge_ksm_pages).
        """
        if advice not in _ADVICE_NAMES:
            raise UsageError(f"madvise: unknown advice {advice!r} (EINVAL); use MADV_MERGEABLE or MADV_UNMERGEABLE")
        start, end = self._page_range(addr, length, "madvise")
        if start == end:
            return
        with self.table.mm_lock:
            ranges = self.table.stored_ranges()
            if advice == MADV_MERGEABLE:
                ranges = _normalize([*ranges, (start, end)])
            else:
                unmerge_range(self.table, start, end)
                ranges = _subtract(ranges, start, end)
            self.table.set_mergeable_ranges(ranges)

    def munmap(self, addr: int, length: int) -> None:
        """Unmap ``[addr, addr+length)``: its frames are dropped, any later access faults."""
        start, end = self._page_range(addr, length, "munmap")
        with self.table.mm_lock:
            for page in range(start, end):
                with self.table.ptl(page):  # type: ignore[attr-defined]
                    self.table.zap(page, unmap=True)
            self.table.set_mergeable_ranges(_subtract(self.table.stored_ranges(), start, end))

    @property
    def merge_any(self) -> bool:
        """The whole-guest merge switch, like prctl(PR_GET_MEMORY_MERGE)."""
        return bool(self.table.header[H_MERGE_ANY])

    def set_memory_merge(self, enable: bool) -> None:
        """prctl(PR_SET_MEMORY_MERGE): make every page mergeable, or stop and unmerge all."""
        with self.table.mm_lock:
            if enable:
                self.table.set_merge_any(True)
            else:
                was = self.table.header[H_MERGE_ANY]
                self.table.set_merge_any(False)
                if was:
                    unmerge_range(self.table, 0, self.pages)
                    self.table.set_mergeable_ranges([])
        self.system.guest_slot(self.gid)[control.G_MERGE_ANY] = int(bool(enable))

    def ksm_stat(self) -> dict[str, int]:
        """This guest's /proc/PID/ksm_stat."""
        from ._ksm.sysfs import guest_ksm_stat

        return guest_ksm_stat(self.system, self.gid)


def _normalize(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _subtract(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return out


__all__ = ["MADV_MERGEABLE", "MADV_UNMERGEABLE", "GuestView"]
