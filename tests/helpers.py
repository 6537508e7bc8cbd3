"""Helpers the tests share: /dev/shm, waiting, looking under the MMU, the selftests' machines, images and the CLI.

Fixtures live in conftest.py; a test module imports helpers from here, never from another test module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile

import shmksm
import shmksm._mm.segments
from shmksm import MADV_MERGEABLE, PAGE_SIZE
from shmksm._ksm import ksm
from shmksm._ksm.scanner import Scanner
from shmksm._mm.pagetable import KSM, PFN_MASK, PRESENT, ZERO

# -- /dev/shm, waiting, and looking under the MMU


SHM_DIR = "/dev/shm"


LEAK_PREFIXES = ("shmksm_", "sem.mp-")


def shm_entries(prefixes: tuple[str, ...] = LEAK_PREFIXES) -> set[str]:
    """The names in /dev/shm that start with one of ``prefixes``."""
    return {name for name in os.listdir(SHM_DIR) if name.startswith(prefixes)}


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` with growing delays; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _other_processes() -> set[int]:
    """Every process that is neither this one nor one of its descendants, from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    ours = {os.getpid()}
    grew = True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in ours} - ours
        ours |= more
        grew = bool(more)
    return set(parent) - ours


def held_by_others(names: set[str]) -> set[str]:
    """The entries that belong to processes outside this test run.

    Other people's machines may come and go in /dev/shm while the tests run.
    An entry is theirs if its name carries the pid of a live process outside
    this process tree, or if such a process maps it (matched by inode: a
    named semaphore is mapped under the temporary name glibc created it with).
    """
    others = _other_processes()
    inodes = {}
    for name in names:
        try:
            inodes[os.stat(os.path.join(SHM_DIR, name)).st_ino] = name
        except FileNotFoundError:
            continue
    theirs = set()
    for name in names:
        host = name[len(shmksm._mm.segments.PREFIX):].split("_", 1)[0]
        if name.startswith(shmksm._mm.segments.PREFIX) and host.isdigit() and int(host) in others:
            theirs.add(name)
    for pid in others:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].startswith(SHM_DIR) and int(fields[4]) in inodes:
                        theirs.add(inodes[int(fields[4])])
        except (OSError, ValueError):
            continue
    return theirs


def pte_of(machine: shmksm.Machine, guest: shmksm.Guest, page: int) -> int:
    """The PTE of ``page`` of ``guest``, read from the host without a lock."""
    return int(machine.system.table(guest.id).pv[page])


def pfn_of(machine: shmksm.Machine, guest: shmksm.Guest, page: int) -> int:
    """The frame that ``page`` of ``guest`` maps (0 for the zero page or an untouched page)."""
    return pte_of(machine, guest, page) & PFN_MASK


def merge_pages(machine: shmksm.Machine, a: shmksm.Guest, apage: int,
                b: shmksm.Guest, bpage: int) -> tuple[int, int]:
    """Merge two pages by hand, with the pfns their PTEs map now; return (kpfn, kgen) or (-1, -1)."""
    ta, tb = machine.system.table(a.id), machine.system.table(b.id)
    return ksm.try_to_merge_two_pages(ta, apage, pfn_of(machine, a, apage), tb, bpage, pfn_of(machine, b, bpage))


# -- machines of the kernel's KSM selftests


FAST = {"pages_to_scan": 100_000, "sleep_millisecs": 0}


@cache
def content(key: int) -> bytes:
    """Page content number ``key``: 0 is the empty page, others are pseudo-random bytes."""
    if key == 0:
        return bytes(PAGE_SIZE)
    return np.random.default_rng(key).integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()


def fill(view: shmksm.GuestView, keys: Sequence[int], merge: str = "madvise") -> int:
    """Guest workload: page i gets ``content(keys[i])``; then the pages become mergeable.

    ``merge`` is "madvise" (MADV_MERGEABLE on the range), "prctl" (the
    whole-guest merge switch) or "none".
    """
    for page, key in enumerate(keys):
        view.write(page * PAGE_SIZE, content(key))
    if merge == "madvise":
        view.madvise(0, len(keys) * PAGE_SIZE, MADV_MERGEABLE)
    elif merge == "prctl":
        view.set_memory_merge(True)
    return len(keys)


