"""The guest API: a process's view of its own address space.

A :class:`GuestView` is what ``machine.spawn(fn, guest)`` hands to ``fn``.
Every access goes through the PTE under its page-table lock, as a CPU goes
through its MMU: the view never holds a writable mapping of a frame.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ._ksm.ksm import unmerge_range
from ._mm import control
from ._mm.frames import FRAME_DTYPE, PAGE_SIZE, FramesPending, FrameWait, with_frames
from ._mm.pagetable import (
    DIRTY,
    H_MERGE_ANY,
    HIGH_READ_MASK,
    HIGH_READABLE,
    HIGH_UNMAPPED,
    HIGH_WRITABLE,
    PFN_MASK,
    PRESENT,
    WRITABLE_PTE,
    WRITE,
    YOUNG,
    PageTable,
)
from ._mm.system import System
from .errors import AddressError, DataTypeError, OutOfFrames, SegmentationFault, UsageError

# The bulk copies in C (shmksm._mm._robust), chosen once for the process: one
# memcpy per page or run of adjacent frames, straight into a new bytes object
# for read(), the GIL released.  Where the extension is not built, numpy does
# the same copies, with the same results, under the same locks.
try:
    from ._mm import _robust
except ImportError:  # pragma: no cover - a machine that built no extension
    _robust = None  # type: ignore[assignment]
_gather: Callable[..., Any] | None = getattr(_robust, "gather", None)
_scatter: Callable[..., Any] | None = getattr(_robust, "scatter", None)
_scatter_pages: Callable[..., Any] | None = getattr(_robust, "scatter_pages", None)

MADV_MERGEABLE: Final = 12
MADV_UNMERGEABLE: Final = 13
_ADVICE_NAMES: Final = {MADV_MERGEABLE: "MADV_MERGEABLE", MADV_UNMERGEABLE: "MADV_UNMERGEABLE"}
_DIRTY_YOUNG: Final = DIRTY | YOUNG
_UINT8: Final = np.dtype(np.uint8)
_NDARRAY: Final = np.ndarray  # one global load instead of a module attribute on the hot path
_ASCENDING_MAX: Final = 1 << 22  # frames (16 GiB of pool): beyond, _consecutive builds what it compares
_SCRATCH_PAGES: Final = 4096  # the most a view keeps for gathers, in pages
_FEW_PAGES: Final = 16  # write_pages of at most this many pages goes page by page
# The high halves of a run of writable, dirty, young PTEs as bytes: one comparison tests a run.
_WRITABLE_HIGHS: Final = np.full(512, HIGH_WRITABLE, np.uint32).tobytes()


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


def _byte_array(data: Any, what: str = "data", copy: bool = True) -> npt.NDArray[np.uint8]:
    """``data``'s bytes as a flat uint8 array: no copy, unless ``data`` is not C-contiguous.

    Then, without ``copy``, UsageError.
    """
    if type(data) is np.ndarray and data.flags.c_contiguous and not data.dtype.hasobject:
        return data if data.dtype is _UINT8 and data.ndim == 1 else data.reshape(-1).view(np.uint8)
    buffer: Any = data  # Any: numpy's stubs do not count an ndarray as a buffer
    if not copy and isinstance(data, np.ndarray | memoryview) and not memoryview(buffer).c_contiguous:
        raise UsageError(f"{what} are not C-contiguous: pass np.ascontiguousarray(...)")
    try:
        return np.frombuffer(as_bytes_view(data), np.uint8)
    except DataTypeError as error:
        raise DataTypeError(f"{what}: {error}") from None


def _writable_byte_array(buffer: Any) -> npt.NDArray[np.uint8]:
    """``buffer``'s bytes as a flat, writable uint8 array over the same memory; UsageError if it cannot be."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise UsageError(f"readinto: buffer must be a writable buffer (bytearray, ndarray), "
                         f"not {type(buffer).__name__}") from None
    if view.readonly:
        raise UsageError(f"readinto: the {type(buffer).__name__} buffer is read-only")
    if not view.c_contiguous:
        raise UsageError("readinto: the buffer is not C-contiguous: pass a contiguous one "
                         "(np.ascontiguousarray, then copy back)")
    if isinstance(buffer, np.ndarray):
        if buffer.dtype.hasobject:
            raise UsageError(f"readinto: dtype {buffer.dtype} holds Python objects, not bytes")
        return buffer.reshape(-1).view(np.uint8)
    return np.frombuffer(view.cast("B") if view.nbytes else bytearray(), np.uint8)


