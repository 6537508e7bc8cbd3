"""Memory images: ELF core files (synthetic ones built here, and a real ``gcore`` dump) and the ideal count.

The helpers :func:`build_core`, :func:`brute_force_ideal`, :func:`gcore_dump`
and :func:`run_cli` serve test_cli.py and test_fleet.py too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile
from helpers import brute_force_ideal, build_core, gcore_dump, page, pages_of, run_json, write_bad_images

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
