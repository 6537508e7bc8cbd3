"""Reads and writes of many pages at once, and the array API, against plain models.

A write or read across pages takes each run of 512 PTEs' lock once and
resolves the run's faults together; these tests drive it over ranges that
cross pages and runs, with any dtype and shape, while ksmd merges and another
process writes (and so breaks copy-on-write) at the same time, and check that
every byte reads back as a bytearray model says.

Every test runs twice: with the copies in C (the extension's gather and
scatter_pages) and in numpy, as where the extension is not built.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from helpers import merge_pages, pfn_of, pte_of, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from shmksm.workers.guest_random import NPATTERNS, pattern

import shmksm
import shmksm.guest
from shmksm import PAGE_SIZE
from shmksm._mm.locks import Lock
from shmksm._mm.pagetable import DIRTY, KSM, PRESENT, WRITE, YOUNG, ZERO, PageTable
from shmksm.errors import LockTimeout

RUN = 512  # PTEs per page-table lock
PAGES = 2 * RUN + 76  # three runs, the last one short
SIZE = PAGES * PAGE_SIZE
DTYPES = [np.uint8, np.int16, np.uint32, np.float64, np.complex64, np.bool_]
PATTERN_ROWS = np.stack([np.frombuffer(pattern(k), np.uint8) for k in range(NPATTERNS)])


@pytest.fixture(autouse=True, params=["c", "numpy"])
def copies(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The bulk copies in C, or in numpy (this process only: a spawned worker keeps C)."""
    if request.param == "c":
        if shmksm.guest._gather is None:
            pytest.skip("the C extension is not built")
    else:
        for name in ("_gather", "_scatter", "_scatter_pages"):
            monkeypatch.setattr(shmksm.guest, name, None)
    yield request.param