def advise(view: shmksm.GuestView, start: int, pages: int, advice: int) -> None:
    """Guest workload: madvise ``pages`` pages from page ``start``."""
    view.madvise(start * PAGE_SIZE, pages * PAGE_SIZE, advice)


def merge_switch_off(view: shmksm.GuestView) -> None:
    """Guest workload: prctl(PR_SET_MEMORY_MERGE, 0)."""
    view.set_memory_merge(False)


def poke_byte(first: int, i: int) -> bytes:
    """The byte that :func:`poke_each` writes into its ``i``-th page: never 0."""
    return bytes([1 + (first + i) % 255])


def poke_each(view: shmksm.GuestView, start: int, pages: int, first: int) -> None:
    """Guest workload: write ``poke_byte(first, i)`` at the start of page ``start + i``."""
    for i in range(pages):
        view.write((start + i) * PAGE_SIZE, poke_byte(first, i))


def selftest_expectation(n: int, m: int) -> tuple[int, int]:
    """(pages_shared, pages_sharing) for ``n`` identical pages, max_page_sharing ``m`` (ksm_tests.c)."""
    if n % m in (0, 1):
        shared = n // m
        return shared, shared * (m - 1)
    shared = n // m + 1
    return shared, n - shared


def distinct_frames(machine: shmksm.Machine, guests: Sequence[shmksm.Guest]) -> None:
    """Assert that no two present, non-zero-page pages of ``guests`` map one frame, and none is KSM."""
    pfns = []
    for g in guests:
        ptes = machine.system.table(g.id).ptes.copy()
        present = (ptes & np.uint64(PRESENT | ZERO)) == np.uint64(PRESENT)
        assert not ((ptes[present] & np.uint64(KSM)) != 0).any(), f"guest {g.id} still maps a KSM page"
        pfns.append((ptes[present] & np.uint64(PFN_MASK)).astype(np.int64))
    every = np.concatenate(pfns)
    values, counts = np.unique(every, return_counts=True)
    assert (counts == 1).all(), f"frames mapped more than once: {values[counts > 1][:10].tolist()}"


def ksm_mappings(machine: shmksm.Machine) -> tuple[int, int]:
    """(distinct KSM pages mapped, PTEs that map a KSM page), zero page excluded, over every guest."""
    kpfns = []
    for gid in machine.system.live_guests():
        ptes = machine.system.table(gid).ptes.copy()
        ksm = (ptes & np.uint64(PRESENT | KSM | ZERO)) == np.uint64(PRESENT | KSM)
        kpfns.append(ptes[ksm] & np.uint64(PFN_MASK))
    every = np.concatenate(kpfns) if kpfns else np.zeros(0, np.uint64)
    return len(np.unique(every)), len(every)


def ideal(keys: Sequence[int], max_page_sharing: int) -> tuple[int, int]:
    """(pages_shared, pages_sharing) that merging pages of these contents reaches (ksm_tests.c's count)."""
    shared = sharing = 0
    for count in Counter(keys).values():
        s, g = selftest_expectation(count, max_page_sharing)
        shared += s
        sharing += g
    return shared, sharing


def assert_data(guest: shmksm.Guest, keys: Sequence[int]) -> None:
    """Assert that page i of ``guest`` holds ``content(keys[i])``."""
    view = guest.view()
    for page, key in enumerate(keys):
        assert view.read(page * PAGE_SIZE, PAGE_SIZE) == content(key), f"guest {guest.id} page {page} changed"


def start_ksmd(machine: shmksm.Machine) -> None:
    """Start ksmd and wait until its scanner is set up.

    ksmd takes the guests that are mergeable when it is set up as its first
    full scan (see test_scanner.py's test of that), so the tests that count
    full scans start it once their guests are ready.
    """
    ksmd = machine.start_ksmd()
    wait_until(lambda: machine.system.get("scanner_pid") == ksmd.pid, 30, "ksmd to start")


