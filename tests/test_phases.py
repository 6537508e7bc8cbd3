"""Scripted phases against the kernel's own counters.

The tables below were measured on the real KSM of Linux 6.18 with
``python bench/compare_phases.py`` (3 processes x 128 pages; each row: the
counters after one phase — pages_shared, pages_sharing, pages_unshared,
pages_volatile, pages_skipped since the start, full_scans since the start or
since run=2).  The kernel's outcome did not vary between runs for these
scenarios.  Here the same phases run on shmksm's scanner, batch by batch in
this process (``ScannerSide``: the batches the knob-driven sides run,
without their timing).
"""

from __future__ import annotations

import pytest

from shmksm.tool.phases import PHASE_COUNTERS, SCENARIOS, run_shmksm

# (scenario, smart_scan) -> rows of PHASE_COUNTERS, as the kernel gave them.
KERNEL: dict[tuple[str, int], list[tuple[int, ...]]] = {
    ("merges", 1): [(0, 0, 0, 384, 0, 1), (64, 128, 192, 0, 0, 2), (64, 128, 192, 0, 0, 4)],
    ("cow-every-process", 1): [(128, 256, 0, 0, 0, 3), (0, 0, 0, 384, 384, 6), (0, 0, 0, 384, 1152, 9)],
    ("cow-every-process", 0): [(128, 256, 0, 0, 0, 3), (0, 0, 384, 0, 0, 6), (0, 0, 384, 0, 0, 9)],
    ("change-repeatedly", 1): [(128, 256, 0, 0, 0, 3), (128, 256, 0, 0, 0, 6), (0, 0, 0, 384, 768, 9),
                               (0, 0, 0, 384, 1536, 12), (0, 0, 0, 384, 2688, 15)],
    ("change-repeatedly", 0): [(128, 256, 0, 0, 0, 3), (128, 256, 0, 0, 0, 6), (128, 256, 0, 0, 0, 9),
                               (128, 256, 0, 0, 0, 12), (128, 256, 0, 0, 0, 15)],
    ("one-changes", 1): [(128, 256, 0, 0, 0, 3), (128, 192, 0, 64, 64, 6), (128, 192, 0, 64, 192, 9),
                         (128, 192, 0, 64, 320, 12), (128, 192, 0, 64, 448, 15), (128, 192, 0, 64, 704, 19)],
    ("unmerge", 1): [(64, 128, 192, 0, 0, 3), (0, 0, 0, 0, 0, 0), (0, 0, 0, 384, 0, 1), (64, 128, 192, 0, 0, 3)],
    ("change-midscan", 1): [(128, 256, 0, 0, 0, 3), (128, 184, 0, 72, 72, 6), (44, 44, 12, 284, 1224, 10),
                            (0, 0, 0, 384, 2488, 15), (0, 0, 0, 384, 4096, 20)],
    ("histories-midscan", 1): [(0, 0, 384, 0, 0, 3), (0, 0, 0, 384, 1152, 8), (0, 0, 0, 384, 2688, 13),
                               (0, 0, 0, 384, 4224, 18), (0, 0, 100, 284, 5760, 22), (128, 256, 0, 0, 5760, 25)],
    ("histories-midscan", 0): [(0, 0, 384, 0, 0, 3), (0, 0, 384, 0, 0, 6), (0, 0, 384, 0, 0, 9),
                               (128, 256, 0, 0, 0, 12), (128, 256, 0, 0, 0, 15), (128, 256, 0, 0, 0, 18)],
}


@pytest.mark.parametrize(("scenario", "smart_scan"), list(KERNEL))
def test_counters_after_every_phase_equal_the_kernels(scenario: str, smart_scan: int) -> None:
    rows = run_shmksm(scenario, smart_scan, processes=3, pages=128, in_process=True)
    got = [tuple(row[c] for c in PHASE_COUNTERS) for row in rows]
    want = KERNEL[(scenario, smart_scan)]
    assert len(got) == len(SCENARIOS[scenario].phases) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"phase {i + 1}: {dict(zip(PHASE_COUNTERS, g, strict=True))} where the kernel had " \
                       f"{dict(zip(PHASE_COUNTERS, w, strict=True))}"


def test_a_merged_page_does_not_age() -> None:
    """should_skip_rmap_item returns before the age moves for a KSM page: merged pages come back young.

    Pages merged for many full scans, then changed once: were their ages
    counted while they were merged, they would be skipped at once and stay
    unmerged; the kernel merges them again within three full scans.
    """
    rows = run_shmksm("change-once", 1, processes=3, pages=64, in_process=True)
    assert (rows[1]["pages_shared"], rows[1]["pages_sharing"]) == (64, 128)
    assert rows[1]["pages_skipped"] == 0
