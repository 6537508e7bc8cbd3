"""Long runs, deselected by default: ``python -m pytest -m stress`` and ``-m slow``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shmksm.tool.images import Mix, ideal, write_mix
from shmksm.tool.runner import run_images


@pytest.mark.stress
@pytest.mark.parametrize("era", ["2009", "2012", "2024", "interval"])
def test_stress_every_era(era: str) -> None:
    """Guests, ksmd and two shadows at full speed for 20 s: no mismatch, no stale read, check() passes."""
    proc = subprocess.run([sys.executable, "-m", "shmksm.cli", "stress", "--seconds", "20", "--guests", "4",
                           "--pages", "1024", "--shadows", "2", "--era", era],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "mismatched bytes per guest: [0, 0, 0, 0]; stale shadow reads: 0; check() passed" in proc.stdout


@pytest.mark.slow
def test_a_million_pages_converge_to_the_ideal(tmp_path: Path) -> None:
    """8 guests of 512 MiB (1M pages): the counters reach the ideal by full scan 2."""
    pages = 131072
    mix = Mix(common=pages // 2, zero=pages // 8, unique=pages // 4, intra=pages // 8, intra_distinct=512)
    paths = write_mix(str(tmp_path), 8, mix)
    best = ideal(paths)
    report = run_images(paths, knobs={"pages_to_scan": 20000, "sleep_millisecs": 0}, timeout=1800)
    assert (report["ksm"]["pages_shared"], report["ksm"]["pages_sharing"]) == (best.pages_shared, best.pages_sharing)
    assert report["converged"]["full_scans"] <= 3