def _payload(seed: int, nbytes: int, patterned: bool) -> npt.NDArray[np.uint8]:
    """``nbytes`` bytes: random, or the shared page patterns over and over (what ksmd merges)."""
    if patterned:
        rows = np.random.default_rng(seed).integers(0, NPATTERNS, -(-nbytes // PAGE_SIZE))
        return PATTERN_ROWS[rows].reshape(-1)[:nbytes].copy()
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _as_array(raw: npt.NDArray[np.uint8], dtype: Any, columns: int) -> npt.NDArray[Any]:
    """``raw``'s bytes as an array of ``dtype``, 2-D with ``columns`` columns where they divide it."""
    arr = raw.view(dtype)
    if columns > 1 and len(arr) % columns == 0:
        arr = arr.reshape(-1, columns)
    return arr


# -- the model test ------------------------------------------------------------------------------


def cow_writer(view: shmksm.GuestView, stop: Any, seed: int) -> int:
    """In a guest process: write the shared patterns and break them again until ``stop``; return mismatches."""
    rng = np.random.default_rng(seed)
    model = np.zeros(view.size, np.uint8)
    while not stop.is_set():
        pages = rng.integers(0, view.pages, 8)
        rows = PATTERN_ROWS[rng.integers(0, NPATTERNS, 8)]
        view.write_pages(pages, rows)
        for page, row in zip(pages.tolist(), rows, strict=True):
            model[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = row
        addr = int(rng.integers(0, view.size - 64))
        stamp = rng.integers(0, 256, 64, dtype=np.uint8)
        view.write(addr, stamp)  # breaks copy-on-write of a merged page
        model[addr:addr + 64] = stamp
    return int(np.count_nonzero(view.read_array(0, view.size, np.uint8) != model))


ops = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 3 * RUN * PAGE_SIZE // 2),
              st.sampled_from(DTYPES), st.integers(1, 8), st.booleans(), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("write_pages"), st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=40),
              st.booleans(), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("read"), st.integers(0, SIZE - 1), st.integers(0, 3 * RUN * PAGE_SIZE // 2),
              st.sampled_from(DTYPES), st.sampled_from(["read", "read_array", "readinto"])),
)


def test_bulk_io_matches_a_bytearray_while_ksmd_merges_and_cow_breaks() -> None:
    with shmksm.Machine(frames=PAGES + 400, pages_to_scan=2000, sleep_millisecs=2) as machine:
        guest, other = machine.add_guest(pages=PAGES), machine.add_guest(pages=256)
        view = guest.view()
        for g in (guest, other):
            g.view().set_memory_merge(True)
        machine.ksm.run = 1
        stop = machine.ctx.Event()
        writer = machine.spawn(cow_writer, other, stop, 5)
        model = bytearray(SIZE)
        table = machine.system.table(guest.id)
        # Pages ksmd merges before the model starts, so that the model runs
        # against KSM pages whatever the pace of ksmd and of the examples.
        view.write_pages(np.arange(4), PATTERN_ROWS[[0, 0, 1, 1]])
        for page, k in enumerate([0, 0, 1, 1]):
            model[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = PATTERN_ROWS[k].tobytes()
        wait_until(lambda: np.count_nonzero(table.ptes & np.uint64(KSM)), 120, "ksmd merging the first pages")
        merged_seen = [int(np.count_nonzero(table.ptes & np.uint64(KSM)))]

        @settings(max_examples=60, deadline=None, database=None)
        @given(st.lists(ops, min_size=1, max_size=6))
        def run_ops(steps: list[tuple[Any, ...]]) -> None:
            for step in steps:
                if step[0] == "write":
                    _, addr, nbytes, dtype, columns, patterned, seed = step
                    size = np.dtype(dtype).itemsize
                    nbytes = min(nbytes, SIZE - addr) // size * size
                    if not nbytes:
                        continue
                    raw = _payload(seed, nbytes, patterned)
                    if dtype is np.bool_:
                        raw &= 1
                    view.write(addr, _as_array(raw, dtype, columns))
                    model[addr:addr + nbytes] = raw.tobytes()
                elif step[0] == "write_pages":
                    _, pages, patterned, seed = step
                    rows = _payload(seed, len(pages) * PAGE_SIZE, patterned).reshape(len(pages), PAGE_SIZE)
                    view.write_pages(np.array(pages), rows)
                    for page, row in zip(pages, rows, strict=True):  # in order: a repeated page keeps its last row
                        model[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = row.tobytes()
                else:
                    _, addr, nbytes, dtype, how = step
                    size = np.dtype(dtype).itemsize
                    nbytes = min(nbytes, SIZE - addr) // size * size
                    want = bytes(model[addr:addr + nbytes])
                    if how == "read":
                        got = view.read(addr, nbytes)
                    elif how == "read_array":
                        got = view.read_array(addr, nbytes // size, dtype).tobytes()
                    else:
                        buffer = np.empty(nbytes // size, dtype)
                        assert view.readinto(addr, buffer) == nbytes
                        got = buffer.tobytes()
                    assert got == want, f"{how} of {nbytes} bytes at {addr:#x}"
            merged_seen.append(int(np.count_nonzero(table.ptes & np.uint64(KSM))))

        try:
            run_ops()
            assert view.read(0, SIZE) == bytes(model)
            stats = machine.ksm.counters()
            assert stats["full_scans"] > 0, "ksmd never ran"
            assert max(merged_seen) > 0, "ksmd never merged a page of the guest under test"
        finally:
            stop.set()
        assert writer.join(60) == 0, "the concurrent writer read back something it did not write"
        machine.ksm.run = 0
        assert machine.system.get("cow_ksm") > 0, "no copy-on-write of a KSM page happened"
        machine.check()


# -- what a bulk write does under the MMU --------------------------------------------------------


def test_a_bulk_write_resolves_every_kind_of_fault_in_one_run(machine: shmksm.Machine) -> None:
    """Untouched, zero page, KSM page, write-protected private and writable pages, in one write."""
    a, b = machine.add_guest(pages=8), machine.add_guest(pages=1)
    va, vb = a.view(), b.view()
    content = pattern(0)
    va.write(2 * PAGE_SIZE, content)
    vb.write(0, content)
    kpfn, _ = merge_pages(machine, a, 2, b, 0)
    assert kpfn > 0
    va.read(1 * PAGE_SIZE, 1)  # the zero page
    va.write(3 * PAGE_SIZE, b"private")
    table = machine.system.table(a.id)
    with table.ptl(3):  # type: ignore[attr-defined]
        table.pv[3] &= ~WRITE  # write-protected by a merge that did not happen
    va.write(4 * PAGE_SIZE, b"writable")
    cow_before = machine.system.get("cow_ksm")
    data = np.random.default_rng(1).integers(0, 256, 6 * PAGE_SIZE - 200, dtype=np.uint8)
    va.write(100, data)
    assert va.read(100, len(data)) == data.tobytes()
    assert va.read(0, 100) == bytes(100)
    writable = PRESENT | WRITE | DIRTY | YOUNG
    for page in range(6):
        assert pte_of(machine, a, page) & (writable | KSM | ZERO) == writable
    assert pfn_of(machine, a, 2) != kpfn
    assert machine.system.get("cow_ksm") == cow_before + 1
    assert vb.read(0, PAGE_SIZE) == content, "the write reached a frame another guest maps"
    assert pte_of(machine, a, 7) == 0


def test_a_bulk_read_leaves_untouched_pages_untouched(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=RUN + 8)
    view = guest.view()
    view.write((RUN - 1) * PAGE_SIZE, b"x" * PAGE_SIZE)
    table = machine.system.table(guest.id)
    table.pv[RUN - 1] &= ~YOUNG  # as clear_flush_young leaves it
    got = view.read_array(0, (RUN + 8, PAGE_SIZE), np.uint8)
    assert (got[RUN - 1] == ord("x")).all() and not got[:RUN - 1].any() and not got[RUN:].any()
    assert all(pte_of(machine, guest, p) == 0 for p in range(RUN + 8) if p != RUN - 1), "a read faulted a page in"
    assert pte_of(machine, guest, RUN - 1) & YOUNG, "a read did not mark the page it read young"
    assert machine.free_frames() == 1024 - 2


def test_an_array_write_makes_no_copy_of_the_array() -> None:
    with shmksm.Machine(frames=1100, ksmd=False) as machine:
        view = machine.add_guest(pages=1024).view()
        data = np.random.default_rng(2).random(512 * PAGE_SIZE // 8).reshape(512, -1)  # 2 MiB of float64
        view.write(0, data)  # the faults (allocation) out of the way
        tracemalloc.start()
        try:
            view.write(100, data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < data.nbytes // 8, f"the write allocated {peak} bytes for {data.nbytes} bytes of data"
        assert view.read_array(100, data.shape, data.dtype).tobytes() == data.tobytes()


def test_write_pages_scatters_rows_in_any_order() -> None:
    with shmksm.Machine(frames=3 * RUN, ksmd=False) as machine:
        view = machine.add_guest(pages=2 * RUN + 10).view()
        rng = np.random.default_rng(3)
        pages = rng.integers(0, view.pages, 300)
        rows = rng.integers(0, 2**63, (300, PAGE_SIZE // 8), dtype=np.int64)
        view.write_pages(pages.astype(np.int32), rows)
        model = np.zeros((view.pages, PAGE_SIZE // 8), np.int64)
        for page, row in zip(pages, rows, strict=True):
            model[page] = row
        assert view.read(0, view.size) == model.tobytes()
        view.write_pages([5, 5, 7], np.stack([np.full(PAGE_SIZE, v, np.uint8) for v in (1, 2, 3)]))
        assert view.read(5 * PAGE_SIZE, 1) == b"\x02" and view.read(7 * PAGE_SIZE, 1) == b"\x03"
        view.write_pages(np.array([], np.int64), np.zeros((0, PAGE_SIZE), np.uint8))
        # Page numbers of any integer dtype or a list, rows of any bytes-like.
        for where in (np.array([9, 8], np.uint64), np.array([9, 8], np.int16), [9, 8]):
            rows = rng.integers(0, 256, (2, PAGE_SIZE), dtype=np.uint8)
            view.write_pages(where, rows.tobytes())
            assert view.read(8 * PAGE_SIZE, 2 * PAGE_SIZE) == rows[::-1].tobytes()
        machine.check()


# -- out of frames in the middle ------------------------------------------------------------------


def test_out_of_frames_in_the_middle_of_a_bulk_write_writes_a_prefix() -> None:
    """The pool runs dry in the second run of 512 PTEs: the first run and part of the second land."""
    with shmksm.Machine(frames=RUN + 101, overcommit=True, ksmd=False) as machine:
        view = machine.add_guest(pages=2 * RUN).view()
        data = np.random.default_rng(4).integers(0, 256, 2 * RUN * PAGE_SIZE - 300, dtype=np.uint8)
        with pytest.raises(shmksm.OutOfFrames) as info:
            view.write(300, data)
        written = (RUN + 100) * PAGE_SIZE - 300  # the frames there were: RUN + 100
        assert info.value.written == written
        assert isinstance(info.value, MemoryError) and "\n" not in str(info.value)
        assert f"wrote the first {written} of {len(data)} bytes" in str(info.value)
        got = view.read_array(0, view.size, np.uint8)
        assert got[300:300 + written].tobytes() == data[:written].tobytes()
        assert not got[:300].any() and not got[300 + written:].any(), "bytes past the prefix landed"
        machine.check()
        # Once frames are back the rest goes in.
        view.munmap(0, PAGE_SIZE)
        with pytest.raises(shmksm.SegmentationFault):
            view.write(300, data)  # an unmapped page anywhere: nothing written
        assert not view.read_array((RUN + 100) * PAGE_SIZE, 1, np.uint8).any()


def test_out_of_frames_in_write_pages_says_which_rows_landed() -> None:
    with shmksm.Machine(frames=11, overcommit=True, ksmd=False) as machine:
        view = machine.add_guest(pages=2 * RUN).view()
        pages = np.array([900, 3, 600, 4, 3, 700, 1, 2, 5, 6, 7, 8, 9, 10])
        rows = np.repeat(np.arange(1, len(pages) + 1, dtype=np.uint8), PAGE_SIZE).reshape(len(pages), PAGE_SIZE)
        with pytest.raises(shmksm.OutOfFrames) as info:
            view.write_pages(pages, rows)
        # Ten frames: pages 1-10 in address order; pages 600, 700 and 900 got none.
        landed = pages < 600
        assert info.value.written == PAGE_SIZE * int(np.count_nonzero(landed))
        for i, page in enumerate(pages.tolist()):
            first = view.read(page * PAGE_SIZE, 1)[0]
            if page >= 600:
                assert first == 0
            elif page != 3:
                assert first == i + 1
        assert view.read(3 * PAGE_SIZE, 1) == b"\x05", "page 3 keeps its last row"
        machine.check()


# -- bad arguments ---------------------------------------------------------------------------------

BAD_CALLS = [
    ("read_array negative shape", lambda v: v.read_array(0, -1, np.uint8)),
    ("read_array float shape", lambda v: v.read_array(0, 1.5, np.uint8)),
    ("read_array str shape", lambda v: v.read_array(0, "4", np.uint8)),
    ("read_array unknown dtype", lambda v: v.read_array(0, 4, "no such dtype")),
    ("read_array object dtype", lambda v: v.read_array(0, 4, object)),
    ("read_array past the end", lambda v: v.read_array(0, (PAGE_SIZE, 5), np.uint8)),
    ("read_array bad address", lambda v: v.read_array("0", 4, np.uint8)),
    ("readinto bytes", lambda v: v.readinto(0, b"read-only")),
    ("readinto read-only array", lambda v: v.readinto(0, np.frombuffer(b"abcd", np.uint8))),
    ("readinto strided array", lambda v: v.readinto(0, np.zeros(64, np.uint8)[::2])),
    ("readinto Fortran array", lambda v: v.readinto(0, np.zeros((4, 4), np.uint16, order="F"))),
    ("readinto a list", lambda v: v.readinto(0, [0] * 8)),
    ("readinto object array", lambda v: v.readinto(0, np.empty(4, object))),
    ("readinto past the end", lambda v: v.readinto(v.size - 1, bytearray(2))),
    ("write_pages 2-D pages", lambda v: v.write_pages(np.zeros((1, 1), np.int64), np.zeros((1, PAGE_SIZE), np.uint8))),
    ("write_pages float pages", lambda v: v.write_pages(np.array([1.0]), np.zeros((1, PAGE_SIZE), np.uint8))),
    ("write_pages page past the end", lambda v: v.write_pages([4], np.zeros((1, PAGE_SIZE), np.uint8))),
    ("write_pages negative page", lambda v: v.write_pages([-1], np.zeros((1, PAGE_SIZE), np.uint8))),
    ("write_pages short rows", lambda v: v.write_pages([0, 1], np.zeros((2, PAGE_SIZE - 1), np.uint8))),
    ("write_pages too few rows", lambda v: v.write_pages([0, 1], np.zeros((1, PAGE_SIZE), np.uint8))),
    ("write_pages rows of another shape", lambda v: v.write_pages([0, 1], np.zeros((4, PAGE_SIZE // 2), np.uint8))),
    ("write_pages strided rows", lambda v: v.write_pages([0, 1], np.zeros((4, PAGE_SIZE), np.uint8)[::2])),
    ("write_pages str rows", lambda v: v.write_pages([0], "x" * PAGE_SIZE)),
    ("write_pages no pages", lambda v: v.write_pages(None, np.zeros((1, PAGE_SIZE), np.uint8))),
]


@pytest.mark.parametrize("call", [c[1] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_are_one_line_usage_errors_that_change_nothing(machine: shmksm.Machine, call: Any) -> None:
    guest = machine.add_guest(pages=4)
    view = guest.view()
    view.write(0, pattern(1) * 2)
    ptes = machine.system.table(guest.id).ptes.copy()
    with pytest.raises(shmksm.UsageError) as info:
        call(view)
    assert "\n" not in str(info.value) and str(info.value)
    assert (machine.system.table(guest.id).ptes == ptes).all()
    assert view.read(0, 2 * PAGE_SIZE) == pattern(1) * 2


def test_a_bulk_write_waits_for_frames_pending_reclamation(machine: shmksm.Machine,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames that wait for acknowledgments: the run stops, the lock is released, the write resumes."""
    from shmksm._mm.frames import Frames, FramesPending

    view = machine.add_guest(pages=2 * RUN - 8).view()
    pending = {"alloc": 2, "alloc_many": 2}  # each refused bulk allocation falls back to one frame at a time
    real_alloc, real_alloc_many = Frames.alloc, Frames.alloc_many

    def alloc(self: Frames, *args: Any, **kwargs: Any) -> int:
        if pending["alloc"]:
            pending["alloc"] -= 1
            raise FramesPending
        return real_alloc(self, *args, **kwargs)

    def alloc_many(self: Frames, *args: Any, **kwargs: Any) -> list[int]:
        if pending["alloc_many"]:
            pending["alloc_many"] -= 1
            raise FramesPending
        return real_alloc_many(self, *args, **kwargs)

    monkeypatch.setattr(Frames, "alloc", alloc)
    monkeypatch.setattr(Frames, "alloc_many", alloc_many)
    data = np.random.default_rng(5).integers(0, 256, (RUN + 20) * PAGE_SIZE, dtype=np.uint8)
    view.write(RUN // 2 * PAGE_SIZE + 7, data)
    assert pending == {"alloc": 0, "alloc_many": 0}
    assert view.read(RUN // 2 * PAGE_SIZE + 7, len(data)) == data.tobytes()
    rows = np.random.default_rng(6).integers(0, 256, (40, PAGE_SIZE), dtype=np.uint8)
    pages = np.arange(2 * RUN - 48, 2 * RUN - 8)[::-1]
    pending.update(alloc=1, alloc_many=1)
    view.write_pages(pages, rows)
    assert pending == {"alloc": 0, "alloc_many": 0}
    assert view.read_array((2 * RUN - 48) * PAGE_SIZE, (40, PAGE_SIZE), np.uint8).tobytes() == rows[::-1].tobytes()


# -- the look under the lock, and a lock or a fault that fails mid-way --------------------------------


class _Wrapped:
    """A page-table lock whose ``acquire`` runs ``then(run)`` once it has the lock (or raises instead)."""

    def __init__(self, lock: Lock, run: int, then: Any) -> None:
        self.lock, self.run, self.then = lock, run, then

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        got = self.lock.acquire(block, timeout)
        try:
            self.then(self.run)
        except BaseException:
            self.lock.release()
            raise
        return got

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _two_runs(machine: shmksm.Machine) -> tuple[shmksm.Guest, shmksm.GuestView]:
    guest = machine.add_guest(pages=RUN + 64)
    view = guest.view()
    view.write(0, np.ones(view.size, np.uint8))  # every page writable, dirty and young
    return guest, view


def _wrap_locks(view: shmksm.GuestView, then: Any) -> list[Lock]:
    real: list[Lock] = view._run_locks
    view._run_locks = [_Wrapped(lock, run, then) for run, lock in enumerate(real)]
    return real


@pytest.mark.parametrize("how", ["write_pages", "write_pages of a few", "write"])
def test_a_bulk_write_looks_at_each_run_again_under_its_lock(machine: shmksm.Machine, how: str) -> None:
    """A page write-protected (as ksmd's write_protect_page does) between the first look at the
    PTEs and its run's lock is faulted, not written through its old PTE."""
    guest, view = _two_runs(machine)
    table = machine.system.table(guest.id)
    protected = RUN + 10
    done: list[int] = []

    def write_protect(run: int) -> None:
        if run == 1 and not done:  # once: the reads below take the lock too
            table.pv[protected] &= ~WRITE
            done.append(run)

    _wrap_locks(view, write_protect)
    rng = np.random.default_rng(7)
    if how.startswith("write_pages"):
        pages = np.array([RUN + 20, 3, protected, RUN + 5, 100] * (1 if how.endswith("few") else 4))
        rows = rng.integers(0, 256, (len(pages), PAGE_SIZE), dtype=np.uint8)
        view.write_pages(pages, rows)
        for page, row in zip(pages[-5:].tolist(), rows[-5:], strict=True):
            assert view.read(page * PAGE_SIZE, PAGE_SIZE) == row.tobytes()
    else:
        data = rng.integers(0, 256, (RUN + 30) * PAGE_SIZE, dtype=np.uint8)
        view.write(PAGE_SIZE + 9, data)
        assert view.read(PAGE_SIZE + 9, len(data)) == data.tobytes()
    assert pte_of(machine, guest, protected) & WRITE, "written through a write-protected PTE, without a fault"
    machine.check()


def test_a_lock_refused_mid_way_leaves_no_lock_held(machine: shmksm.Machine) -> None:
    """The second run's lock is not had: the error goes out, the first run's lock is free again."""
    _guest, view = _two_runs(machine)

    def refuse(run: int) -> None:
        if run == 1:
            raise LockTimeout("lock not had")

    real = _wrap_locks(view, refuse)
    rows = np.full((2, PAGE_SIZE), 5, np.uint8)
    with pytest.raises(LockTimeout):
        view.write_pages(np.array([RUN + 1, 1]), rows)
    with pytest.raises(LockTimeout):
        view.write((RUN - 1) * PAGE_SIZE, np.full(2 * PAGE_SIZE, 6, np.uint8))
    with pytest.raises(LockTimeout):
        view.read(0, view.size)
    with pytest.raises(LockTimeout):
        view.readinto(0, np.empty(view.size, np.uint8))
    for lock in real:
        assert lock.acquire(block=False), "a page-table lock was left held"
        lock.release()
    view._run_locks = real
    assert view.read(PAGE_SIZE, PAGE_SIZE) == rows[1].tobytes(), "the run before the refused lock was not written"
    assert view.read((RUN - 1) * PAGE_SIZE, 2 * PAGE_SIZE) == bytes([6]) * PAGE_SIZE + bytes([1]) * PAGE_SIZE


def test_a_read_fault_that_fails_releases_the_lock(machine: shmksm.Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    guest, view = _two_runs(machine)
    table = machine.system.table(guest.id)
    table.pv[1] &= ~YOUNG  # as clear_flush_young leaves it: a read marks it young, through the fault handler

    def fails(self: PageTable, start: int, end: int) -> None:
        raise RuntimeError("the fault handler failed")

    monkeypatch.setattr(PageTable, "handle_read_faults", fails)
    with pytest.raises(RuntimeError, match="fault handler"):
        view.read(0, 2 * PAGE_SIZE + 1)
    lock = table.run_locks[0]
    assert lock.acquire(block=False), "the page-table lock was left held"
    lock.release()


def test_a_read_across_an_unmapped_page_reads_nothing(machine: shmksm.Machine) -> None:
    _guest, view = _two_runs(machine)
    view.munmap((RUN + 5) * PAGE_SIZE, PAGE_SIZE)
    buffer = np.full(view.size, 7, np.uint8)
    with pytest.raises(shmksm.SegmentationFault, match=f"read of unmapped page {RUN + 5:#x}"):
        view.readinto(0, buffer)
    assert (buffer == 7).all(), "a read that failed filled part of the buffer"
    with pytest.raises(shmksm.SegmentationFault, match=f"read of unmapped page {RUN + 5:#x}"):
        view.read(100, view.size - 200)
    assert view.read(0, (RUN + 5) * PAGE_SIZE) == bytes([1]) * ((RUN + 5) * PAGE_SIZE)
