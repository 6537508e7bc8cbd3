"""Live processes: estimate --pid and capture read the memory of processes the test starts itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, brute_force_ideal, run_cli, run_json

from shmksm import PAGE_SIZE
from shmksm.tool.live import KERNEL_RMAP_ITEM_BYTES, ProcessError, estimate_processes, read_maps

# A process with known memory: PAGES private anonymous pages (odd pages one of
# five contents, even pages seeded random), ZEROS pages only read (they map the
# zero page), and SHARED pages of a MAP_SHARED mapping (no anonymous pages).
CHILD = """
import mmap, sys
import numpy as np
PAGE = 4096
pages, zeros, shared, seed = map(int, sys.argv[1:])
private = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
rng = np.random.default_rng(seed)
for i in range(pages):
    page = bytes([i % 10 // 2 + 1]) * PAGE if i % 2 else rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    private[i * PAGE:(i + 1) * PAGE] = page
untouched = mmap.mmap(-1, zeros * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
sum(untouched[i * PAGE] for i in range(zeros))
common = mmap.mmap(-1, shared * PAGE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
for i in range(shared):
    common[i * PAGE:(i + 1) * PAGE] = bytes([7]) * PAGE
address = np.frombuffer(private, np.uint8).ctypes.data
print(address, flush=True)
sys.stdin.read()
"""

PAGES, ZEROS, SHARED = 600, 100, 200


def expected_private(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return b"".join(bytes([i % 10 // 2 + 1]) * PAGE_SIZE if i % 2 else
                    rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes() for i in range(PAGES))


class Child:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(PAGES), str(ZEROS), str(SHARED), str(seed)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.address = int(self.proc.stdout.readline())
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.fixture(scope="module")
def children() -> Iterator[list[Child]]:
    started = [Child(1), Child(2)]
    try:
        yield started
    finally:
        for child in started:
            child.stop()


def a_gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_private_anonymous_region_is_found_in_the_maps(children: list[Child]) -> None:
    for child in children:
        region = [m for m in read_maps(child.pid) if m.start <= child.address < m.end]
        assert len(region) == 1 and region[0].anonymous_private


def test_estimate_counts_what_ksmd_would_scan_of_each_process(children: list[Child]) -> None:
    pids = [c.pid for c in children]
    got = estimate_processes(pids, 256)
    private = estimate_processes(pids, 256)["processes"]
    everything = estimate_processes(pids, 256, all_mappings=True)["processes"]
    for p, q in zip(private, everything, strict=True):
        assert p["pages"] >= PAGES
        assert p["zero_page_mappings"] >= ZEROS  # read-only pages map the zero page: not anonymous pages
        assert q["pages"] >= p["pages"] + SHARED  # the shared mapping counts only with all_mappings
        # the five contents of the odd pages, 60 copies each in each process, all merge
        assert p["ksm_merging_pages"] >= PAGES // 2
        assert p["ksm_process_profit"] == p["ksm_merging_pages"] * PAGE_SIZE - p["pages"] * KERNEL_RMAP_ITEM_BYTES
    assert got["rmap_items"] == sum(p["pages"] for p in private)
    assert got["general_profit"] == got["pages_sharing"] * PAGE_SIZE - got["rmap_items"] * KERNEL_RMAP_ITEM_BYTES
    # the saving split among the processes adds up to pages_sharing
    assert abs(sum(p["saved_pages"] for p in private) - got["pages_sharing"]) <= len(private)
    assert got["pages_sharing"] >= PAGES - 5


def test_capture_writes_the_pages_and_their_mappings_and_run_converges_to_the_estimate(
        children: list[Child], tmp_path: Path) -> None:
    pids = [c.pid for c in children]
    snap = tmp_path / "snap"
    summary = run_json("capture", *[a for p in pids for a in ("--pid", p)], "-o", snap, "--json", "-")
    mappings = json.loads((snap / "mappings.json").read_text())
    assert mappings == summary
    images = []
    for child in children:
        entry = mappings["processes"][str(child.pid)]
        image = snap / entry["image"]
        images.append(image)
        assert image.stat().st_size == entry["pages"] * PAGE_SIZE
        # the kernel may have joined the region with its anonymous neighbour into one mapping
        region = [m for m in entry["mappings"] if int(m["start"], 16) <= child.address < int(m["end"], 16)]
        assert len(region) == 1 and region[0]["pages"] >= PAGES
        data = image.read_bytes()  # the bytes the child wrote, in that mapping's part of the image
        at = data.find(expected_private(child.seed))
        first = region[0]["image_page"] * PAGE_SIZE
        assert at % PAGE_SIZE == 0 and first <= at <= first + (region[0]["pages"] - PAGES) * PAGE_SIZE
    live = run_json("estimate", *[a for p in pids for a in ("--pid", p)], "--json", "-")
    want = brute_force_ideal(images)
    assert {k: live[k] for k in want} == want  # the processes kept still: the same pages
    report = run_json("run", *[a for i in images for a in ("--image", i)], "--pages-to-scan", 2000,
                      "--sleep-millisecs", 0, "--json", "-", "--timeout", 90, timeout=120)
    ksm = report["ksm"]
    assert isinstance(ksm, dict)
    assert (ksm["pages_shared"], ksm["pages_sharing"]) == (want["pages_shared"], want["pages_sharing"])


def test_the_text_report_names_each_process(children: list[Child]) -> None:
    proc = run_cli("estimate", "--pid", children[0].pid, "--pid", children[1].pid)
    assert proc.returncode == 0, proc.stderr
    for child in children:
        assert any(line.split()[0] == str(child.pid) for line in proc.stdout.splitlines() if line.strip())
    assert "general_profit" in proc.stdout and "ksm_process_profit" in proc.stdout


def test_a_gone_process_is_a_one_line_error_unless_keep_going(children: list[Child], tmp_path: Path) -> None:
    gone = a_gone_pid()
    for command in (["estimate"], ["capture", "-o", tmp_path / "snap"]):
        proc = run_cli(*command, "--pid", children[0].pid, "--pid", gone)
        assert_one_line_error(proc, 1, f"process {gone}: no such process")
        proc = run_cli(*command, "--pid", children[0].pid, "--pid", gone, "--keep-going", "--json", "-")
        assert proc.returncode == 0, proc.stderr
        assert f"skipped: process {gone}" in proc.stderr
        result = json.loads(proc.stdout)
        assert result["errors"] == [f"process {gone}: no such process (it is gone)"]
        assert str(children[0].pid) in json.dumps(result["processes"])
    assert not (tmp_path / "snap" / f"{gone}.img").exists()
    with pytest.raises(ProcessError, match="no process could be read"):
        estimate_processes([gone], keep_going=True)


@pytest.mark.parametrize(("args", "code", "fragment"), [
    (["estimate"], 2, "give IMAGES or --pid"),
    (["estimate", "x.img", "--pid", "1"], 2, "give IMAGES or --pid"),
    (["estimate", "--pid", "0"], 2, "--pid"),
    (["estimate", "--pid", "abc"], 2, "--pid"),
    (["estimate", "--pid", "1", "--scheduler", "tcp://127.0.0.1:1"], 2, "capture them first"),
    (["capture", "-o", "/proc/no/such", "--pid", str(os.getpid())], 2, "cannot write into"),
    (["capture", "--pid", "1"], 2, "-o"),
])
def test_bad_input_is_a_one_line_error(args: list[str], code: int, fragment: str) -> None:
    assert_one_line_error(run_cli(*args), code, fragment)


def test_help_shows_an_example() -> None:
    for command in ("estimate", "capture"):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0
        assert f"shmksm {command} --pid" in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_process_of_another_user_is_a_one_line_permission_error(children: list[Child]) -> None:
    """Run as nobody, the command may not read a root process's memory: it says so, naming the process."""
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "shmksm.cli",
           "estimate", "--pid", str(children[0].pid)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert_one_line_error(proc, 1, f"process {children[0].pid}: permission denied reading its memory")
