"""Memory images: ELF core files (synthetic ones built here, and a real ``gcore`` dump) and the ideal count.

The helpers :func:`build_core`, :func:`brute_force_ideal`, :func:`gcore_dump`
and :func:`run_cli` serve test_cli.py and test_fleet.py too.
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
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile

from shmksm import PAGE_SIZE
from shmksm.tool.images import ImageError, ideal, image_layout, image_pages, iter_chunks

ZERO_PAGE = bytes(PAGE_SIZE)

ET_EXEC, ET_CORE = 2, 4
PT_LOAD, PT_NOTE = 1, 4
EM_X86_64, EM_386 = 62, 3


# -- running the command line as a real process ---------------------------------------------------


def run_cli(*args: object, timeout: float = 120, cwd: str | os.PathLike[str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    """``python -m shmksm.cli ARGS`` as a real process: its real exit code, stdout and stderr.

    A run that outlives ``timeout`` gets SIGTERM (the host then closes its
    machine), SIGKILL 10 s later, and fails the test.
    """
    cmd = [sys.executable, "-m", "shmksm.cli", *map(str, args)]
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


# -- ELF core files -------------------------------------------------------------------------------


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


# -- the ideal, counted independently of shmksm.tool.images ----------------------------------------------


def memory_pages(path: str | os.PathLike[str]) -> list[bytes]:
    """The pages of guest memory of an image, read independently of shmksm: raw, or via pyelftools."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x7fELF"):
        return [data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
    pages = []
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]:
                mem = seg.data()
                mem += bytes(-len(mem) % PAGE_SIZE)
                pages += [mem[i:i + PAGE_SIZE] for i in range(0, len(mem), PAGE_SIZE)]
    return pages


def brute_force_ideal(paths: Sequence[str | os.PathLike[str]], max_page_sharing: int = 256) -> dict[str, int]:
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
        counts.update(hashlib.sha256(p).digest() for p in memory_pages(path))
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


def test_the_brute_force_count_by_hand(tmp_path: Path) -> None:
    """The independent count itself, on contents whose answer is known by hand."""
    image = tmp_path / "hand.img"
    # content 1: 10 copies, 2: 9 copies (9 % 4 == 1), 3: 1 copy, zero: 6 copies; M = 4
    image.write_bytes(pages_of([1] * 10 + [2] * 9 + [3] + [0] * 6))
    got = brute_force_ideal([image], 4)
    # 10 -> 3 KSM pages (4 + 4 + 2), 7 sharing; 9 -> 2 KSM pages (4 + 4) and a lone page, 6 sharing;
    # 6 zero -> 2 KSM pages, 4 sharing
    assert got == {"pages": 26, "distinct": 4, "zero_pages": 6, "pages_shared": 3 + 2 + 2,
                   "pages_sharing": 7 + 6 + 4, "pages_shared_zero": 5, "pages_sharing_zero": 13,
                   "max_page_sharing": 4}
    assert ideal([str(image)], 4).as_dict() == got


# -- synthetic ELF cores --------------------------------------------------------------------------


@pytest.mark.parametrize("elfclass", [64, 32])
def test_a_synthetic_core_reads_exactly_its_load_segments(tmp_path: Path, elfclass: int) -> None:
    first = [1, 2, 0, 1]
    second = [3, 1, 3]
    core = tmp_path / "synthetic.core"
    layout = build_core(core, [pages_of(first), pages_of(second)], elfclass=elfclass)
    with open(core, "rb") as f:  # the file is what it claims to be
        elf = ELFFile(f)
        assert elf.header["e_type"] == "ET_CORE"
        assert elf.elfclass == elfclass
        assert [s["p_type"] for s in elf.iter_segments()] == ["PT_NOTE", "PT_LOAD", "PT_LOAD", "PT_LOAD"]
    assert image_layout(str(core)) == layout == [(layout[0][0], 4 * PAGE_SIZE), (layout[1][0], 3 * PAGE_SIZE)]
    assert image_pages(str(core)) == 7
    for chunk_pages in (1, 2, 4096):
        chunks = list(iter_chunks([str(core)], chunk_pages))
        assert all(c.shape[1] == PAGE_SIZE and 1 <= c.shape[0] <= chunk_pages for c in chunks)
        got = np.concatenate(chunks)
        assert got.tobytes() == pages_of(first + second), f"chunks of {chunk_pages} pages"
    want = brute_force_ideal([core])
    assert want["pages_shared"] == 2 and want["pages_sharing"] == 3 and want["zero_pages"] == 1
    assert ideal([str(core)]).as_dict() == want


def test_a_partial_last_page_of_a_segment_is_padded_with_zeros(tmp_path: Path) -> None:
    core = tmp_path / "partial.core"
    tail = page(5)[:100]
    build_core(core, [page(4) + tail, page(4)], align=8)  # unaligned segments are fine too
    assert image_pages(str(core)) == 3
    got = np.concatenate(list(iter_chunks([str(core)]))).tobytes()
    assert got == page(4) + tail + bytes(PAGE_SIZE - 100) + page(4)
    assert ideal([str(core)]).as_dict() == brute_force_ideal([core])


