"""Memory images: ELF core files (synthetic ones built here, and a real ``gcore`` dump) and the ideal count.

The helpers :func:`build_core`, :func:`brute_force_ideal`, :func:`gcore_dump`
and :func:`run_cli` serve test_cli.py and test_fleet.py too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile
from helpers import (
    assert_one_line_error,
    brute_force_ideal,
    build_core,
    gcore_dump,
    page,
    pages_of,
    run_cli,
    run_json,
    write_bad_images,
)

from shmksm import PAGE_SIZE
from shmksm.tool.images import ImageError, ideal, image_layout, image_pages, iter_chunks

# -- the ideal, counted independently of shmksm.tool.images (helpers.brute_force_ideal) -----------


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


@pytest.mark.parametrize(("kind", "format", "message"), [
    ("ragged", "auto", "not a positive multiple of 4096"),
    ("ragged", "raw", "not a positive multiple of 4096"),
    ("ragged", "core", "not an ELF file"),
    ("empty", "auto", "size 0"),
    ("missing", "auto", "No such file"),
    ("garbage_elf", "auto", "not a positive multiple of 4096"),
    ("garbage_elf", "core", "corrupt ELF core"),
    ("executable", "core", "not a core dump"),
    ("no_memory", "auto", "no memory"),
    ("truncated_core", "auto", "runs past the end"),
    ("truncated_header", "auto", "corrupt ELF core"),
    ("truncated_header", "raw", "not a positive multiple of 4096"),
])
def test_bad_images_are_image_errors(tmp_path: Path, kind: str, format: str, message: str) -> None:
    path = str(write_bad_images(tmp_path)[kind])
    with pytest.raises(ImageError, match=message):
        image_layout(path, format)
    with pytest.raises(ImageError, match=message):
        image_pages(path, format)


def test_an_elf_executable_of_whole_pages_is_raw_memory_unless_core_is_asked(tmp_path: Path) -> None:
    path = str(write_bad_images(tmp_path)["executable"])
    size = os.path.getsize(path)
    assert size % PAGE_SIZE == 0
    assert image_layout(path) == image_layout(path, "raw") == [(0, size)]
    with pytest.raises(ImageError, match="an ELF ET_EXEC file, not a core dump"):
        image_layout(path, "core")
    with pytest.raises(ImageError, match="must be one of auto, raw, core"):
        image_layout(path, "elf")


@pytest.mark.parametrize(("kind", "message"), [
    ("ragged", "not a positive multiple of 4096"),
    ("garbage_elf", "not a positive multiple of 4096"),
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


# -- raw memory that begins with an ELF header ----------------------------------------------------


def shared_libraries(n: int) -> list[Path]:
    """``n`` real shared libraries of this system (ELF ET_DYN files), smallest first above 16 KiB."""
    found = {}
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib"):
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                path = Path(folder, name)
                if ".so" in name and path.is_file() and not path.is_symlink() and path.stat().st_size > 16384:
                    with open(path, "rb") as f:
                        head = f.read(18)
                    if head.startswith(b"\x7fELF") and head[16] == 3:  # ET_DYN
                        found.setdefault(path.resolve(), path)
    if len(found) < n:
        pytest.skip(f"fewer than {n} shared libraries on this system")
    return sorted(found.values(), key=lambda p: (p.stat().st_size, str(p)))[:n]


def write_raw_library_image(path: Path, libraries: Sequence[Path], max_pages: int = 64) -> None:
    """A raw image of libraries as mapped: each one's first pages (the last padded with zeros), one twice."""
    out = bytearray()
    for lib in [*libraries, libraries[0]]:
        data = lib.read_bytes()[:max_pages * PAGE_SIZE]
        out += data + bytes(-len(data) % PAGE_SIZE)
    path.write_bytes(bytes(out))


@pytest.fixture
def library_image(tmp_path: Path) -> Path:
    image = tmp_path / "libraries.img"
    write_raw_library_image(image, shared_libraries(3))
    with open(image, "rb") as f:
        assert ELFFile(f).header["e_type"] == "ET_DYN"  # it begins with a real ELF header
    return image


@pytest.mark.parametrize("format", ["auto", "raw"])
def test_a_raw_image_beginning_with_an_elf_header_is_raw_memory(library_image: Path, format: str) -> None:
    pages = library_image.stat().st_size // PAGE_SIZE
    assert image_layout(str(library_image), format) == [(0, pages * PAGE_SIZE)]
    assert image_pages(str(library_image), format) == pages
    assert np.concatenate(list(iter_chunks([str(library_image)], 7, format))).tobytes() == library_image.read_bytes()
    want = brute_force_ideal([library_image], format="raw")
    assert want["pages"] == pages and want["pages_sharing"] > 0  # the library mapped twice
    assert ideal([str(library_image)], format=format).as_dict() == want


def test_format_core_refuses_a_raw_image_beginning_with_an_elf_header(library_image: Path) -> None:
    with pytest.raises(ImageError, match="an ELF ET_DYN file, not a core dump"):
        image_pages(str(library_image), "core")
    with pytest.raises(ImageError, match="not a core dump"):
        ideal([str(library_image)], format="core")


def test_format_raw_reads_a_core_file_whole(tmp_path: Path) -> None:
    core = tmp_path / "aligned.core"
    build_core(core, [pages_of([1, 2, 1])])
    size = core.stat().st_size
    assert size % PAGE_SIZE == 0
    assert image_pages(str(core)) == 3
    assert image_pages(str(core), "raw") == size // PAGE_SIZE
    assert ideal([str(core)], format="raw").as_dict() == brute_force_ideal([core], format="raw")


def test_the_cli_takes_the_format_of_a_library_image(library_image: Path) -> None:
    """estimate and run take --format auto|raw|core, and agree on a raw image of real libraries."""
    want = brute_force_ideal([library_image], 4, format="raw")
    for format in ("auto", "raw"):
        estimate = run_json("estimate", library_image, "--format", format, "--max-page-sharing", 4, "--json", "-")
        assert {k: estimate[k] for k in want} == want
    for command in (["estimate", library_image], ["run", "--image", library_image]):
        assert_one_line_error(run_cli(*command, "--format", "core"), 2, "not a core dump")
    assert_one_line_error(run_cli("estimate", library_image, "--format", "elf"), 2, "'elf' is not one of")
    report = run_json("run", "--image", library_image, "--format", "auto", "--max-page-sharing", 4,
                      "--pages-to-scan", 1000, "--sleep-millisecs", 0, "--json", "-", "--timeout", 60)
    ksm = report["ksm"]
    assert isinstance(ksm, dict)
    assert report["pages"] == want["pages"]
    assert (ksm["pages_shared"], ksm["pages_sharing"]) == (want["pages_shared"], want["pages_sharing"])


# -- a real gcore dump ----------------------------------------------------------------------------


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
