"""The memory of live processes, as ksmd would see it: what KSM would save before it is turned on.

A process's memory is read through procfs: ``/proc/PID/maps`` lists the
mappings, ``/proc/PID/pagemap`` (8 bytes a page) says which pages are
resident and which frame each maps, ``/proc/PID/mem`` gives their bytes.
ksmd scans resident anonymous pages only: by default the private anonymous
mappings (heap, stack, ``mmap(MAP_ANONYMOUS|MAP_PRIVATE)``); with
``all_mappings``, every readable mapping.  A page that maps the shared zero
page (read before ever written) is no anonymous page: ksmd skips it, and so
does this count (it is reported apart).  The zero page's frame number is
found by reading a fresh page of this process's own.

The pages are streamed a chunk at a time and kept as 16-byte digests, as
:mod:`shmksm.tool.images` does for images; :func:`estimate_processes` then
counts what KSM would converge to across the processes, in total and per
process, with ``general_profit`` and ``ksm_process_profit`` as the kernel
computes them (``sizeof(struct ksm_rmap_item)`` is 64 bytes on 64-bit Linux,
one rmap item per scanned page).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Final, TypeVar

import numpy as np
import numpy.typing as npt

from .._mm.frames import PAGE_SIZE
from ..errors import ShmksmError, UsageError
from .images import ZERO_DIGEST, count_digests, digests, ideal_from_counts

KERNEL_RMAP_ITEM_BYTES: Final = 64  # sizeof(struct ksm_rmap_item) on 64-bit Linux
_PRESENT: Final = 1 << 63
_PFN_MASK: Final = (1 << 55) - 1
_CHUNK_PAGES: Final = 1024
_UNREADABLE: Final = ("[vvar]", "[vvar_vclock]", "[vsyscall]")  # special mappings that /proc/PID/mem refuses


class ProcessError(ShmksmError):
    """A process whose memory cannot be read (gone, or no permission)."""


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def anonymous_private(self) -> bool:
        """A private mapping of no file: heap, stack, MAP_ANONYMOUS|MAP_PRIVATE (not vdso and the like)."""
        return (self.perms[3] == "p" and self.inode == 0
                and (self.path in ("", "[heap]", "[stack]") or self.path.startswith("[anon:")))

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r" and self.path not in _UNREADABLE


def read_maps(pid: int) -> list[Mapping]:
    """The mappings of process ``pid``; ProcessError if it is gone or hidden from us."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ProcessError(_why(pid, exc)) from None
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        out.append(Mapping(start, end, fields[1], int(fields[2], 16), int(fields[4]),
                           fields[5] if len(fields) > 5 else ""))
    return out


def _why(pid: int, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError) or exc.errno == 3:  # ESRCH: it exited while we read
        return f"process {pid}: no such process (it is gone)"
    if isinstance(exc, PermissionError):
        return f"process {pid}: permission denied reading its memory (run as its user or as root)"
    return f"process {pid}: cannot read its memory: {exc.strerror or exc}"


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


_zero_pfn: int | None = None