def test_raw_images_and_cores_count_together(tmp_path: Path) -> None:
    raw = tmp_path / "guest.img"
    raw.write_bytes(pages_of([1, 1, 0, 6]))
    core = tmp_path / "guest.core"
    build_core(core, [pages_of([1, 6, 0]), pages_of([7])])
    paths = [str(raw), str(core)]
    assert [image_pages(p) for p in paths] == [4, 4]
    assert np.concatenate(list(iter_chunks(paths, 3))).tobytes() == pages_of([1, 1, 0, 6, 1, 6, 0, 7])
    assert ideal(paths, 2).as_dict() == brute_force_ideal(paths, 2)
    assert ideal(paths).as_dict() == brute_force_ideal(paths)


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


@pytest.mark.parametrize(("kind", "message"), [
    ("ragged", "not a positive multiple of 4096"),
    ("empty", "size 0"),
    ("missing", "No such file"),
    ("garbage_elf", "corrupt ELF core"),
    ("executable", "not a core dump"),
    ("no_memory", "no memory"),
    ("truncated_core", "runs past the end"),
    ("truncated_header", "corrupt ELF core"),
])
def test_bad_images_are_image_errors(tmp_path: Path, kind: str, message: str) -> None:
    path = str(write_bad_images(tmp_path)[kind])
    with pytest.raises(ImageError, match=message):
        image_layout(path)
    with pytest.raises(ImageError, match=message):
        image_pages(path)


@pytest.mark.parametrize(("kind", "message"), [
    ("ragged", "not a positive multiple of 4096"),
    ("garbage_elf", "corrupt ELF core"),
    ("truncated_core", "runs past the end"),
    ("missing", "No such file"),
])
def test_streaming_a_bad_image_is_an_image_error(tmp_path: Path, kind: str, message: str) -> None:
    path = str(write_bad_images(tmp_path)[kind])
    with pytest.raises(ImageError, match=message):
        list(iter_chunks([path]))
    with pytest.raises(ImageError, match=message):
        ideal([path])


def test_the_cli_converges_to_the_estimate_on_a_synthetic_core(tmp_path: Path) -> None:
    """run and estimate agree on an ELF core, chains of a small max_page_sharing included."""
    core = tmp_path / "dups.core"
    keys = [1] * 9 + [2] * 5 + [0] * 6 + [3, 4]
    build_core(core, [pages_of(keys[:11]), pages_of(keys[11:])])
    estimate = run_json("estimate", core, "--max-page-sharing", 4, "--json", "-")
    want = brute_force_ideal([core], 4)
    assert {k: estimate[k] for k in want} == want
    report = run_json("run", "--image", core, "--max-page-sharing", 4, "--pages-to-scan", 1000,
                      "--sleep-millisecs", 0, "--json", "-", "--timeout", 60)
    ksm = report["ksm"]
    assert isinstance(ksm, dict)
    assert report["pages"] == 22
    assert (ksm["pages_shared"], ksm["pages_sharing"], ksm["ksm_zero_pages"]) == (
        want["pages_shared"], want["pages_sharing"], 0)


# -- a real gcore dump ----------------------------------------------------------------------------

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


@pytest.fixture(scope="module")
def real_core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gcore_dump(tmp_path_factory.mktemp("gcore"))


def test_a_gcore_dump_is_an_image(real_core: Path) -> None:
    pages = image_pages(str(real_core))
    assert pages >= 2000
    with open(real_core, "rb") as f:
        assert ELFFile(f).header["e_type"] == "ET_CORE"
    want = brute_force_ideal([real_core])
    assert ideal([str(real_core)]).as_dict() == want
    assert want["pages"] == pages
    # the child's seven contents, 1,333 pages of them, are in the dump
    assert want["pages_sharing"] >= 1333 - 7


@pytest.mark.parametrize("use_zero_pages", [False, True])
def test_run_on_a_gcore_dump_converges_to_the_estimate(real_core: Path, use_zero_pages: bool) -> None:
    """The acceptance criterion: a real process's core under ksmd reaches what estimate says."""
    estimate = run_json("estimate", real_core, "--json", "-")
    args = ["run", "--image", real_core, "--pages-to-scan", 5000, "--sleep-millisecs", 0, "--json", "-",
            "--timeout", 90]
    report = run_json(*args, *(["--use-zero-pages"] if use_zero_pages else []), timeout=120)
    ksm = report["ksm"]
    assert isinstance(ksm, dict)
    assert report["pages"] == estimate["pages"]
    if use_zero_pages:
        want = (estimate["pages_shared_zero"], estimate["pages_sharing_zero"], estimate["zero_pages"])
    else:
        want = (estimate["pages_shared"], estimate["pages_sharing"], 0)
    assert (ksm["pages_shared"], ksm["pages_sharing"], ksm["ksm_zero_pages"]) == want, report["timeline"]
