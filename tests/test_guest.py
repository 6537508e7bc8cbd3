"""The guest API: read-after-write, demand paging, bad input, munmap, madvise, prctl."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from helpers import merge_pages, pfn_of, pte_of

import shmksm
from shmksm import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE
from shmksm._mm.frames import KSM as FRAME_KSM
from shmksm._mm.pagetable import DIRTY, KSM, PFN_MASK, PRESENT, UNMAPPED, WRITE, YOUNG, ZERO

# -- read-after-write for every alignment and length class ------------------------------------

OFFSETS = (0, 1, 7, 8, 4095)
LENGTHS = (0, 1, 8, 4095, 4096, 4097, 3 * PAGE_SIZE + 5)
REGION_PAGES = 7  # a guard page, up to 5 pages of data (4095 + 3 pages + 5 + 7), a guard page
SENTINEL = 0x5A


def _payload(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _strided(payload: bytes, dtype: type[np.generic], step: int) -> npt.NDArray[Any]:
    """The payload as every ``step``-th item of a larger array: a non-contiguous view."""
    items = np.frombuffer(payload, dtype)
    spread = np.zeros(len(items) * step, dtype)
    spread[::step] = items
    return spread[::step]


def _pad(payload: bytes, multiple: int) -> bytes:
    return payload + bytes(-len(payload) % multiple)


# Each kind turns a payload of n bytes into the object handed to write() and
# the bytes that write() must store (numpy kinds pad n to a whole item).
DATA_KINDS: dict[str, Callable[[bytes], tuple[Any, bytes]]] = {
    "bytes": lambda p: (p, p),
    "bytearray": lambda p: (bytearray(p), p),
    "memoryview": lambda p: (memoryview(p), p),
    "uint8": lambda p: (np.frombuffer(p, np.uint8).copy(), p),
    "uint64": lambda p: (np.frombuffer(_pad(p, 8), np.uint64).copy(), _pad(p, 8)),
    "uint8-strided": lambda p: (_strided(p, np.uint8, 2), p),
    "uint64-strided": lambda p: (_strided(_pad(p, 8), np.uint64, 3), _pad(p, 8)),
    "uint16-fortran": lambda p: (a := np.frombuffer(_pad(p, 4), np.uint16).reshape(2, -1).T,
                                 np.ascontiguousarray(a).tobytes()),
    "memoryview-strided": lambda p: (memoryview(_strided(p, np.uint8, 2)), p),
}


def cases(kind: str) -> list[tuple[int, int, Any, bytes]]:
    """Every (region start, address, data, expected bytes) of the matrix for one data kind."""
    out = []
    for i, (offset, length) in enumerate((o, n) for o in OFFSETS for n in LENGTHS):
        base = i * REGION_PAGES * PAGE_SIZE
        data, expected = DATA_KINDS[kind](_payload(i, length))
        out.append((base, base + PAGE_SIZE + offset, data, expected))
    return out


GUEST_PAGES = len(OFFSETS) * len(LENGTHS) * REGION_PAGES


def read_after_write(view: shmksm.GuestView, kind: str) -> list[str]:
    """Run the whole matrix on ``view``; return a description of every failure."""
    region = REGION_PAGES * PAGE_SIZE
    sentinel = bytes([SENTINEL]) * region
    failures = []
    for base, _, _, _ in cases(kind):
        view.write(base, sentinel)
    for base, addr, data, expected in cases(kind):
        view.write(addr, data)
        got = view.read(addr, len(expected))
        label = f"{kind} at page offset {addr % PAGE_SIZE}, {len(expected)} bytes"
        if got != expected:
            failures.append(f"{label}: read back differs")
        around = view.read(base, region)
        want = sentinel[:addr - base] + expected + sentinel[addr - base + len(expected):]
        if around != want:
            failures.append(f"{label}: bytes around the write changed")
    return failures


def image(kind: str) -> bytes:
    """The whole guest after read_after_write(view, kind)."""
    out = bytearray([SENTINEL]) * (GUEST_PAGES * PAGE_SIZE)
    for _, addr, _, expected in cases(kind):
        out[addr:addr + len(expected)] = expected
    return bytes(out)


def test_data_kinds_are_what_they_claim() -> None:
    for kind in ("uint8-strided", "uint64-strided", "uint16-fortran", "memoryview-strided"):
        data, _ = DATA_KINDS[kind](_payload(0, 100))
        assert not memoryview(data).c_contiguous, kind
    assert memoryview(DATA_KINDS["uint64"](_payload(0, 16))[0]).format != "B"


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_read_after_write_on_the_host(kind: str) -> None:
    with shmksm.Machine(frames=GUEST_PAGES + 1, ksmd=False) as machine:
        guest = machine.add_guest(pages=GUEST_PAGES)
        view = guest.view()
        assert read_after_write(view, kind) == []
        assert view.read(0, view.size) == image(kind)
        machine.check()


def test_read_after_write_in_guest_processes() -> None:
    """One guest process per data kind, all at once; the host then reads what each wrote."""
    with shmksm.Machine(frames=len(DATA_KINDS) * GUEST_PAGES + 1, ksmd=False) as machine:
        guests = {kind: machine.add_guest(pages=GUEST_PAGES) for kind in DATA_KINDS}
        workers = {kind: machine.spawn(read_after_write, guest, kind) for kind, guest in guests.items()}
        assert {kind: w.join(60) for kind, w in workers.items()} == {kind: [] for kind in DATA_KINDS}
        for kind, guest in guests.items():
            assert guest.view().read(0, guest.pages * PAGE_SIZE) == image(kind), kind
        machine.check()


def test_zero_length_access_at_the_end_of_the_guest(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=2)
    view = guest.view()
    assert view.read(view.size, 0) == b""
    assert view.read(5, 0) == b""
    view.write(view.size, b"")
    view.write(4095, np.zeros(0, np.uint64))
    assert pte_of(machine, guest, 0) == pte_of(machine, guest, 1) == 0, "an empty access faulted a page in"


def test_a_write_across_pages_in_different_states(machine: shmksm.Machine) -> None:
    """One write over an untouched page, the zero page, a private page and a KSM page."""
    a, b = machine.add_guest(pages=5), machine.add_guest(pages=1)
    va, vb = a.view(), b.view()
    same = _payload(7, PAGE_SIZE)
    va.read(PAGE_SIZE, 1)
    va.write(2 * PAGE_SIZE, b"private")
    va.write(3 * PAGE_SIZE, same)
    vb.write(0, same)
    assert merge_pages(machine, a, 3, b, 0)[0] > 0
    assert [pte_of(machine, a, p) & (PRESENT | ZERO | KSM) for p in range(5)] == [
        0, PRESENT | ZERO, PRESENT, PRESENT | KSM, 0]
    data = _payload(8, 3 * PAGE_SIZE + 200)
    va.write(100, data)
    want = bytes(100) + data + same[300:] + bytes(PAGE_SIZE)
    assert va.read(0, va.size) == want
    assert vb.read(0, PAGE_SIZE) == same
    assert all(pte_of(machine, a, p) & WRITE for p in range(4))
    machine.check()


# -- demand paging ----------------------------------------------------------------------------


def test_reading_an_untouched_page_maps_the_zero_page(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=4)
    view = guest.view()
    free = machine.free_frames()
    assert pte_of(machine, guest, 1) == 0
    assert view.read(PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    pte = pte_of(machine, guest, 1)
    assert pte & PRESENT and pte & ZERO
    assert pte & PFN_MASK == 0
    assert not pte & WRITE
    assert machine.free_frames() == free, "a read fault allocated a frame"
    assert pte_of(machine, guest, 0) == pte_of(machine, guest, 2) == 0, "a read faulted in its neighbours"


def test_the_first_write_allocates_a_frame(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=4)
    view = guest.view()
    free = machine.free_frames()
    view.read(PAGE_SIZE, 1)
    view.write(PAGE_SIZE + 10, b"x")
    pte = pte_of(machine, guest, 1)
    pfn = pte & PFN_MASK
    assert pfn != 0
    assert pte & (PRESENT | WRITE | DIRTY | YOUNG | ZERO) == PRESENT | WRITE | DIRTY | YOUNG
    assert machine.free_frames() == free - 1
    assert machine.system.frames.mapcount[pfn] == 1
    assert view.read(PAGE_SIZE, PAGE_SIZE) == bytes(10) + b"x" + bytes(PAGE_SIZE - 11)
    # A second write to the page reuses the frame.
    view.write(PAGE_SIZE, b"y" * PAGE_SIZE)
    assert pfn_of(machine, guest, 1) == pfn
    assert machine.free_frames() == free - 1
    assert not machine.system.frames.pool[0].any(), "the zero page was written"


def test_a_reused_frame_is_zeroed_before_a_partial_write(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=4)
    view = guest.view()
    view.write(0, b"\xee" * PAGE_SIZE)
    old = pfn_of(machine, guest, 0)
    view.munmap(0, PAGE_SIZE)
    machine.reclaim()
    view.write(PAGE_SIZE + 100, b"new")
    assert pfn_of(machine, guest, 1) == old, "the test wants the freed frame reused"
    assert view.read(PAGE_SIZE, PAGE_SIZE) == bytes(100) + b"new" + bytes(PAGE_SIZE - 103)


def test_a_failed_write_across_pages_leaves_no_stale_bytes() -> None:
    """Out of frames in the middle of a long write: a prefix lands, as the error says; nothing leaks."""
    with shmksm.Machine(frames=4, overcommit=True, ksmd=False) as machine:
        a = machine.add_guest(pages=3)
        va = a.view()
        va.write(0, b"\xab" * 3 * PAGE_SIZE)
        va.munmap(0, 3 * PAGE_SIZE)
        machine.reclaim()
        b = machine.add_guest(pages=8)
        vb = b.view()
        vb.write(7 * PAGE_SIZE, b"kept")
        assert machine.free_frames() == 2
        with pytest.raises(shmksm.OutOfFrames) as info:
            vb.write(100, b"\x01" * 3 * PAGE_SIZE)  # four pages, two frames
        assert info.value.written == 2 * PAGE_SIZE - 100, "the first two pages had frames"
        assert f"wrote the first {2 * PAGE_SIZE - 100} of {3 * PAGE_SIZE} bytes" in str(info.value)
        want = bytes(100) + b"\x01" * (2 * PAGE_SIZE - 100) + bytes(5 * PAGE_SIZE)
        assert vb.read(0, 7 * PAGE_SIZE) == want, "another guest's old bytes showed through"
        assert vb.read(7 * PAGE_SIZE, 4) == b"kept"
        machine.check()


# -- bad input ----------------------------------------------------------------------------------

PAGES = 4
SIZE = PAGES * PAGE_SIZE
Op = Callable[[shmksm.GuestView], object]

BAD_OPS: list[tuple[str, Op, type[Exception], type[Exception]]] = [
    ("read negative address", lambda v: v.read(-1, 1), shmksm.AddressError, IndexError),
    ("read past the end", lambda v: v.read(SIZE, 1), shmksm.AddressError, IndexError),
    ("read across the end", lambda v: v.read(SIZE - 1, 2), shmksm.AddressError, IndexError),
    ("read negative length", lambda v: v.read(0, -1), shmksm.AddressError, IndexError),
    ("read too long", lambda v: v.read(0, SIZE + 1), shmksm.AddressError, IndexError),
    ("read huge address", lambda v: v.read(1 << 70, 1), shmksm.AddressError, IndexError),
    ("read float address", lambda v: v.read(1.0, 1), shmksm.AddressError, IndexError),
    ("read str address", lambda v: v.read("0", 1), shmksm.AddressError, IndexError),
    ("read None address", lambda v: v.read(None, 1), shmksm.AddressError, IndexError),
    ("read bool address", lambda v: v.read(True, 1), shmksm.AddressError, IndexError),
    ("read float length", lambda v: v.read(0, 2.0), shmksm.AddressError, IndexError),
    ("write negative address", lambda v: v.write(-1, b"x"), shmksm.AddressError, IndexError),
    ("write past the end", lambda v: v.write(SIZE, b"x"), shmksm.AddressError, IndexError),
    ("write across the end", lambda v: v.write(SIZE - 1, b"xy"), shmksm.AddressError, IndexError),
    ("write far across the end", lambda v: v.write(PAGE_SIZE, bytes(SIZE)), shmksm.AddressError, IndexError),
    ("write float address", lambda v: v.write(1.5, b"x"), shmksm.AddressError, IndexError),
    ("write numpy float address", lambda v: v.write(np.float64(0), b"x"), shmksm.AddressError, IndexError),
    ("write str address", lambda v: v.write("0", b"x"), shmksm.AddressError, IndexError),
    ("write str data", lambda v: v.write(0, "text"), shmksm.DataTypeError, TypeError),
    ("write int data", lambda v: v.write(0, 5), shmksm.DataTypeError, TypeError),
    ("write list data", lambda v: v.write(0, [1, 2, 3]), shmksm.DataTypeError, TypeError),
    ("write None data", lambda v: v.write(0, None), shmksm.DataTypeError, TypeError),
    ("madvise unaligned", lambda v: v.madvise(1, PAGE_SIZE, MADV_MERGEABLE), shmksm.UsageError, ValueError),
    ("madvise negative length", lambda v: v.madvise(0, -1, MADV_MERGEABLE), shmksm.UsageError, ValueError),
    ("madvise past the end", lambda v: v.madvise(0, SIZE + 1, MADV_MERGEABLE), shmksm.AddressError, IndexError),
    ("madvise negative address", lambda v: v.madvise(-PAGE_SIZE, PAGE_SIZE, MADV_MERGEABLE), shmksm.AddressError,
     IndexError),
    ("madvise beyond the end", lambda v: v.madvise(SIZE, PAGE_SIZE, MADV_UNMERGEABLE), shmksm.AddressError,
     IndexError),
    ("madvise unknown advice", lambda v: v.madvise(0, PAGE_SIZE, 99), shmksm.UsageError, ValueError),
    ("madvise advice by name", lambda v: v.madvise(0, PAGE_SIZE, "MADV_MERGEABLE"), shmksm.UsageError, ValueError),
    ("madvise float length", lambda v: v.madvise(0, 4096.0, MADV_MERGEABLE), shmksm.AddressError, IndexError),
    ("munmap unaligned", lambda v: v.munmap(PAGE_SIZE + 8, PAGE_SIZE), shmksm.UsageError, ValueError),
    ("munmap negative length", lambda v: v.munmap(0, -PAGE_SIZE), shmksm.UsageError, ValueError),
    ("munmap past the end", lambda v: v.munmap(PAGE_SIZE, SIZE), shmksm.AddressError, IndexError),
]


@pytest.mark.parametrize(("op", "error", "builtin"), [case[1:] for case in BAD_OPS],
                         ids=[case[0] for case in BAD_OPS])
def test_bad_input_is_refused_and_changes_nothing(machine: shmksm.Machine, op: Op, error: type[Exception],
                                                   builtin: type[Exception]) -> None:
    guest = machine.add_guest(pages=PAGES)
    view = guest.view()
    before = _payload(3, SIZE)
    view.write(0, before)
    view.madvise(PAGE_SIZE, PAGE_SIZE, MADV_MERGEABLE)
    table = machine.system.table(guest.id)
    ptes = table.ptes.copy()
    with pytest.raises(error) as info:
        op(view)
    assert isinstance(info.value, builtin)
    assert isinstance(info.value, shmksm.ShmksmError)
    assert (table.ptes == ptes).all(), "a refused call changed a PTE"
    assert view.read(0, SIZE) == before
    assert table.stored_ranges() == [(1, 2)]


@pytest.mark.parametrize("pages", [0, -1, 1.5, True, "4", None])
def test_bad_guest_sizes(machine: shmksm.Machine, pages: Any) -> None:
    with pytest.raises(shmksm.UsageError) as info:
        machine.add_guest(pages=pages)
    assert isinstance(info.value, ValueError)
    assert machine.guests() == []


def _fail_with_address_error(view: shmksm.GuestView) -> None:
    view.write(view.size, b"x")


def test_an_error_in_a_guest_process_reaches_the_host(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=1)
    worker = machine.spawn(_fail_with_address_error, guest)
    with pytest.raises(shmksm.ProcessDied, match="AddressError"):
        worker.join(30)
    assert guest.alive, "a worker that raised is not a death: its guest lives on"
    assert machine.deaths == []


# -- munmap -----------------------------------------------------------------------------------


def test_munmap_faults_later_access_and_frees_frames(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=6)
    view = guest.view()
    data = _payload(4, 6 * PAGE_SIZE)
    view.write(0, data)
    free = machine.free_frames()
    view.munmap(PAGE_SIZE, 2 * PAGE_SIZE - 1)  # rounds up to two pages
    assert pte_of(machine, guest, 1) == pte_of(machine, guest, 2) == UNMAPPED
    for access in (lambda: view.read(PAGE_SIZE, 1), lambda: view.read(2 * PAGE_SIZE + 4095, 1),
                   lambda: view.write(PAGE_SIZE, b"x"), lambda: view.write(2 * PAGE_SIZE, bytes(PAGE_SIZE))):
        with pytest.raises(shmksm.SegmentationFault) as info:
            access()
        assert isinstance(info.value, IndexError)
    # An access that touches an unmapped page faults before it copies a byte.
    with pytest.raises(shmksm.SegmentationFault):
        view.write(PAGE_SIZE - 10, b"z" * 20)
    with pytest.raises(shmksm.SegmentationFault):
        view.read(0, 2 * PAGE_SIZE)
    assert view.read(0, PAGE_SIZE) == data[:PAGE_SIZE]
    assert view.read(3 * PAGE_SIZE, 3 * PAGE_SIZE) == data[3 * PAGE_SIZE:]
    # The frames wait for reclamation, then they are free.
    assert machine.free_frames() == free
    assert machine.system.get("wait_count") == 2
    machine.check()
    assert machine.reclaim() == 2
    assert machine.free_frames() == free + 2
    machine.check()


def test_munmap_of_a_shared_page_drops_one_mapping(machine: shmksm.Machine) -> None:
    a, b = machine.add_guest(pages=2), machine.add_guest(pages=2)
    same = _payload(5, PAGE_SIZE)
    a.view().write(0, same)
    b.view().write(PAGE_SIZE, same)
    kpfn, _ = merge_pages(machine, a, 0, b, 1)
    assert machine.system.frames.mapcount[kpfn] == 2
    a.view().munmap(0, PAGE_SIZE)
    assert machine.system.frames.mapcount[kpfn] == 1
    assert b.view().read(PAGE_SIZE, PAGE_SIZE) == same
    b.view().munmap(0, 2 * PAGE_SIZE)
    machine.reclaim()
    assert machine.free_frames() == machine.frames - 1
    machine.check()


# -- madvise and prctl --------------------------------------------------------------------------


def test_madvise_records_mergeable_ranges(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=16)
    view = guest.view()
    table = machine.system.table(guest.id)
    assert table.stored_ranges() == []
    view.madvise(0, 4 * PAGE_SIZE, MADV_MERGEABLE)
    view.madvise(4 * PAGE_SIZE, 2 * PAGE_SIZE, MADV_MERGEABLE)
    view.madvise(10 * PAGE_SIZE, 1, MADV_MERGEABLE)  # the length rounds up to a page
    assert table.stored_ranges() == [(0, 6), (10, 11)]
    view.madvise(2 * PAGE_SIZE, PAGE_SIZE, MADV_UNMERGEABLE)
    assert table.stored_ranges() == [(0, 2), (3, 6), (10, 11)]
    view.madvise(0, 0, MADV_UNMERGEABLE)
    assert table.stored_ranges() == [(0, 2), (3, 6), (10, 11)]
    view.munmap(4 * PAGE_SIZE, 8 * PAGE_SIZE)
    assert table.stored_ranges() == [(0, 2), (3, 4)]
    assert table.mergeable_ranges() == table.stored_ranges()
    assert guest.ksm_stat()["ksm_mergeable"] == 1
    view.madvise(0, 16 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert table.stored_ranges() == []
    assert guest.ksm_stat()["ksm_mergeable"] == 0


def test_madvise_unmergeable_breaks_sharing_in_its_range_only(machine: shmksm.Machine) -> None:
    a, b = machine.add_guest(pages=4), machine.add_guest(pages=4)
    va, vb = a.view(), b.view()
    same = _payload(6, PAGE_SIZE)
    for page in range(4):
        va.write(page * PAGE_SIZE, same)
        vb.write(page * PAGE_SIZE, same)
    va.madvise(0, 4 * PAGE_SIZE, MADV_MERGEABLE)
    for page in range(4):
        assert merge_pages(machine, a, page, b, page)[0] > 0
    assert all(pte_of(machine, a, p) & KSM for p in range(4))
    va.madvise(PAGE_SIZE, 2 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert [bool(pte_of(machine, a, p) & KSM) for p in range(4)] == [True, False, False, True]
    assert [bool(pte_of(machine, b, p) & KSM) for p in range(4)] == [True] * 4
    assert pte_of(machine, a, 1) & (WRITE | KSM) == WRITE
    assert va.read(0, 4 * PAGE_SIZE) == same * 4
    assert vb.read(0, 4 * PAGE_SIZE) == same * 4
    machine.check()


def test_set_memory_merge(machine: shmksm.Machine) -> None:
    a, b = machine.add_guest(pages=4), machine.add_guest(pages=4)
    va, vb = a.view(), b.view()
    table = machine.system.table(a.id)
    va.madvise(0, PAGE_SIZE, MADV_MERGEABLE)
    assert not va.merge_any
    va.set_memory_merge(True)
    assert va.merge_any
    assert a.ksm_stat()["ksm_merge_any"] == 1
    assert table.mergeable_ranges() == [(0, 4)]
    assert table.stored_ranges() == [(0, 1)]
    same = _payload(9, PAGE_SIZE)
    va.write(2 * PAGE_SIZE, same)
    vb.write(0, same)
    assert merge_pages(machine, a, 2, b, 0)[0] > 0
    va.set_memory_merge(False)
    assert not va.merge_any
    assert a.ksm_stat()["ksm_merge_any"] == 0
    assert table.mergeable_ranges() == table.stored_ranges() == []
    assert not pte_of(machine, a, 2) & KSM, "PR_SET_MEMORY_MERGE 0 did not unmerge"
    assert pte_of(machine, b, 0) & KSM
    assert va.read(2 * PAGE_SIZE, PAGE_SIZE) == same
    frames = machine.system.frames
    assert frames.flags[pfn_of(machine, b, 0)] & FRAME_KSM
    machine.check()