def pause(machine: shmksm.Machine) -> None:
    """Stop ksmd between two full scans; :func:`resume` starts it again.

    ksmd ends a full scan, then sleeps; run=0, written while it sleeps, is
    what it finds when it wakes.  What the test does until it resumes happens
    with no batch in flight (see test_scanner.py for what a batch in flight
    does with a range made unmergeable under it), and the counters stay as
    that full scan left them.
    """
    machine.ksm.sleep_millisecs = 300
    machine.wait_full_scans(1)
    machine.ksm.run = 0


def resume(machine: shmksm.Machine, scans: int = 1) -> None:
    """Run ksmd again with sleep_millisecs 0; return after ``scans`` more full scans."""
    machine.ksm.sleep_millisecs = 0
    machine.ksm.run = 1
    machine.wait_full_scans(scans)


def full_scans(scanner: Scanner, n: int) -> None:
    """Run ``n`` full scans (fewer if no guest has anything to scan)."""
    for _ in range(n):
        before = scanner.full_scans
        for _ in range(10):
            scanner.do_scan(10_000)
            if scanner.full_scans > before:
                break


def merged_machine(keys_per_guest: Sequence[Sequence[int]], merge: str = "madvise",
                   **knobs: int) -> tuple[shmksm.Machine, list[shmksm.Guest]]:
    """A running machine whose guests wrote ``keys_per_guest`` and that ksmd scanned twice."""
    total = sum(len(k) for k in keys_per_guest)
    machine = shmksm.Machine(frames=2 * total + 64, ksmd=False, **{**FAST, **knobs})
    try:
        guests = [machine.add_guest(pages=len(keys)) for keys in keys_per_guest]
        workers = [machine.spawn(fill, g, list(keys), merge) for g, keys in zip(guests, keys_per_guest, strict=True)]
        for w in workers:
            w.join(30)
        start_ksmd(machine)
        machine.ksm.run = 1
        machine.wait_full_scans(2)
    except BaseException:
        machine.close()
        raise
    return machine, guests


# -- memory images and the command line as a user runs it


ZERO_PAGE = bytes(PAGE_SIZE)


ET_EXEC, ET_CORE = 2, 4


PT_LOAD, PT_NOTE = 1, 4


EM_X86_64, EM_386 = 62, 3


