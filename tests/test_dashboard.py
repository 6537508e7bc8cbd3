"""The live dashboard, the frame map and the timeline plot: checked by what they show."""

from __future__ import annotations

import io
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, full_scans, run_cli
from rich.console import Console

import shmksm
from shmksm import MADV_MERGEABLE, PAGE_SIZE
from shmksm._ksm.scanner import Scanner
from shmksm.tool.dashboard import Dashboard, Snapshot, plain_line
from shmksm.tool.memmap import FREE, KSM_PAGE, PRIVATE, ZERO_PAGE, MapRecorder, draw_map, frame_kinds

pytest.importorskip("matplotlib")

COUNTERS = {"pages_shared": 10, "pages_sharing": 300, "pages_unshared": 5, "pages_volatile": 7,
            "ksm_zero_pages": 0, "full_scans": 3, "general_profit": 1_000_000}
STAT = {"ksm_rmap_items": 512, "ksm_merging_pages": 155, "ksm_zero_pages": 0, "ksm_process_profit": 600_000}


def snap(elapsed: float, **changes: int) -> Snapshot:
    return Snapshot(elapsed=elapsed, counters={**COUNTERS, **changes}, pages=1024, guests=[STAT, STAT],
                    shadow_faults=42, scanner_cpu_seconds=elapsed / 4)


def test_the_dashboard_shows_counters_with_their_change_saving_guests_faults_and_cpu() -> None:
    drawn = io.StringIO()
    with Dashboard("shmksm test", out=drawn, tty=True) as board:
        board.show(snap(1.0))
        console = Console(record=True, width=120, file=io.StringIO())
        console.print(board.render(snap(2.0, pages_sharing=350, pages_unshared=2)))
    text = console.export_text()
    assert "\x1b[" in drawn.getvalue()  # drawn in place on the terminal
    assert re.search(r"pages_sharing\s+350\s+\+50", text), text
    assert re.search(r"pages_unshared\s+2\s+-3", text), text
    assert "1.4 MiB of 4.0 MiB (34.2%)" in text  # (350 + 0) of 1024 pages
    guest_rows = [line for line in text.splitlines() if re.search(r"^\W*[01]\s+512\s+155\s+0\s+\+586 KiB", line)]
    assert len(guest_rows) == 2, text
    assert "shadow faults 42" in text and "ksmd CPU 0.50 s (25% of a core now)" in text


def test_not_a_terminal_gets_a_plain_line_a_second() -> None:
    out = io.StringIO()
    with Dashboard("t", out=out, tty=False) as board:
        board.show(snap(1.0))
        board.show(snap(1.1, pages_sharing=301))  # within the second: not printed
    assert out.getvalue() == plain_line(snap(1.0)) + "\n"
    assert "\x1b" not in out.getvalue()


def test_the_demo_into_a_pipe_prints_plain_lines_and_draws_the_map(tmp_path: Path) -> None:
    path = tmp_path / "memory.png"
    proc = run_cli("demo", "--guests", 2, "--memory", 2, "--seconds", 3, "--map", path, "--map-every", 1,
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout
    ticks = [line for line in proc.stdout.splitlines() if "full_scans" in line and "saved" in line]
    assert 2 <= len(ticks) <= 8, proc.stdout
    assert f"frame map         {path}, animation {tmp_path / 'memory.gif'}" in proc.stdout
    from PIL import Image

    for drawn in (path, tmp_path / "memory-0001.png", tmp_path / "memory.gif"):
        with Image.open(drawn) as image:
            assert image.size[0] > 300 and image.size[1] > 300
    with Image.open(tmp_path / "memory.gif") as gif:
        assert gif.n_frames >= 3  # a frame a second over 3 s, and the end


def test_the_frame_kinds_are_those_of_the_pool(tmp_path: Path) -> None:
    with shmksm.Machine(frames=256, ksmd=False) as machine:
        a, b = machine.add_guest(pages=8), machine.add_guest(pages=8)
        for g in (a, b):
            view = g.view()
            view.write(0, bytes([1]) * PAGE_SIZE * 3 + bytes([2]) * PAGE_SIZE)  # three alike, one not
            view.madvise(0, 4 * PAGE_SIZE, MADV_MERGEABLE)
            view.read(6 * PAGE_SIZE, 1)  # the zero page
        scanner = Scanner(machine.system)
        full_scans(scanner, 3)
        machine.reclaim()
        kinds, mapcount = frame_kinds(machine.system)
        assert kinds[0] == ZERO_PAGE
        ksm = np.flatnonzero(kinds == KSM_PAGE)
        assert sorted(mapcount[ksm].tolist()) == [2, 6]  # content 2 twice, content 1 six times
        assert np.count_nonzero(kinds == PRIVATE) == 0
        assert np.count_nonzero(kinds == FREE) == 256 - 1 - 2
        counts = draw_map(machine.system, str(tmp_path / "pool.png"), "test")
        assert counts["KSM page"] == 2 and counts["zero page"] == 1
        recorder = MapRecorder(str(tmp_path / "anim.png"), every=0.5, title="test")
        for t in (0.0, 0.2, 0.6, 1.2):
            recorder.tick(machine.system, t)
        assert [Path(p).name for p in recorder.frames] == ["anim-0001.png", "anim-0002.png", "anim-0003.png"]
        assert recorder.finish(machine.system, 1.3)["animation"] == str(tmp_path / "anim.gif")


def test_run_draws_the_map_and_refuses_map_every_without_map(tmp_path: Path) -> None:
    proc = run_cli("run", "--scenario", "one-content", "--guests", 1, "--pages-to-scan", 5000,
                   "--sleep-millisecs", 0, "--map", tmp_path / "run.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run.png").stat().st_size > 0
    assert_one_line_error(run_cli("run", "--scenario", "default", "--map-every", 1), 2, "--map-every needs --map")
    assert_one_line_error(run_cli("demo", "--map", "/nonexistent/x.png"), 2, "cannot write")


def test_the_timeline_keeps_scan_labels_apart_and_the_legend_off_the_curves() -> None:
    from shmksm.tool.plots import timeline_figure

    # 40 full scans in 2 s: a label for each would run into the next
    timeline = [{"t": i * 0.05, **COUNTERS, "full_scans": i, "pages_sharing": 10 * i} for i in range(41)]
    fig = timeline_figure({"timeline": timeline, "pages": 1024, "knobs": {"pages_to_scan": 100}})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t.get_window_extent(renderer) for t in ax.texts if t.get_gid() == "scan-label"]
    assert len(labels) >= 5
    for first, second in itertools.pairwise(labels):
        assert not first.overlaps(second)
    assert len([line for line in ax.lines if line.get_linestyle() == ":"]) == 40  # every scan keeps its line
    legend = ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer))
