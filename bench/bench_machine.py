"""Benchmarks of the emulated machine, as ratios against baselines of the same run.

Nothing here is compared with a figure measured elsewhere: every emulated
operation is timed next to a plain-Python/numpy baseline doing the same work
on the same machine in the same run, and the report is the ratio.  The one
absolute target, the copy-on-write break, is the real kernel's figure for a
KSM page on this machine kind (3.0 us).

Sections::

    a  4 KiB page-aligned write into a faulted writable page  vs  pool[i] = data   (<= 1.5x)
       one page-table lock acquire+release  vs  a multiprocessing.Lock's          (<= 1.5x)
    b  8-byte write                                           vs  flat[o:o+8] = d8 (<= 4x)
    c  copy-on-write break of a merged page, median per break                     (<= 3.0 us)
    d  aggregate write throughput, 2 guest processes vs 1                         (>= 1.8x)
    e  page-table + frame-metadata bytes per 4 KiB page                           (<= 24)
    f  bring-up of a 1 GiB pool with 4 guests of 512 MiB, and its close           (< 2 s)
    g  write of 16 / 256 / 2048 pages  vs  flat[a:b] = data          (<= 2.0x / 1.3x / 1.2x)
       write_pages of 256 random pages  vs  pool[pages] = rows                     (<= 1.3x)
       read of 256 / 2048 pages  vs  flat[a:b].tobytes()                           (<= 1.5x)
       readinto and read_array beside them, and a read of pages whose frames are scattered

Section g runs in one guest of 4096 pages, every page faulted in, against a
plain shared-memory array of 4096 pages: the accesses move through the whole
16 MiB, as a guest's would, on both sides alike.

Method: ``time.perf_counter``; one warm-up pass, then the median of several
repetitions, baseline and emulated interleaved so that drift hits both.  Every
page is faulted in (emulated) or touched (baseline) before any timed region,
so first-touch faults of /dev/shm pages are in neither side of a ratio.  The
cost of the bare timing loop is measured and subtracted from both sides.

Run: ``python bench/bench_machine.py [--quick] [--json FILE] [--only abcdefg]``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
from report import Row, exit_code, print_table, write_json

import shmksm
from shmksm._ksm import ksm
from shmksm._mm import frames as frames_mod
from shmksm._mm import pagetable, segments
from shmksm._mm.pagetable import PFN_MASK

PAGE = shmksm.PAGE_SIZE
HOT_PAGES = 64  # pages cycled through by the write loops: 256 KiB, cache-resident on both sides
KERNEL_COW_KSM_US = 3.0  # the real kernel's copy-on-write of a KSM page on this machine kind


@dataclass
class Settings:
    reps: int
    loop: int
    cow_pages: int
    cow_rounds: int
    seconds: float
    machine_reps: int


# -- timing helpers ------------------------------------------------------------------------------


def _loop_ns(body: Callable[[], None], n: int) -> float:
    """ns per iteration of ``body``'s own loop of ``n`` iterations."""
    t = time.perf_counter()
    body()
    return (time.perf_counter() - t) / n * 1e9


def interleaved(bodies: dict[str, Callable[[], None]], n: int, reps: int) -> dict[str, float]:
    """Median ns per iteration of each body, run in turn ``reps`` times after a warm-up."""
    for body in bodies.values():
        body()
    samples: dict[str, list[float]] = {k: [] for k in bodies}
    for _ in range(reps):
        for key, body in bodies.items():
            samples[key].append(_loop_ns(body, n))
    return {k: statistics.median(v) for k, v in samples.items()}


def _shared_pool(npages: int) -> shared_memory.SharedMemory:
    """A plain shared-memory segment of ``npages`` pages of 4 KiB, every page touched."""
    shm = shared_memory.SharedMemory(create=True, size=npages * PAGE)
    np.ndarray(npages * PAGE, np.uint8, shm.buf).fill(1)
    return shm