def run_cli(*args: object, timeout: float = 120, cwd: str | os.PathLike[str] | None = None,
            module: str = "shmksm.cli") -> subprocess.CompletedProcess[str]:
    """``python -m shmksm.cli ARGS`` (or ``-m module``) as a real process: its real exit code, stdout and stderr.

    A run that outlives ``timeout`` gets SIGTERM (the host then closes its
    machine), SIGKILL 10 s later, and fails the test.
    """
    cmd = [sys.executable, "-m", module, *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"shmksm {' '.join(map(str, args))} still ran after {timeout} s; stderr:\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    """The command failed as the CLI promises.

    Exit ``code``, no traceback, and a last line "Error: ..." with ``fragment``.
    """
    shown = f"exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, shown
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, f"nothing on stderr; {shown}"
    assert lines[-1].startswith("Error: "), shown
    assert [line for line in lines if line.startswith("Error")] == lines[-1:], shown
    assert fragment in lines[-1], shown
    assert proc.returncode == code, shown


def run_json(*args: object, timeout: float = 120) -> dict[str, object]:
    """Run a command that writes JSON to stdout (``--json -``); its exit code must be 0."""
    proc = run_cli(*args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad4(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad4(name + b"\0") + pad4(desc)


def build_core(path: str | os.PathLike[str], segments: Sequence[bytes], *, elfclass: int = 64,
               e_type: int = ET_CORE, note: bool = True, empty_load: bool = True,
               align: int = PAGE_SIZE) -> list[tuple[int, int]]:
    """Write an ELF core file whose PT_LOAD segments hold ``segments``; return their (file offset, bytes).

    Like gcore's: a PT_NOTE first (an NT_PRSTATUS-like note), the PT_LOAD
    segments with data, and (``empty_load``) a PT_LOAD with no bytes in the
    file (p_filesz 0, a region gcore could not read), which is no memory.
    Segment data starts at multiples of ``align`` in the file.
    """
    if elfclass == 64:
        ehdr_fmt, phdr_fmt, machine = "<HHIQQQIHHHHHH", "<IIQQQQQQ", EM_X86_64
    else:
        ehdr_fmt, phdr_fmt, machine = "<HHIIIIIHHHHHH", "<IIIIIIII", EM_386
    ehsize = 16 + struct.calcsize(ehdr_fmt)
    phentsize = struct.calcsize(phdr_fmt)
    note_data = _note(b"CORE", 1, bytes(range(64)) * 5) if note else b""
    phnum = len(segments) + int(note) + int(empty_load)
    offset = ehsize + phnum * phentsize
    # (p_type, offset, vaddr, filesz, memsz)
    headers: list[tuple[int, int, int, int, int]] = []
    if note:
        headers.append((PT_NOTE, offset, 0, len(note_data), 0))
        offset += len(note_data)
    layout = []
    vaddr = 0x400000
    for data in segments:
        offset += -offset % align
        headers.append((PT_LOAD, offset, vaddr, len(data), len(data)))
        layout.append((offset, len(data)))
        offset += len(data)
        vaddr += 0x100000
    if empty_load:
        headers.append((PT_LOAD, offset, vaddr, 0, 2 * PAGE_SIZE))
    ident = b"\x7fELF" + bytes([1 if elfclass == 32 else 2, 1, 1, 0]) + bytes(8)
    out = bytearray(ident + struct.pack(ehdr_fmt, e_type, machine, 1, 0, ehsize, 0, 0, ehsize, phentsize, phnum,
                                        0, 0, 0))
    for p_type, off, va, filesz, memsz in headers:
        flags = 4 if p_type == PT_NOTE else 6
        if elfclass == 64:
            out += struct.pack(phdr_fmt, p_type, flags, off, va, 0, filesz, memsz, 1 if p_type == PT_NOTE else align)
        else:
            out += struct.pack(phdr_fmt, p_type, off, va, 0, filesz, memsz, flags, 1 if p_type == PT_NOTE else align)
    out += note_data
    for (off, _), data in zip(layout, segments, strict=True):
        out += bytes(off - len(out))
        out += data
    Path(path).write_bytes(bytes(out))
    return layout


def page(key: int) -> bytes:
    """Page content number ``key``: 0 is the empty page, the others pseudo-random."""
    if key == 0:
        return ZERO_PAGE
    return np.random.default_rng([7, key]).integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()


def pages_of(keys: Iterable[int]) -> bytes:
    return b"".join(page(k) for k in keys)


def memory_pages(path: str | os.PathLike[str], format: str = "auto") -> list[bytes]:
    """The pages of guest memory of an image, read independently of shmksm: raw, or a core via pyelftools."""
    data = Path(path).read_bytes()
    if format == "raw" or not data.startswith(b"\x7fELF"):
        return [data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
    pages = []
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if format == "auto" and elf.header["e_type"] != "ET_CORE":
            return [data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]:
                mem = seg.data()
                mem += bytes(-len(mem) % PAGE_SIZE)
                pages += [mem[i:i + PAGE_SIZE] for i in range(0, len(mem), PAGE_SIZE)]
    return pages


def brute_force_ideal(paths: Sequence[str | os.PathLike[str]], max_page_sharing: int = 256,
                      format: str = "auto") -> dict[str, int]:
    """What KSM converges to on ``paths``, by SHA-256 over every page.

    A content of n > 1 pages with M = max_page_sharing takes ceil(n/M) KSM
    pages, one fewer if n % M == 1 (the last copy has nothing to pair with,
    the selftest's N % M == 1 rule); pages_sharing is the other copies that
    merged.  With use_zero_pages the empty pages map the zero page instead
    and leave both counts.
    """
    counts: Counter[bytes] = Counter()
    zero_digest = hashlib.sha256(ZERO_PAGE).digest()
    for path in paths:
        counts.update(hashlib.sha256(p).digest() for p in memory_pages(path, format))
    m = max_page_sharing

    def shared_sharing(n: int) -> tuple[int, int]:
        if n < 2:
            return 0, 0
        lone = 1 if n % m == 1 else 0
        shared = -(-n // m) - lone
        return shared, n - shared - lone

    shared = sharing = 0
    for n in counts.values():
        s, t = shared_sharing(n)
        shared, sharing = shared + s, sharing + t
    zshared, zsharing = shared_sharing(counts[zero_digest])
    return {"pages": sum(counts.values()), "distinct": len(counts), "zero_pages": counts[zero_digest],
            "pages_shared": shared, "pages_sharing": sharing,
            "pages_shared_zero": shared - zshared, "pages_sharing_zero": sharing - zsharing,
            "max_page_sharing": m}


def write_bad_images(outdir: Path) -> dict[str, Path]:
    """Files that are not guest memory, by what is wrong with them."""
    bad = {
        "ragged": outdir / "ragged.img", "empty": outdir / "empty.img", "garbage_elf": outdir / "garbage.core",
        "executable": outdir / "exec.elf", "no_memory": outdir / "notes.core", "truncated_core": outdir / "cut.core",
        "truncated_header": outdir / "cut-header.core", "missing": outdir / "missing.img",
    }
    bad["ragged"].write_bytes(bytes(PAGE_SIZE + 1))
    bad["empty"].write_bytes(b"")
    bad["garbage_elf"].write_bytes(b"\x7fELF" + np.random.default_rng(5).bytes(600))
    build_core(bad["executable"], [pages_of([1, 2])], e_type=ET_EXEC)
    build_core(bad["no_memory"], [], empty_load=True)
    whole = outdir / "whole.core"
    build_core(whole, [pages_of([1, 2, 3]), pages_of([4, 5, 6])])
    data = whole.read_bytes()
    bad["truncated_core"].write_bytes(data[:len(data) - PAGE_SIZE - 100])  # cut inside the last segment
    bad["truncated_header"].write_bytes(data[:40])  # cut inside the ELF header
    return bad


CHILD = """
import mmap, os, sys
PAGE = 4096
memory = mmap.mmap(-1, 2000 * PAGE)  # page-aligned, unlike a bytearray's buffer
for i in range(2000):
    # two pages in three hold one of seven contents; the others are random
    memory[i * PAGE:(i + 1) * PAGE] = bytes([i % 7 + 1]) * PAGE if i % 3 else os.urandom(PAGE)
print(os.getpid(), flush=True)
sys.stdin.read()
"""


PTRACE_REFUSED = ("ptrace: Operation not permitted", "Operation not permitted", "ptrace_scope", "Could not attach")


def gcore_dump(outdir: Path) -> Path:
    """A core file of a live Python process holding 2,000 pages, most of them duplicates; skip if gcore cannot."""
    gcore = shutil.which("gcore")
    if gcore is None:
        pytest.skip("gcore (gdb) is not installed")
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        prefix = outdir / "core"
        try:
            done = subprocess.run([gcore, "-o", str(prefix), str(pid)], check=False, capture_output=True, text=True,
                                  timeout=60)
        except subprocess.TimeoutExpired:
            pytest.skip("gcore did not finish in 60 s")
        core = Path(f"{prefix}.{pid}")
        output = done.stdout + done.stderr
        if done.returncode or not core.exists():
            if any(s in output for s in PTRACE_REFUSED):
                pytest.skip(f"gcore may not ptrace the child here: {output.strip().splitlines()[-1:]}")
            pytest.fail(f"gcore failed (exit {done.returncode}): {output[-2000:]}")
        return core
    finally:
        child.kill()
        child.communicate()  # reaps it and closes the pipes