def zero_pfn() -> int:
    """The frame number of the shared zero page (0 when pagemap hides frame numbers from us)."""
    global _zero_pfn
    if _zero_pfn is None:
        probe = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            probe[0]  # a read fault maps the zero page
            address = np.frombuffer(probe, np.uint8).ctypes.data
            with open("/proc/self/pagemap", "rb") as f:
                entry = int.from_bytes(os.pread(f.fileno(), 8, address // PAGE_SIZE * 8), "little")
            _zero_pfn = entry & _PFN_MASK if entry & _PRESENT else 0
        finally:
            probe.close()
    return _zero_pfn


@dataclass
class ProcessMemory:
    """What was read of one process."""

    pid: int
    comm: str
    mappings: list[dict[str, Any]] = field(default_factory=list)  # the mappings read, for a capture's JSON
    pages: int = 0  # resident pages read (ksmd's rmap items)
    zero_page_mappings: int = 0  # resident pages that map the shared zero page: not anonymous pages


def _resident_runs(pagemap: BinaryIO, mapping: Mapping, zero: int) -> Iterator[tuple[list[tuple[int, int]], int]]:
    """Per stretch of ``mapping``: the runs (first page, pages) of resident pages that are not the zero
    page, and how many map the zero page."""
    first = mapping.start // PAGE_SIZE
    total = (mapping.end - mapping.start) // PAGE_SIZE
    for base in range(0, total, _CHUNK_PAGES * 8):
        n = min(_CHUNK_PAGES * 8, total - base)
        entries = np.frombuffer(os.pread(pagemap.fileno(), 8 * n, (first + base) * 8), np.uint64)
        present = (entries & np.uint64(_PRESENT)) != 0
        is_zero = present & ((entries & np.uint64(_PFN_MASK)) == zero) if zero else np.zeros(len(entries), bool)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], (present & ~is_zero).astype(np.int8), [0]))))
        runs = [(first + base + int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
        yield runs, int(is_zero.sum())


def _read_run(mem: BinaryIO, page: int, n: int) -> Iterator[npt.NDArray[np.uint8]]:
    """The ``n`` pages from ``page`` on, read from /proc/PID/mem a chunk at a time as (k, 4096) arrays."""
    for at in range(page, page + n, _CHUNK_PAGES):
        want = min(_CHUNK_PAGES, page + n - at)
        data = os.pread(mem.fileno(), want * PAGE_SIZE, at * PAGE_SIZE)
        data = data[:len(data) // PAGE_SIZE * PAGE_SIZE]  # short when unmapped meanwhile: what is there counts
        if data:
            yield np.frombuffer(data, np.uint8).reshape(-1, PAGE_SIZE)


def read_process(pid: int, all_mappings: bool = False,
                 sink: Callable[[bytes], object] | None = None) -> tuple[ProcessMemory, list[Any]]:
    """Stream the resident pages of ``pid`` that ksmd would scan; return what was read and their digests.

    Each chunk of pages, a (n, 4096) uint8 array, also goes to ``sink`` (a
    capture writes them to its image).  ProcessError if the process is gone
    or cannot be read.
    """
    maps = read_maps(pid)
    result = ProcessMemory(pid, process_name(pid))
    zero = zero_pfn()
    parts: list[Any] = []
    try:
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for m in maps:
                if not m.readable or not (all_mappings or m.anonymous_private):
                    continue
                offset = result.pages
                for runs, zeros in _resident_runs(pagemap, m, zero):
                    result.zero_page_mappings += zeros
                    for page, n in runs:
                        for chunk in _read_run(mem, page, n):
                            parts.append(digests(chunk))
                            result.pages += len(chunk)
                            if sink is not None:
                                sink(chunk.tobytes())
                if result.pages > offset:
                    result.mappings.append({"start": hex(m.start), "end": hex(m.end), "perms": m.perms,
                                            "path": m.path, "image_page": offset, "pages": result.pages - offset})
    except OSError as exc:
        raise ProcessError(_why(pid, exc)) from None
    return result, parts


@dataclass(frozen=True)
class ProcessEstimate:
    """What KSM would converge to for one process, in the kernel's terms (/proc/PID/ksm_stat)."""

    pid: int
    comm: str
    pages: int  # resident pages ksmd would scan: its rmap items
    zero_page_mappings: int  # resident pages mapping the zero page, not scanned
    ksm_merging_pages: int  # its pages that would map a KSM page
    saved_pages: int  # its share of the saving: each KSM page's cost split among the pages that map it
    ksm_process_profit: int  # bytes, as /proc/PID/ksm_stat computes it
    zero_pages: int  # its pages of zeros (ksm_zero_pages with use_zero_pages)


def estimate_processes(pids: list[int], max_page_sharing: int = 256, all_mappings: bool = False,
                       keep_going: bool = False, skipped: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Read every process of ``pids`` and count what KSM would converge to across them; a JSON-ready dict.

    A process that cannot be read raises ProcessError, or with ``keep_going``
    is reported to ``skipped`` and left out (ProcessError if none is left).
    """
    if max_page_sharing < 2:
        raise UsageError(f"max_page_sharing must be at least 2, not {max_page_sharing}")
    def read_one(pid: int) -> tuple[ProcessMemory, tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]]:
        memory, parts = read_process(pid, all_mappings)
        return memory, count_digests(np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64))

    done, errors = _read_each(pids, read_one, keep_going, skipped)
    return {**_converge([d[0] for d in done], [d[1] for d in done], max_page_sharing),
            "all_mappings": all_mappings, "errors": errors}


T = TypeVar("T")


def _read_each(pids: list[int], read_one: Callable[[int], T], keep_going: bool,
               skipped: Callable[[str], None] | None) -> tuple[list[T], list[str]]:
    """``read_one`` of every pid, and the errors of those skipped; ProcessError as estimate_processes says."""
    done, errors = [], []
    for pid in pids:
        try:
            done.append(read_one(pid))
        except ProcessError as exc:
            if not keep_going:
                raise
            errors.append(str(exc))
            if skipped is not None:
                skipped(str(exc))
    if not done:
        raise ProcessError("no process could be read: " + "; ".join(errors))
    return done, errors


def _converge(read: list[ProcessMemory], tables: list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]],
              m: int) -> dict[str, Any]:
    """Totals (images.Ideal's) and per-process figures of what KSM converges to.

    A content of n copies takes k KSM pages (ceil(n/m), less one if the last
    copy is alone: n % m == 1); the copies that merge map them.  The lone copy
    is counted against the last process that has the content.
    """
    d = np.concatenate([t[0] for t in tables])
    c = np.concatenate([t[1] for t in tables])
    owner = np.concatenate([np.full(len(t[1]), i) for i, t in enumerate(tables)])
    order = np.lexsort((owner, d[:, 1], d[:, 0]))
    d, c, owner = d[order], c[order], owner[order]
    new = np.ones(len(d), np.bool_)
    if len(d):
        new[1:] = (d[1:] != d[:-1]).any(axis=1)
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    n = np.add.reduceat(c, starts) if len(d) else np.zeros(0, np.int64)
    lone = (n > 1) & (n % m == 1)
    k = np.where(n > 1, -(-n // m) - lone, 0)
    last = np.append(starts[1:], len(d)) - 1
    merged = np.where(n[group] > 1, c, 0)
    merged[last[lone]] -= 1
    merged_total = n - lone
    saved = merged * np.where(merged_total[group] > 0, 1 - k[group] / np.maximum(merged_total[group], 1), 0)
    is_zero = (d == ZERO_DIGEST).all(axis=1) if len(d) else np.zeros(0, np.bool_)
    best = ideal_from_counts(d[starts], n, m)
    rmap_items = sum(p.pages for p in read)
    processes = []
    for i, p in enumerate(read):
        mine = owner == i
        merging = int(merged[mine].sum())
        processes.append(ProcessEstimate(
            pid=p.pid, comm=p.comm, pages=p.pages, zero_page_mappings=p.zero_page_mappings,
            ksm_merging_pages=merging, saved_pages=round(float(saved[mine].sum())),
            ksm_process_profit=merging * PAGE_SIZE - p.pages * KERNEL_RMAP_ITEM_BYTES,
            zero_pages=int(c[mine & is_zero].sum())))
    return {
        **best.as_dict(),
        "rmap_items": rmap_items,
        "zero_page_mappings": sum(p.zero_page_mappings for p in read),
        "general_profit": best.pages_sharing * PAGE_SIZE - rmap_items * KERNEL_RMAP_ITEM_BYTES,
        "general_profit_zero": (best.pages_sharing_zero + best.zero_pages) * PAGE_SIZE
        - rmap_items * KERNEL_RMAP_ITEM_BYTES,
        "processes": [asdict(p) for p in processes],
        "mappings": {str(p.pid): p.mappings for p in read},
    }


def capture_processes(pids: list[int], outdir: str, all_mappings: bool = False, keep_going: bool = False,
                      skipped: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write each process's pages as a raw image ``PID.img`` in ``outdir``, and ``mappings.json``.

    The JSON names each image and, per mapping read, its address range,
    permissions, path and where its pages start in the image; ``shmksm run
    --image DIR/PID.img`` runs them later.  Errors as estimate_processes's.
    """
    os.makedirs(outdir, exist_ok=True)

    def capture_one(pid: int) -> ProcessMemory:
        path = os.path.join(outdir, f"{pid}.img")
        try:
            with open(path, "wb") as image:
                memory, _ = read_process(pid, all_mappings, sink=image.write)
        except ProcessError:
            os.unlink(path)
            raise
        if not memory.pages:
            os.unlink(path)
        return memory

    done, errors = _read_each(pids, capture_one, keep_going, skipped)
    captured = {str(m.pid): {"comm": m.comm, "image": f"{m.pid}.img" if m.pages else None, "pages": m.pages,
                             "zero_page_mappings": m.zero_page_mappings, "mappings": m.mappings} for m in done}
    result = {"all_mappings": all_mappings, "processes": captured, "errors": errors}
    with open(os.path.join(outdir, "mappings.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
