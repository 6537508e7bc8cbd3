"""shmksm.tool.runner.run_images: images under ksmd reach the brute-force ideal, in the kernel-side runner's report."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import wait_until

import shmksm
import shmksm.tool.runner
from shmksm import PAGE_SIZE
from shmksm.tool.runner import run_images

ZERO_PAGE = bytes(PAGE_SIZE)

# The report of the kernel-side runner (bench/kernel_ksm.py), key by key.
REALKSM_KEYS = {"source", "kernel", "images", "pages", "knobs", "ksm", "converged", "wall_seconds",
                "ksmd_cpu_seconds", "timeline"}
REALKSM_COUNTERS = {"pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned",
                    "full_scans", "stable_node_chains", "stable_node_dups", "ksm_zero_pages", "general_profit"}
REALKSM_KNOBS = {"pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages", "smart_scan"}


def random_pages(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, PAGE_SIZE), dtype=np.uint8)


def write_images(outdir: Path) -> list[str]:
    """Three images: pages common to all, zero pages, unique pages, duplicates within one image.

    Some contents have more copies than max_page_sharing allows on one KSM
    page (340 and 257 copies), one of them one more than a multiple of it.
    """
    rng = np.random.default_rng(2024)
    common = random_pages(rng, 150)
    hot, odd = random_pages(rng, 2)
    extra = {0: np.repeat(hot[None], 300, axis=0), 1: np.repeat(hot[None], 40, axis=0),
             2: np.repeat(odd[None], 257, axis=0)}
    paths = []
    for g in range(3):
        distinct = random_pages(rng, 5)
        intra = np.repeat(distinct, [2, 3, 5, 20, 40], axis=0)
        pages = np.concatenate([common, np.zeros((64, PAGE_SIZE), np.uint8), random_pages(rng, 100), intra, extra[g]])
        pages = pages[rng.permutation(len(pages))]
        path = outdir / f"guest{g}.img"
        pages.tofile(path)
        paths.append(str(path))
    return paths


def ideal_counts(paths: list[str], max_page_sharing: int, use_zero_pages: int) -> dict[str, int]:
    """pages_shared, pages_sharing and ksm_zero_pages of an ideal merger, by brute force over the pages.

    A content of n pages needs n // M KSM pages, plus one for a remainder of
    two or more pages; a remainder of one page has nothing to pair with
    (ksm_tests.c).  With use_zero_pages every empty page maps the zero page.
    """
    counts: Counter[bytes] = Counter()
    for path in paths:
        data = Path(path).read_bytes()
        counts.update(data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE))
    zero = counts.pop(ZERO_PAGE, 0) if use_zero_pages else 0
    m = max_page_sharing
    shared = sharing = 0
    for n in counts.values():
        if n % m in (0, 1):
            shared += n // m
            sharing += n // m * (m - 1)
        else:
            shared += n // m + 1
            sharing += n - (n // m + 1)
    return {"pages_shared": shared, "pages_sharing": sharing, "ksm_zero_pages": zero}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_images(tmp_path_factory.mktemp("images"))


def test_the_ideal_of_the_images(images: list[str]) -> None:
    """The brute-force count, checked by hand for these images."""
    # 150 common pages x 3 copies, 15 intra contents (2, 3, 5, 20, 40 copies), 340 "hot", 257 "odd", 192 zero.
    assert ideal_counts(images, 256, 0) == {
        "pages_shared": 150 + 15 + 2 + 1 + 1,
        "pages_sharing": 300 + 3 * (1 + 2 + 4 + 19 + 39) + 338 + 255 + 191,
        "ksm_zero_pages": 0,
    }
    assert ideal_counts(images, 256, 1) == {
        "pages_shared": 150 + 15 + 2 + 1,
        "pages_sharing": 300 + 3 * (1 + 2 + 4 + 19 + 39) + 338 + 255,
        "ksm_zero_pages": 192,
    }
    assert ideal_counts(images, 8, 0)["pages_shared"] == 150 + 3 * (1 + 1 + 1 + 3 + 5) + 43 + 32 + 24


@pytest.mark.parametrize(("max_page_sharing", "use_zero_pages"), [(256, 0), (256, 1), (8, 0), (8, 1)])
def test_run_images_reaches_the_ideal(images: list[str], max_page_sharing: int, use_zero_pages: int) -> None:
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 0, "max_page_sharing": max_page_sharing,
             "use_zero_pages": use_zero_pages}
    report = run_images(images, knobs=knobs, timeout=60)
    want = ideal_counts(images, max_page_sharing, use_zero_pages)
    got = {k: report["ksm"][k] for k in want}
    assert got == want
    # ksmd may run several full scans between two looks of the runner: it saw the
    # counters settle at full scan 2 or at a later look.
    assert report["converged"]["full_scans"] >= 2
    assert report["ksm"]["full_scans"] >= report["converged"]["full_scans"] + 3, "unchanged for 3 full scans"
    assert report["knobs"] == {**knobs, "smart_scan": 1}
    stats = report["ksm_stat"]
    assert sum(s["ksm_merging_pages"] for s in stats) == want["pages_shared"] + want["pages_sharing"]
    assert sum(s["ksm_zero_pages"] for s in stats) == want["ksm_zero_pages"]


class KsmdFirst(shmksm.Machine):
    """A machine whose ksmd is set up before its first guest exists, as the kernel's ksmd is.

    The scanner takes the guests that are mergeable when it is set up as its
    first full scan (see test_scanner.py): a small image loaded before that
    would join the scan only at the second.
    """

    def add_guest(self, pages: int) -> shmksm.Guest:
        ksmd = self.ksmd
        assert ksmd is not None
        wait_until(lambda: self.system.get("scanner_pid") == ksmd.pid, 30, "ksmd to start")
        return super().add_guest(pages)


def test_the_counters_settle_at_the_second_full_scan(images: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """With a sleep between batches the runner sees every full scan end: it converged at the second."""
    monkeypatch.setattr(shmksm.tool.runner, "Machine", KsmdFirst)
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 50}
    report = run_images(images, knobs=knobs, timeout=60)
    assert {k: report["ksm"][k] for k in ("pages_shared", "pages_sharing")} == {
        k: v for k, v in ideal_counts(images, 256, 0).items() if k != "ksm_zero_pages"}
    assert report["converged"]["full_scans"] == 2, report["timeline"]
    first_merge = next(e for e in report["timeline"] if e["pages_shared"])
    assert first_merge["full_scans"] >= 1, "nothing merges before the first full scan is over"


def test_the_report_has_the_kernel_runners_keys(images: list[str]) -> None:
    report = run_images(images, knobs={"pages_to_scan": 1000, "sleep_millisecs": 0}, timeout=60)
    assert set(report) >= REALKSM_KEYS
    assert set(report["ksm"]) == REALKSM_COUNTERS
    assert set(report["knobs"]) == REALKSM_KNOBS
    assert set(report["converged"]) == {"seconds", "full_scans", "ksmd_cpu_seconds"}
    assert report["source"] == "shmksm"
    assert report["images"] == images
    assert report["pages"] == sum(Path(p).stat().st_size for p in images) // PAGE_SIZE
    assert report["wall_seconds"] >= report["converged"]["seconds"] >= 0
    assert report["ksmd_cpu_seconds"] >= report["converged"]["ksmd_cpu_seconds"] >= 0
    timeline = report["timeline"]
    assert timeline and all(set(entry) == {"t", *REALKSM_COUNTERS} for entry in timeline)
    assert [e["t"] for e in timeline] == sorted(e["t"] for e in timeline)
    # ksmd may finish a batch after the last look: only the settled counters must agree.
    settled = ("pages_shared", "pages_sharing", "ksm_zero_pages", "stable_node_chains", "stable_node_dups")
    assert {k: timeline[-1][k] for k in settled} == {k: report["ksm"][k] for k in settled}
    assert json.loads(json.dumps(report)) == report, "the report is plain JSON"


def test_before_start_is_called_once_the_images_are_loaded_and_before_ksmd_runs(
        images: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    machines: list[shmksm.Machine] = []

    class Kept(shmksm.Machine):
        def add_guest(self, pages: int) -> shmksm.Guest:
            machines.append(self)
            return super().add_guest(pages)

    monkeypatch.setattr(shmksm.tool.runner, "Machine", Kept)
    seen: list[tuple[int, int, int]] = []

    def before_start() -> None:
        machine = machines[0]
        seen.append((machine.ksm.run, machine.ksm.pages_scanned, len(machine.guests())))

    report = run_images(images, knobs={"pages_to_scan": 1000, "sleep_millisecs": 0}, timeout=60,
                        before_start=before_start)
    assert seen == [(0, 0, len(images))]
    assert report["ksm"]["pages_sharing"] > 0


def test_bad_images_are_usage_errors(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.img"
    ragged.write_bytes(bytes(PAGE_SIZE + 1))
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    for paths in ([], [str(ragged)], [str(empty)], [str(tmp_path / "missing.img")]):
        with pytest.raises(shmksm.UsageError):
            run_images(paths, knobs={"sleep_millisecs": 0})