def _shape(shape: Any) -> tuple[int, ...]:
    """A numpy shape from an int or a sequence of ints, all >= 0; UsageError otherwise."""
    dims = (shape,) if isinstance(shape, (int, np.integer)) else shape
    try:
        out = tuple(dims)
    except TypeError:
        out = None
    if out is None or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
                              for d in out):
        raise UsageError(f"read_array: shape must be an int or a tuple of ints >= 0, not {shape!r}")
    return tuple(int(d) for d in out)


def _page_numbers(pages: Any, npages: int) -> npt.NDArray[np.intp]:
    """Page numbers as a 1-D intp array, each in ``[0, npages)``; UsageError / AddressError otherwise."""
    if type(pages) is np.ndarray:
        where = pages
    else:
        try:
            where = np.asarray(pages)
        except (TypeError, ValueError):
            where = np.asarray(None)
    if where.ndim != 1 or not (where.dtype.kind in "iu" or where.size == 0):
        raise UsageError(f"write_pages: pages must be a 1-D array of integer page numbers, "
                         f"not {type(pages).__name__} of dtype {where.dtype} and shape {where.shape}")
    where = where.astype(np.intp, copy=False)
    if len(where) and where.view(np.uintp).max() >= npages:  # a negative page is a large unsigned one
        bad = int(where[(where < 0) | (where >= npages)][0])
        raise AddressError(f"write_pages: page {bad} is outside the guest's {npages} pages")
    return where


@functools.cache
def _ascending_ptes(nframes: int) -> bytes:
    """The writable, dirty, young PTE of every frame of a pool of ``nframes``, in pfn order.

    Pages map consecutive frames, all writable, when their PTEs equal a slice
    of this: one comparison tests both.  8 bytes a frame, made once per
    process; empty for a pool of more than ``_ASCENDING_MAX`` frames.
    """
    if nframes > _ASCENDING_MAX:
        return b""
    return (np.arange(nframes, dtype=np.uint64) | np.uint64(WRITABLE_PTE)).tobytes()