def _drop_shared_pool(shm: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(BufferError):  # an exception on its way keeps a view alive: unlink anyway
        shm.close()
    shm.unlink()


# -- a, b: single writes -------------------------------------------------------------------------


def bench_writes(s: Settings) -> list[Row]:
    shm = _shared_pool(HOT_PAGES)
    try:
        t = _time_writes(s, shm)
    finally:
        _drop_shared_pool(shm)
    net = {k: v - t["empty"] for k, v in t.items()}
    base4, base8 = net["np4k"], net["np8"]
    r4, r4b = net["emu4k"] / base4, net["emu4k_bytes"] / base4
    r8, r8b = net["emu8"] / base8, net["emu8_bytes"] / base8
    floor = net["lock"] + net["copy4k"]
    rl = net["lock"] / net["mplock"]
    return [
        Row("a", "4 KiB write, same uint8 ndarray as baseline", r4, "x", base4, "<= 1.5x", r4 <= 1.5,
            f"emulated {net['emu4k']:.0f} ns vs numpy pool[i] = data {base4:.0f} ns"),
        Row("a.bytes", "4 KiB write, bytes data", r4b, "x", base4, "", None, f"emulated {net['emu4k_bytes']:.0f} ns"),
        Row("a.floor", "4 KiB: PTL acquire+release and the mmap copy alone", floor / base4, "x", base4, "", None,
            f"lock {net['lock']:.0f} ns + copy {net['copy4k']:.0f} ns; the rest of the emulated write is "
            f"Python: call, checks, PTE test ({net['emu4k'] - floor:.0f} ns)"),
        Row("a.lock", "one PTL acquire+release vs a multiprocessing.Lock's", rl, "x", net["mplock"], "<= 1.5x",
            rl <= 1.5, f"robust mutex {net['lock']:.0f} ns vs multiprocessing.Lock {net['mplock']:.0f} ns"),
        Row("b", "8-byte write, same uint8 ndarray as baseline", r8, "x", base8, "<= 4x", r8 <= 4.0,
            f"emulated {net['emu8']:.0f} ns vs numpy flat[o:o+8] = d8 {base8:.0f} ns"),
        Row("b.bytes", "8-byte write, bytes data", r8b, "x", base8, "", None, f"emulated {net['emu8_bytes']:.0f} ns"),
    ]


def _time_writes(s: Settings, shm: shared_memory.SharedMemory) -> dict[str, float]:
    """ns per write of each kind (loop included), baseline and emulated interleaved."""
    rng = np.random.default_rng(1)
    data4k = rng.integers(0, 256, PAGE, dtype=np.uint8)
    bytes4k = data4k.tobytes()
    data8 = rng.integers(0, 256, 8, dtype=np.uint8)
    bytes8 = data8.tobytes()
    n = s.loop
    rows = [i % HOT_PAGES for i in range(n)]
    addrs = [r * PAGE for r in rows]
    addrs8 = [a + 8 * (i % 511) for i, a in enumerate(addrs)]
    pool = np.ndarray((HOT_PAGES, PAGE), np.uint8, shm.buf)
    flat = pool.reshape(-1)
    with shmksm.Machine(frames=4 * HOT_PAGES) as machine:
        view = machine.add_guest(pages=HOT_PAGES).view()
        for a in range(0, HOT_PAGES * PAGE, PAGE):
            view.write(a, data4k)  # fault in: every page private, writable, dirty, young
        write = view.write
        table = machine.system.table(view.gid)
        lock: Any = table.ptl(0)
        acquire, release = lock.acquire, lock.release
        mp_lock = multiprocessing.Lock()  # the baseline of a.lock: a POSIX semaphore, what the locks once were
        mp_acquire, mp_release = mp_lock.acquire, mp_lock.release
        mm: Any = machine.system.frames.mm  # Any: numpy's stubs do not count an ndarray as a buffer
        frame_addrs = [(table.pv[r] & PFN_MASK) << 12 for r in rows]  # where the guest's writes land

        def empty() -> None:
            for _a in addrs:
                pass

        def np4k() -> None:
            for i in rows:
                pool[i] = data4k

        def emu4k() -> None:
            for a in addrs:
                write(a, data4k)

        def emu4k_bytes() -> None:
            for a in addrs:
                write(a, bytes4k)

        def np8() -> None:
            for o in addrs8:
                flat[o:o + 8] = data8

        def emu8() -> None:
            for a in addrs8:
                write(a, data8)

        def emu8_bytes() -> None:
            for a in addrs8:
                write(a, bytes8)

        def lock_pair() -> None:
            for _a in addrs:
                acquire()
                release()

        def mp_lock_pair() -> None:
            for _a in addrs:
                mp_acquire()
                mp_release()

        def copy4k() -> None:
            for a in frame_addrs:
                mm[a:a + PAGE] = data4k

        # In this order, the last pass of each kind leaves its mark to check below.
        t = interleaved({"empty": empty, "lock": lock_pair, "mplock": mp_lock_pair, "copy4k": copy4k,
                         "np4k": np4k, "emu4k": emu4k, "emu4k_bytes": emu4k_bytes,
                         "np8": np8, "emu8": emu8, "emu8_bytes": emu8_bytes}, n, s.reps)
        machine.check()
        if view.read(addrs8[-1], 8) != bytes8 or view.read(PAGE + 4088, 8) != bytes4k[4088:]:
            raise AssertionError("emulated writes did not land")
    return t


# -- c: copy-on-write break of a KSM page ------------------------------------------------------------


def _merge_all(table: pagetable.PageTable, npages: int) -> None:
    """Merge pages [0, npages), all identical, into one KSM page by hand."""
    pv = table.pv
    kpfn, kgen = ksm.try_to_merge_two_pages(table, 0, pv[0] & PFN_MASK, table, 1, pv[1] & PFN_MASK)
    if kpfn < 0:
        raise AssertionError("try_to_merge_two_pages failed")
    for page in range(2, npages):
        if not ksm.try_to_merge_one_page(table, page, pv[page] & PFN_MASK, kpfn, kgen):
            raise AssertionError(f"try_to_merge_one_page failed on page {page}")
    if any(pv[p] & PFN_MASK != kpfn for p in range(npages)):
        raise AssertionError("pages do not share one KSM page")


def bench_cow(s: Settings) -> list[Row]:
    npages = s.cow_pages
    content = np.random.default_rng(2).integers(0, 256, PAGE, dtype=np.uint8)
    data8 = np.arange(8, dtype=np.uint8)
    clock = time.perf_counter
    # The cost of the timing pair itself, subtracted from each sample.
    pair = statistics.median(_timing_pair(clock) for _ in range(20001))
    per_break: list[float] = []
    plain: list[float] = []
    with shmksm.Machine(frames=npages + 16) as machine:
        view = machine.add_guest(pages=npages).view()
        table = machine.system.table(view.gid)
        write = view.write
        for rnd in range(s.cow_rounds + 1):  # round 0 is the warm-up
            for p in range(npages):
                view.write(p * PAGE, content)
            _merge_all(table, npages)
            # Merges freed npages - 1 frames (all touched before): make them allocatable,
            # so the copies go to frames whose /dev/shm pages already exist.
            machine.reclaim()
            samples = []
            for p in range(npages):
                a = p * PAGE + 64
                t0 = clock()
                write(a, data8)
                t1 = clock()
                samples.append(t1 - t0 - pair)
            again = []
            for p in range(npages):  # the same write once more: no fault now
                a = p * PAGE + 64
                t0 = clock()
                write(a, data8)
                t1 = clock()
                again.append(t1 - t0 - pair)
            if rnd:
                per_break += samples
                plain += again
        machine.check()
        if any(table.pv[p] & pagetable.KSM for p in range(npages)):
            raise AssertionError("a write left a KSM mapping")
        del view, write, table
    med = statistics.median(per_break) * 1e6
    p90 = float(np.percentile(per_break, 90)) * 1e6
    med_plain = statistics.median(plain) * 1e6
    return [Row("c", "copy-on-write break of a KSM page (8-byte write), median", med, "us", KERNEL_COW_KSM_US,
                f"<= {KERNEL_COW_KSM_US} us", med <= KERNEL_COW_KSM_US,
                f"p90 {p90:.2f} us; the same write with no fault {med_plain:.2f} us; "
                f"{len(per_break)} breaks of {npages} pages sharing one KSM page")]


def _timing_pair(clock: Callable[[], float]) -> float:
    t0 = clock()
    t1 = clock()
    return t1 - t0


# -- d: throughput of 1 vs 2 guest processes -----------------------------------------------------------


@dataclass(frozen=True)
class WriterJob:
    """What one writer process of section d does: 4 KiB writes into ``npages`` pages for ``seconds``."""

    npages: int
    data: bytes
    seconds: float
    segment: str = ""  # the baseline's shared-memory segment


def _guest_writer(view: shmksm.GuestView, job: WriterJob, barrier: Any) -> tuple[float, float, float, float]:
    """In a guest process: write into its faulted pages until time is up; return _timed's figures."""
    write = view.write
    data = np.frombuffer(job.data, np.uint8)
    addrs = [p * PAGE for p in range(job.npages)]
    for _ in range(50):  # warm up: this process's own mapping of the segments, the interpreter
        for a in addrs:
            write(a, data)
    barrier.wait()
    count = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    deadline = t0 + job.seconds
    while True:
        for a in addrs:
            write(a, data)
        count += job.npages
        if time.perf_counter() >= deadline:
            break
    return count, time.perf_counter() - t0, time.thread_time() - c0, time.process_time()


def _numpy_writer(job: WriterJob, row0: int, barrier: Any, out: Any, slot: int) -> None:
    """The baseline's process: plain numpy 4 KiB writes into its own rows of a shared ndarray."""
    shm = segments.attach(job.segment)
    pool = np.ndarray((row0 + job.npages, PAGE), np.uint8, shm.buf)
    data = np.frombuffer(job.data, np.uint8)
    rows = list(range(row0, row0 + job.npages))
    for _ in range(50):
        for r in rows:
            pool[r] = data
    barrier.wait()
    count = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    deadline = t0 + job.seconds
    while True:
        for r in rows:
            pool[r] = data
        count += job.npages
        if time.perf_counter() >= deadline:
            break
    out[4 * slot:4 * slot + 3] = [count, time.perf_counter() - t0, time.thread_time() - c0]
    del pool
    shm.close()
    out[4 * slot + 3] = time.process_time()


# CPU seconds of the writer processes: children of the fork server, not of this process.
_workers_cpu: list[float] = []


def _rates(results: list[tuple[float, float, float, float]]) -> tuple[float, float]:
    """Writers' (writes, wall s, CPU s in the loop, CPU s in all) → (writes/s, writes per CPU-second summed).

    The second is the aggregate rate if every writer had a core to itself:
    it does not depend on what other processes take from the machine.
    """
    _workers_cpu.append(sum(r[3] for r in results))
    return sum(r[0] / r[1] for r in results), sum(r[0] / r[2] for r in results)


def _emulated_rate(machine: shmksm.Machine, guests: list[shmksm.Guest], job: WriterJob) -> tuple[float, float]:
    barrier = machine.ctx.Barrier(len(guests))
    procs = [machine.spawn(_guest_writer, g, job, barrier) for g in guests]
    return _rates([p.join(60 + job.seconds) for p in procs])


def _numpy_rate(ctx: Any, nprocs: int, job: WriterJob) -> tuple[float, float]:
    barrier = ctx.Barrier(nprocs)
    out = ctx.Array("d", 4 * nprocs)
    procs = [ctx.Process(target=_numpy_writer, args=(job, i * job.npages, barrier, out, i)) for i in range(nprocs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60 + job.seconds)
        if p.exitcode != 0:
            raise RuntimeError(f"baseline writer exited with {p.exitcode}")
    return _rates([(out[i], out[i + 1], out[i + 2], out[i + 3]) for i in range(0, 4 * nprocs, 4)])


def bench_scaling(s: Settings) -> list[Row]:
    data = np.random.default_rng(3).integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    runs: dict[str, list[tuple[float, float]]] = {"emu1": [], "emu2": [], "np1": [], "np2": []}
    shm = _shared_pool(2 * HOT_PAGES)
    job = WriterJob(HOT_PAGES, data, s.seconds, shm.name)
    try:
        with shmksm.Machine(frames=2 * HOT_PAGES + 16) as machine:
            guests = [machine.add_guest(pages=HOT_PAGES) for _ in range(2)]
            for g in guests:  # fault every page in
                view = g.view()
                for a in range(0, HOT_PAGES * PAGE, PAGE):
                    view.write(a, data)
            ctx = machine.ctx
            _emulated_rate(machine, guests[:1], WriterJob(HOT_PAGES, data, 0.2))  # warm-up: starts the fork server
            for _ in range(s.reps // 2 or 1):
                runs["emu1"].append(_emulated_rate(machine, guests[:1], job))
                runs["emu2"].append(_emulated_rate(machine, guests, job))
                runs["np1"].append(_numpy_rate(ctx, 1, job))
                runs["np2"].append(_numpy_rate(ctx, 2, job))
            machine.check()
    finally:
        _drop_shared_pool(shm)
    wall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    ratio = wall["emu2"] / wall["emu1"]
    cores = os.cpu_count() or 1
    return [
        Row("d", f"4 KiB writes/s, 2 guest processes vs 1 ({cores} cores)", ratio, "x", None, ">= 1.8x",
            ratio >= 1.8 if cores >= 2 else None,
            f"1 process {wall['emu1'] / 1e6:.2f} M writes/s, 2 processes {wall['emu2'] / 1e6:.2f} M writes/s"),
        Row("d.cpu", "the same per CPU-second of each writer (a core each, whatever else runs)",
            cpu["emu2"] / cpu["emu1"], "x", None, "", None,
            f"1 process {cpu['emu1'] / 1e6:.2f} M writes per CPU-s, 2 processes {cpu['emu2'] / 1e6:.2f} M"),
        Row("d.numpy", "plain numpy 4 KiB writes/s, 2 processes vs 1 (the machine's ceiling)",
            wall["np2"] / wall["np1"], "x", None, "", None,
            f"1 process {wall['np1'] / 1e6:.2f} M/s, 2 processes {wall['np2'] / 1e6:.2f} M/s "
            f"(per CPU-second: {cpu['np2'] / cpu['np1']:.2f}x); emulated 1 process = "
            f"{wall['emu1'] / wall['np1']:.2f} of numpy's rate"),
    ]


# -- g: many pages at once ----------------------------------------------------------------------------

BULK_PAGES = 4096
BULK_TARGETS = {("write", 16): 2.0, ("write", 256): 1.3, ("write", 2048): 1.2, ("write_pages", 256): 1.3,
                ("read", 256): 1.5, ("read", 2048): 1.5}


def _bulk_loops(k: int) -> int:
    """Operations per timed loop for ``k`` pages: about 8 MiB moved.

    Short loops, and three times as many as the other sections take: a
    median of many short samples is what survives other processes taking the
    CPUs now and then.
    """
    return max(2, 2048 // k)


def bench_bulk(s: Settings) -> list[Row]:
    shm = _shared_pool(BULK_PAGES)
    try:
        t = _time_bulk(s, shm)
    finally:
        _drop_shared_pool(shm)
    rows = []
    for (op, k), (emu, base, note) in t.items():
        ratio = emu / base
        target = BULK_TARGETS.get((op, k))
        what = f"{op.split('.')[0]} of {k} pages" + (", frames out of page order" if "." in op else "")
        rows.append(Row(f"g.{op}.{k}", what, ratio, "x", base / 1e3,
                        f"<= {target}x" if target else "", ratio <= target if target else None,
                        f"emulated {emu / 1e3:.1f} us vs {note} {base / 1e3:.1f} us"))
    return rows


def _time_bulk(s: Settings, shm: shared_memory.SharedMemory) -> dict[tuple[str, int], tuple[float, float, str]]:
    """(op, pages) → (emulated ns, baseline ns, the baseline's name); medians of 3 * ``s.reps``, interleaved."""
    rng = np.random.default_rng(4)
    pool = np.ndarray((BULK_PAGES, PAGE), np.uint8, shm.buf)
    flat = pool.reshape(-1)
    out: dict[tuple[str, int], tuple[float, float, str]] = {}
    with shmksm.Machine(frames=2 * BULK_PAGES + 16, ksmd=False) as machine:
        view = machine.add_guest(pages=BULK_PAGES).view()
        view.write(0, np.ones(BULK_PAGES * PAGE, np.uint8))  # every page faulted in, frames in page order
        for op, k in [("write", 16), ("write", 256), ("write", 2048), ("read", 16), ("read", 256), ("read", 2048),
                      ("readinto", 256), ("readinto", 2048), ("read_array", 2048)]:
            n = _bulk_loops(k)
            data = rng.integers(0, 256, k * PAGE, dtype=np.uint8)
            buf = np.empty(k * PAGE, np.uint8)
            starts = [(j * k * PAGE) % ((BULK_PAGES - k + 1) * PAGE) for j in range(n)]
            bodies = _bulk_bodies(op, view, flat, starts, data, buf)
            t = interleaved(bodies, n, 3 * s.reps)
            out[(op, k)] = (t["emu"], t["np"], _BASELINE_NAMES[op])
        scattered = machine.add_guest(pages=BULK_PAGES).view()
        one = np.ones(PAGE, np.uint8)
        for page in rng.permutation(BULK_PAGES).tolist():  # faulted in a random order: frames out of order
            scattered.write(page * PAGE, one)
        for op, k in [("read", 256), ("write", 256)]:
            n = _bulk_loops(k)
            data = rng.integers(0, 256, k * PAGE, dtype=np.uint8)
            starts = [(j * k * PAGE) % ((BULK_PAGES - k + 1) * PAGE) for j in range(n)]
            t = interleaved(_bulk_bodies(op, scattered, flat, starts, data, buf), n, 3 * s.reps)
            out[(f"{op}.scattered", k)] = (t["emu"], t["np"], _BASELINE_NAMES[op])
        k = 256
        n = _bulk_loops(k)
        page_sets = [rng.choice(BULK_PAGES, k, replace=False) for _ in range(8)]
        rows = rng.integers(0, 256, (k, PAGE), dtype=np.uint8)

        def np_scatter() -> None:
            for j in range(n):
                pool[page_sets[j & 7]] = rows

        def emu_scatter() -> None:
            for j in range(n):
                view.write_pages(page_sets[j & 7], rows)

        t = interleaved({"np": np_scatter, "emu": emu_scatter}, n, 3 * s.reps)
        out[("write_pages", k)] = (t["emu"], t["np"], "pool[pages] = rows")
        machine.check()
        last = page_sets[(n - 1) & 7]
        if view.read_array(int(last[0]) * PAGE, PAGE, np.uint8).tobytes() != rows[0].tobytes():
            raise AssertionError("write_pages did not land")
    return out


_BASELINE_NAMES = {"write": "flat[a:b] = data", "read": "flat[a:b].tobytes()", "readinto": "buf[:] = flat[a:b]",
                   "read_array": "flat[a:b].copy()"}


def _bulk_bodies(op: str, view: shmksm.GuestView, flat: Any, starts: list[int], data: Any,
                 buf: Any) -> dict[str, Callable[[], None]]:
    """The baseline and the emulated loop of one bulk operation over ``starts``."""
    nbytes = len(data)
    write, read, readinto, read_array = view.write, view.read, view.readinto, view.read_array

    def np_write() -> None:
        for a in starts:
            flat[a:a + nbytes] = data

    def emu_write() -> None:
        for a in starts:
            write(a, data)

    def np_read() -> None:
        for a in starts:
            flat[a:a + nbytes].tobytes()

    def emu_read() -> None:
        for a in starts:
            read(a, nbytes)

    def np_readinto() -> None:
        for a in starts:
            buf[:] = flat[a:a + nbytes]

    def emu_readinto() -> None:
        for a in starts:
            readinto(a, buf)

    def np_copy() -> None:
        for a in starts:
            flat[a:a + nbytes].copy()

    def emu_read_array() -> None:
        for a in starts:
            read_array(a, nbytes, np.uint8)

    return {"write": {"np": np_write, "emu": emu_write}, "read": {"np": np_read, "emu": emu_read},
            "readinto": {"np": np_readinto, "emu": emu_readinto},
            "read_array": {"np": np_copy, "emu": emu_read_array}}[op]


# -- e, f: memory and bring-up ----------------------------------------------------------------------------

POOL_FRAMES = 262144  # 1 GiB
GUEST_PAGES = 131072  # 512 MiB
NGUESTS = 4


def bench_memory() -> list[Row]:
    meta = frames_mod.meta_size(POOL_FRAMES) / POOL_FRAMES
    pte = pagetable.segment_size(GUEST_PAGES) / GUEST_PAGES
    total = meta + pte
    return [Row("e", "page-table + frame-metadata bytes per 4 KiB page", total, "B", None, "<= 24",
                total <= 24, f"frame metadata {meta:.2f} B/frame (META_BYTES_PER_FRAME "
                f"{frames_mod.META_BYTES_PER_FRAME}) + PTE and header {pte:.3f} B/page "
                f"(512 MiB guest)")]


def _bring_up() -> tuple[float, float, int, int]:
    """Seconds to create and to close the 1 GiB machine; its meta and page-table segment sizes."""
    t0 = time.perf_counter()
    machine = shmksm.Machine(frames=POOL_FRAMES, overcommit=True)
    try:
        guests = [machine.add_guest(pages=GUEST_PAGES) for _ in range(NGUESTS)]
        t1 = time.perf_counter()
        spec = machine.system.spec
        meta = os.path.getsize(f"/dev/shm/{spec.segment_name('meta')}")
        tables = sum(os.path.getsize(f"/dev/shm/{spec.segment_name(f'g{g.id}')}") for g in guests)
    finally:
        t2 = time.perf_counter()
        machine.close()
    return t1 - t0, time.perf_counter() - t2, meta, tables


def bench_bring_up(s: Settings) -> list[Row]:
    runs = [_bring_up() for _ in range(s.machine_reps)]
    up = statistics.median(r[0] for r in runs)
    down = statistics.median(r[1] for r in runs)
    meta, tables = runs[-1][2], runs[-1][3]
    measured = meta / POOL_FRAMES + tables / (NGUESTS * GUEST_PAGES)
    return [
        Row("f", "bring-up: 1 GiB pool + 4 guests of 512 MiB (overcommit)", up, "s", None, "< 2 s", up < 2.0,
            f"first run {runs[0][0]:.3f} s; median of {len(runs)}"),
        Row("f.close", "close of that machine", down, "s", None, "", None, f"first run {runs[0][1]:.3f} s"),
        Row("e.measured", "bytes per 4 KiB page from the live segments' sizes", measured, "B", None, "<= 24",
            measured <= 24, f"meta segment {meta} B, 4 page tables {tables} B"),
    ]


# -- report -------------------------------------------------------------------------------------------------


def _cpu_clock() -> tuple[float, float, float]:
    """(wall seconds, CPU seconds busy on the whole machine, CPU seconds of this process and its children)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    t = os.times()
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def _others_share(start: tuple[float, float, float], end: tuple[float, float, float]) -> float:
    """The share of the machine's CPU time that other processes took between two _cpu_clock()s."""
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[2] - start[2]) - sum(_workers_cpu)
    return max(0.0, others) / (wall * (os.cpu_count() or 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE ('-' for stdout)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run, not a measurement")
    parser.add_argument("--only", default="abcdefg", help="sections to run, e.g. 'ac' (default: all)")
    args = parser.parse_args(argv)
    if args.quick:
        s = Settings(reps=3, loop=20000, cow_pages=500, cow_rounds=1, seconds=0.3, machine_reps=1)
    else:
        s = Settings(reps=9, loop=100000, cow_pages=2000, cow_rounds=5, seconds=1.0, machine_reps=5)
    only = set(args.only)
    start = _cpu_clock()
    rows: list[Row] = []
    # f first: a cold process shows the one-time costs (resource tracker start) in its first run.
    if "f" in only:
        rows += bench_bring_up(s)
    if only & {"a", "b"}:
        rows += bench_writes(s)
    if "c" in only:
        rows += bench_cow(s)
    if "d" in only:
        rows += bench_scaling(s)
    if "e" in only:
        rows += bench_memory()
    if "g" in only:
        rows += bench_bulk(s)
    rows.sort(key=lambda r: r.key)
    other = _others_share(start, _cpu_clock())
    print(f"shmksm {shmksm.__version__}, Python {platform.python_version()}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"CPU taken by other processes during the run: {other:.0%}")
    print_table(rows)
    if other > 0.05:
        print("warning: other processes used the CPUs during the run; the figures (d above all) are disturbed")
    if args.json:
        doc = {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
               "others_cpu_share": other, "settings": asdict(s), "rows": [asdict(r) for r in rows]}
        write_json(args.json, doc)
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