def _all_equal(values: npt.NDArray[Any], value: int) -> bool:
    """Is every element of ``values`` equal to ``value``?"""
    return bool((values == value).all())


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
        # For the bulk paths: the PTEs' halves as arrays, the pool by frame and flat.
        self._lo = self.table.low_halves
        self._hi = self.table.high_halves
        self._rows = system.frames.rows
        self._flat = system.frames.pool.reshape(-1)
        self._scratch_buf: npt.NDArray[np.uint8] = np.empty(0, np.uint8)
        self._ascending = _ascending_ptes(system.frames.nframes)

    def __repr__(self) -> str:
        return f"<GuestView guest={self.gid} pages={self.pages}>"

    # -- read ---------------------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        """The ``n`` bytes at ``addr``.

        Within one page, takes its PTL.  Across pages, takes the PTL of each
        run of 512 PTEs once and gathers the run's pages in one call (each
        frame copied once, straight into the bytes returned, where the C
        extension is built); pages never touched read as zeros and stay
        untouched.
        """
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
        return self._read_bytes(addr, n)

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

        ``data``: bytes-like, or a numpy array of any dtype and shape, whose
        bytes are written as they lie in memory (no copy if C-contiguous).
        Within one page, takes its PTL.  Across pages, takes the PTL of each
        run of 512 PTEs once, in address order, resolving the run's faults
        together and copying its bytes with one numpy scatter.

        A bad address or data, or an unmapped page in the range: nothing is
        written.  Out of frames (none left even after waiting for the shadow
        workers' acknowledgments): like a short write(2), the pages before the
        one that found no frame are written, no byte from there on, and the
        OutOfFrames error carries how many bytes landed in ``written``.
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
            except OutOfFrames as error:
                error.written = 0
                raise
            finally:
                lock.release()
            try:
                with_frames(self._write_page, page, off, data)
            except OutOfFrames as error:
                error.written = 0
                raise
            return
        if type(addr) is not int:
            addr = _check_addr(addr)
        if addr < 0 or addr + n > self.size:
            raise AddressError(f"write of {n} bytes at {addr:#x} is outside guest {self.gid} ({self.size:#x} bytes)")
        if n:
            flat = type(data) is _NDARRAY and data.dtype is _UINT8 and data.ndim == 1 and data.flags.c_contiguous
            self._write_range(addr, data if flat else _byte_array(data))

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

    # -- bulk: many pages per page-table lock -----------------------------------------

    def _write_range(self, addr: int, src: npt.NDArray[np.uint8]) -> None:
        """Write ``src`` at ``addr``, across pages: run of 512 PTEs by run, in address order.

        Per run, under its PTL taken once: one look at its PTEs; if any needs
        a fault, all are resolved together (PageTable.handle_write_faults);
        then the bytes go in, the whole pages with one numpy scatter into the
        frame pool, a partial first and last page on the side.  An unmapped
        page anywhere in the range is found before anything is written.
        Out of frames part way: see :meth:`write`.  Where the C extension is
        built, it writes every run that needs no fault, up to the first that
        does (see _robust.scatter); the rest goes on here.
        """
        n = len(src)
        end = addr + n
        first, last = addr >> 12, (end - 1) >> 12
        high = self._pte_high
        page = first
        if _scatter is not None:
            done = _scatter(self._pv, self._mm, self._run_locks, addr, src)
            if done == end:
                return
            page = max(done, addr) >> 12  # the runs below it landed
        elif first >> 9 == last >> 9:
            # Within one run, every page writable and their frames consecutive (their
            # PTEs a slice of _ascending_ptes): one memcpy.
            lock = self._run_locks[first >> 9]
            lock.acquire()
            try:
                p0 = self._pte_low[first]
                if self._pv[first:last + 1].tobytes() == self._ascending[8 * p0:8 * (p0 + last + 1 - first)]:
                    o = p0 << 12 | (addr & 4095)
                    self._mm[o:o + n] = src  # type: ignore[call-overload]  # the stubs take no ndarray
                    return
            finally:
                lock.release()
        if first >> 9 != last >> 9 and page == first:
            self._check_mapped(slice(first, last + 1), "write to")
        waiting: FrameWait | None = None
        while page <= last:
            stop = min(last + 1, ((page >> 9) + 1) << 9)
            error: Exception | None = None
            lock = self._run_locks[page >> 9]
            lock.acquire()
            try:
                done = stop
                if high[page:stop].tobytes() != _WRITABLE_HIGHS[:4 * (stop - page)]:
                    if page == first:
                        self._check_mapped(slice(page, stop), "write to")
                    pages = np.arange(page, stop)
                    whole = (pages << 12 >= addr) & ((pages + 1) << 12 <= end)
                    k, error = self.table.handle_write_faults(pages, whole)
                    done = page + k
                self._copy_in(src, addr, page, done)
            finally:
                lock.release()
            if error is not None:
                page = done
                written = max(0, (page << 12) - addr)
                waiting = self._short_write(error, written, f"; wrote the first {written} of {n} bytes at {addr:#x}",
                                            waiting)
                continue
            page = stop

    @staticmethod
    def _short_write(error: Exception, written: int, said: str, waiting: FrameWait | None) -> FrameWait:
        """After a run stopped at a page it could not fault in: wait for frames (return the
        waiter to retry with) or raise, with ``written`` and ``said`` telling what landed.  No lock held."""
        if isinstance(error, FramesPending):
            waiting = waiting or FrameWait()
            try:
                waiting.wait()
            except OutOfFrames as out:
                raise OutOfFrames(f"{out}{said}", written) from None
            return waiting
        if isinstance(error, OutOfFrames):
            raise OutOfFrames(f"{error}{said}", written) from None
        raise error

    def _check_mapped(self, pages: slice | npt.NDArray[np.intp], what: str) -> None:
        """SegmentationFault if one of ``pages`` is unmapped (only this guest unmaps its pages).

        One reduction: no PTE without UNMAPPED has a high half as large.
        """
        highs = self._hi[pages]
        if len(highs) and highs.max() >= HIGH_UNMAPPED:
            k = int(np.argmax(highs >= HIGH_UNMAPPED))
            raise self._unmapped(pages.start + k if isinstance(pages, slice) else int(pages[k]), what)

    def _unmapped(self, page: int, what: str) -> SegmentationFault:
        return SegmentationFault(f"guest {self.gid}: {what} unmapped page {page:#x}")

    def _copy_in(self, src: npt.NDArray[np.uint8], addr: int, a: int, b: int) -> None:
        """Copy the bytes of ``src`` (written at ``addr``) that fall in pages ``[a, b)``.  PTL held, pages writable."""
        if a >= b:
            return
        low = self._pte_low
        mm: Any = self._mm  # Any: the stubs do not count an ndarray as a buffer
        s, e, end = a << 12, b << 12, addr + len(src)
        s = max(s, addr)
        e = min(e, end)
        if s & 4095:  # a partial first page
            m = min(e, (a + 1) << 12) - s
            o = low[a] << 12 | (s & 4095)
            mm[o:o + m] = src[s - addr:s - addr + m]
            s += m
            a += 1
        if e & 4095 and e > s:  # a partial last page
            t = e & ~4095
            o = low[b - 1] << 12
            mm[o:o + e - t] = src[t - addr:e - addr]
            e = t
            b -= 1
        if b > a:
            o = self._consecutive(a, b)
            if o >= 0:
                mm[o:o + ((b - a) << 12)] = src[s - addr:e - addr]
            else:  # an intp index: numpy's scatter of whole items then runs at memcpy speed
                self._rows[self._lo[a:b].astype(np.intp)] = src[s - addr:e - addr].view(FRAME_DTYPE)

    def _consecutive(self, a: int, b: int) -> int:
        """The pool offset of page ``a``'s frame if pages ``[a, b)`` map consecutive frames, else -1.

        The frames of pages faulted in in address order usually are: then one
        memcpy moves them all.
        """
        pte = self._pv[a]
        p0 = pte & PFN_MASK
        if b - a == 1:
            return p0 << 12
        if pte == p0 | WRITABLE_PTE and self._ascending:
            return p0 << 12 if self._pv[a:b].tobytes() == self._ascending[8 * p0:8 * (p0 + b - a)] else -1
        low = self._pte_low
        if low[b - 1] - p0 != b - a - 1:
            return -1
        return p0 << 12 if low[a:b].tobytes() == np.arange(p0, b - a + p0, dtype=np.uint32).tobytes() else -1

    def _read_range(self, addr: int, dst: npt.NDArray[np.uint8]) -> None:
        """Fill ``dst`` with the bytes at ``addr``: run by run, each under its PTL, gathered in C (or numpy)."""
        n = len(dst)
        if not n:
            return
        if _gather is not None:
            got = _gather(self._pv, self._mm, self._run_locks, self.table.handle_read_faults, addr, n, dst)
            if got is not None:
                raise self._unmapped(got, "read of")
            return
        first, last = addr >> 12, (addr + n - 1) >> 12
        if first >> 9 != last >> 9:
            self._check_mapped(slice(first, last + 1), "read of")
        page = first
        while page <= last:
            stop = min(last + 1, ((page >> 9) + 1) << 9)
            lock = self._run_locks[page >> 9]
            lock.acquire()
            try:
                self._readable(page, stop)
                self._copy_out(dst, addr, page, stop)
            finally:
                lock.release()
            page = stop

    def _read_bytes(self, addr: int, n: int) -> bytes:
        """read() across pages: run by run, each under its PTL.

        In C, every frame copied once, straight into the bytes returned.
        Without: a run whose frames are consecutive is one slice of the pool,
        straight into bytes; another is gathered by numpy first; the runs'
        bytes are joined.
        """
        if _gather is not None:
            got = _gather(self._pv, self._mm, self._run_locks, self.table.handle_read_faults, addr, n, None)
            if isinstance(got, bytes):
                return got
            raise self._unmapped(got, "read of")
        end = addr + n
        first, last = addr >> 12, (end - 1) >> 12
        if first >> 9 != last >> 9:
            self._check_mapped(slice(first, last + 1), "read of")
        chunks = []
        page = first
        while page <= last:
            stop = min(last + 1, ((page >> 9) + 1) << 9)
            s, e = max(addr, page << 12), min(end, stop << 12)
            lock = self._run_locks[page >> 9]
            lock.acquire()
            try:
                self._readable(page, stop)
                o = self._consecutive(page, stop)
                if o >= 0:
                    o |= s & 4095
                    chunks.append(self._mm[o:o + e - s])
                else:
                    buf = self._scratch(e - s)
                    self._copy_out(buf, s, page, stop)
                    chunks.append(buf.tobytes())
            finally:
                lock.release()
            page = stop
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _scratch(self, n: int) -> npt.NDArray[np.uint8]:
        """A buffer of ``n`` bytes (at most ``_SCRATCH_PAGES`` pages), the same one every time.

        It stays in the cache, and its pages stay faulted in: a fresh array of
        128 KiB or more is a new mapping from malloc, faulted in page by page
        at every use.
        """
        if len(self._scratch_buf) < n:
            self._scratch_buf = np.empty(max(n, 16 * PAGE_SIZE), np.uint8)
        return self._scratch_buf[:n]

    def _readable(self, page: int, stop: int) -> None:
        """Make pages ``[page, stop)`` of one run readable (see PageTable.handle_read_faults).  PTL held."""
        if (self._pte_high[page:stop].tobytes() != _WRITABLE_HIGHS[:4 * (stop - page)]
                and not _all_equal(self._hi[page:stop] & HIGH_READ_MASK, HIGH_READABLE)):
            self.table.handle_read_faults(page, stop)

    def _copy_out(self, dst: npt.NDArray[np.uint8], addr: int, a: int, b: int) -> None:
        """Copy into ``dst`` (read at ``addr``) the bytes of pages ``[a, b)``.  PTL held."""
        low, flat = self._pte_low, self._flat
        s, e, end = a << 12, b << 12, addr + len(dst)
        s = max(s, addr)
        e = min(e, end)
        if s & 4095:
            m = min(e, (a + 1) << 12) - s
            o = low[a] << 12 | (s & 4095)
            dst[s - addr:s - addr + m] = flat[o:o + m]
            s += m
            a += 1
        if e & 4095 and e > s:
            t = e & ~4095
            o = low[b - 1] << 12
            dst[t - addr:e - addr] = flat[o:o + e - t]
            e = t
            b -= 1
        if b > a:
            o = self._consecutive(a, b)
            if o >= 0:
                dst[s - addr:e - addr] = flat[o:o + ((b - a) << 12)]
                return
            # mode="clip": with the default, numpy gathers into a temporary first (the pfns are valid).
            np.take(self._rows, self._lo[a:b].astype(np.intp), out=dst[s - addr:e - addr].view(FRAME_DTYPE),
                    mode="clip")

    # -- the array API --------------------------------------------------------------------

    def readinto(self, addr: int, buffer: Any) -> int:
        """Fill ``buffer`` (writable, C-contiguous: a bytearray, an ndarray of any dtype...) with
        the bytes at ``addr``; return how many.  Takes each run's PTL once (see :meth:`read`)."""
        dst = _writable_byte_array(buffer)
        addr = self._range(addr, len(dst), "read")
        self._read_range(addr, dst)
        return len(dst)

    def read_array(self, addr: int, shape: Any, dtype: Any) -> npt.NDArray[Any]:
        """A new array of ``shape`` and ``dtype`` holding the bytes at ``addr``, as np.frombuffer would read them."""
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise UsageError(f"read_array: {dtype!r} is not a numpy dtype") from None
        if dt.hasobject:
            raise UsageError(f"read_array: dtype {dt} holds Python objects, not bytes")
        out = np.empty(_shape(shape), dt)
        self.readinto(addr, out)
        return out

    def write_pages(self, pages: Any, rows: Any) -> None:
        """Write whole pages: ``rows[i]`` (4096 bytes) on page ``pages[i]``; a page given twice gets its last row.

        ``pages``: 1-D integer page numbers, in any order; ``rows``: a C-contiguous
        array or bytes-like of ``len(pages)`` * 4096 bytes (``uint8[len(pages), 4096]``,
        or any dtype and shape whose first axis is ``len(pages)``).  The pages are
        sorted into runs of 512 PTEs, each run's PTL taken once in address order,
        its faults resolved together and its rows scattered in one call (C's
        memcpy per row where every page is writable already, else numpy's).
        Out of frames part way, OutOfFrames says in ``written`` how many bytes
        landed: the rows of every page below the one that failed, no other.
        """
        start = -1  # the rows of the pages below it have landed (-1: C took no look)
        if _scatter_pages is not None:
            start = _scatter_pages(self._pv, self._mm, self._run_locks, pages, rows)
            if start == self.pages:
                return
        given = where = _page_numbers(pages, self.pages)
        count = len(where)
        src = _byte_array(rows, "write_pages: rows", copy=False)
        if len(src) != count * PAGE_SIZE or (isinstance(rows, np.ndarray) and rows.ndim > 1
                                              and rows.shape[0] != count):
            shape = rows.shape if isinstance(rows, np.ndarray) else len(src)
            raise UsageError(f"write_pages: rows of shape {shape} for {count} pages; "
                             f"give {count} rows of {PAGE_SIZE} bytes, e.g. uint8[{count}, {PAGE_SIZE}]")
        if not count:
            return
        if start < 0 and _scatter_pages is not None:  # pages or rows of another kind: once more as arrays
            start = _scatter_pages(self._pv, self._mm, self._run_locks, where, src)
            if start == self.pages:
                return
        start = max(start, 0)
        self._check_mapped(where, "write to")
        if count <= _FEW_PAGES:
            self._write_few_pages(where, src, start)
            return
        srcv = src.view(FRAME_DTYPE)
        if count > 1 and not (where[1:] > where[:-1]).all():
            order = np.argsort(where, kind="stable")
            where = where[order]
            last_of_each = np.ones(count, np.bool_)  # stable: the last row of a repeated page
            np.not_equal(where[:-1], where[1:], out=last_of_each[:-1])
            order, where = order[last_of_each], where[last_of_each]
            # The rows in address order, in one gather (into a buffer that stays put, see _scratch).
            srcv = (np.take(srcv, order, mode="clip", out=self._scratch(len(order) << 12).view(FRAME_DTYPE))
                    if len(order) <= _SCRATCH_PAGES else srcv[order])
        if start:
            k = int(np.searchsorted(where, start))
            where, srcv = where[k:], srcv[k:]
        runs = where >> 9
        bounds = [0, *(np.flatnonzero(runs[1:] != runs[:-1]) + 1).tolist(), len(where)]
        hi, lo, rows_pool = self._hi, self._lo, self._rows
        waiting: FrameWait | None = None
        r = 0
        i = 0
        while r < len(bounds) - 1:
            i = max(i, bounds[r])
            j = bounds[r + 1]
            run = where[i:j]
            error: Exception | None = None
            lock = self._run_locks[int(run[0]) >> 9]
            lock.acquire()
            try:
                done = j
                if hi[run].tobytes() != _WRITABLE_HIGHS[:4 * (j - i)]:
                    k, error = self.table.handle_write_faults(run, np.ones(len(run), np.bool_))
                    done = i + k
                if done > i:
                    rows_pool[lo[where[i:done]].astype(np.intp)] = srcv[i:done]
            finally:
                lock.release()
            if error is not None:
                written = PAGE_SIZE * int(np.count_nonzero(given < where[done]))
                waiting = self._short_write(error, written, f"; wrote the {written // PAGE_SIZE} of {count} rows "
                                            f"below page {int(where[done]):#x}", waiting)
                i = done
                continue
            r += 1

    def _write_few_pages(self, where: npt.NDArray[np.intp], src: npt.NDArray[np.uint8], start: int) -> None:
        """write_pages of a few pages, from page ``start`` on: each by write()'s one-page path, in address order.

        Sorting and grouping them in numpy costs more than a lock per page.
        """
        latest = dict(zip(where.tolist(), range(len(where)), strict=True))  # a repeated page: its last row
        for page in sorted(p for p in latest if p >= start):
            i = latest[page]
            try:
                self.write(page << 12, src[i << 12:(i + 1) << 12])
            except OutOfFrames as error:
                written = PAGE_SIZE * int(np.count_nonzero(where < page))
                raise OutOfFrames(f"{error}; wrote the {written // PAGE_SIZE} of {len(where)} rows below page "
                                  f"{page:#x}", written) from None

    def _range(self, addr: Any, n: int, what: str) -> int:
        """``addr`` as an int, checked with ``n`` bytes from it against the guest's size."""
        if type(addr) is not int:
            addr = _check_addr(addr)
        if addr < 0 or addr + n > self.size:
            raise AddressError(f"{what} of {n} bytes at {addr:#x} is outside guest {self.gid} ({self.size:#x} bytes)")
        return int(addr)

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
            # One invalidate_range_start/end for the whole range, around the zaps (unmap_vmas).
            notifier = self.table.notifier
            era = notifier.begin_range(self.gid, start, end) if notifier is not None else -1
            for page in range(start, end):
                with self.table.ptl(page):
                    self.table.zap(page, unmap=True)
            if era >= 0:
                notifier.end_range(self.gid, start, end, era)
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
