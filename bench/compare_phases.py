#!/usr/bin/env python3
"""Scripted phases on the kernel's KSM and on shmksm, the counters side by side after every phase.

Each scenario (shmksm.tool.phases.SCENARIOS) is a list of phases: processes
write new contents, ksmd runs N full scans and is stopped (or run=2
unmerges), and pages_shared, pages_sharing, pages_unshared, pages_volatile,
pages_skipped and full_scans are read.  The kernel side runs one child
process per guest (mmap, MADV_MERGEABLE, MADV_NOHUGEPAGE), each writing its
own memory when told; it needs root and a writable /sys/kernel/mm/ksm, and
restores the knobs and unmerges everything (run=2) at the end.  The kernel
runs ``--runs`` times: where its outcome varies, shmksm's must be one of its
outcomes.  Exit 1 if a counter differs.

    python bench/compare_phases.py --smart-scan 1 --smart-scan 0 --runs 3 --json phases.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from kernel_ksm import SYSFS, read_sysfs, write_sysfs

from shmksm.tool.phases import PAGES_TO_SCAN, PHASE_COUNTERS, SCENARIOS, SLEEP_MILLISECS, KnobDriven, drive, run_shmksm

KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages", "smart_scan")
PAGE = 4096


def _process(conn: Any, pages: int) -> None:
    """A kernel-side guest: private anonymous memory, mergeable, written when told."""
    mem = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem.madvise(mmap.MADV_NOHUGEPAGE)
    mem[:] = b"\1" * (pages * PAGE)
    mem.madvise(mmap.MADV_MERGEABLE)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        offset, data = msg
        mem[offset:offset + len(data)] = data
        conn.send("done")
    mem.close()


class KernelSide(KnobDriven):
    """The driver's side on the real KSM: one child process per guest."""

    def __init__(self, processes: int, pages: int | list[int]) -> None:
        ctx = mp.get_context("fork")
        self.conns, self.procs = [], []
        sizes = pages if isinstance(pages, list) else [pages] * processes
        for size in sizes:  # one after another: ksmd's list of mms in the order of madvise
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_process, args=(theirs, size), daemon=True)
            proc.start()
            assert mine.recv() == "ready"
            self.conns.append(mine)
            self.procs.append(proc)

    def write(self, proc: int, offset: int, data: bytes) -> None:
        self.conns[proc].send((offset, data))
        assert self.conns[proc].recv() == "done"

    def get(self, name: str) -> int:
        return read_sysfs(name)

    def set(self, name: str, value: int) -> None:
        write_sysfs(name, value)

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            conn.send(None)
            proc.join(5)


@contextlib.contextmanager
def kernel_knobs(smart_scan: int, pages_to_scan: int, sleep_millisecs: int) -> Iterator[None]:
    """ksmd stopped, nothing merged, the knobs set; on exit everything unmerged and the knobs restored."""
    saved = {k: read_sysfs(k) for k in KNOBS}
    write_sysfs("run", 2)  # nothing merged, no rmap item, full_scans 0
    write_sysfs("run", 0)
    try:
        for name, value in (("max_page_sharing", 256), ("use_zero_pages", 0), ("smart_scan", smart_scan),
                            ("pages_to_scan", pages_to_scan), ("sleep_millisecs", sleep_millisecs)):
            write_sysfs(name, value)
        yield
    finally:
        write_sysfs("run", 2)
        for name in ("max_page_sharing", "use_zero_pages", "smart_scan", "pages_to_scan", "sleep_millisecs"):
            with contextlib.suppress(OSError):
                write_sysfs(name, saved[name])
        write_sysfs("run", saved["run"])


def run_kernel(scenario: str, smart_scan: int, processes: int, pages: int, pages_to_scan: int = 0,
               sleep_millisecs: int = SLEEP_MILLISECS) -> list[dict[str, int]]:
    """The counters after each phase of ``scenario`` on the kernel (``pages_to_scan`` 0: the scenario's)."""
    plan = SCENARIOS[scenario]
    with kernel_knobs(smart_scan, pages_to_scan or plan.pages_to_scan or PAGES_TO_SCAN, sleep_millisecs):
        side = KernelSide(processes, pages)
        try:
            return drive(side, plan.phases, processes, pages)
        finally:
            side.close()


def _cell(values: list[int]) -> str:
    distinct = sorted(set(values))
    return "/".join(map(str, distinct))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default: all")
    ap.add_argument("--smart-scan", type=int, action="append", choices=[0, 1], help="repeatable; default: 1 and 0")
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--pages", type=int, default=128, help="pages per process")
    ap.add_argument("--runs", type=int, default=2, help="kernel runs per scenario")
    ap.add_argument("--shmksm-runs", type=int, default=1, help="shmksm runs per scenario")
    ap.add_argument("--pages-to-scan", type=int, default=0,
                    help="default: the scenario's, or one batch a full scan")
    ap.add_argument("--sleep-millisecs", type=int, default=SLEEP_MILLISECS)
    ap.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    a = ap.parse_args()
    if not os.access(SYSFS + "run", os.W_OK):
        print("compare_phases: no writable /sys/kernel/mm/ksm (needs root and CONFIG_KSM)", file=sys.stderr)
        return 3
    results, same = [], True
    for smart in a.smart_scan or [1, 0]:
        for scenario in a.scenario or list(SCENARIOS):
            t0 = time.perf_counter()
            knobs = (a.pages_to_scan, a.sleep_millisecs)
            kernel = [run_kernel(scenario, smart, a.processes, a.pages, *knobs) for _ in range(a.runs)]
            emus = [run_shmksm(scenario, smart, a.processes, a.pages, *knobs) for _ in range(a.shmksm_runs)]
            print(f"\n== {scenario}, smart_scan={smart}: {a.processes} processes x {a.pages} pages, "
                  f"pages_to_scan {a.pages_to_scan or SCENARIOS[scenario].pages_to_scan or PAGES_TO_SCAN}, "
                  f"sleep_millisecs {a.sleep_millisecs}, "
                  f"kernel {a.runs} runs, shmksm {a.shmksm_runs} ({time.perf_counter() - t0:.1f} s)")
            print(f"{'phase':<7}" + "".join(f"{c:>22}" for c in PHASE_COUNTERS))
            for i in range(len(emus[0])):
                outcomes = [run[i] for run in kernel]
                rows = [run[i] for run in emus]
                ok = all(any(all(o[c] == row[c] for c in PHASE_COUNTERS) for o in outcomes) for row in rows)
                cells = "".join(f"{_cell([o[c] for o in outcomes]) + ' | ' + _cell([r[c] for r in rows]):>22}"
                                for c in PHASE_COUNTERS)
                print(f"{i + 1:<7}{cells}{'' if ok else '   DIFFERS'}")
                same &= ok
            results.append({"scenario": scenario, "smart_scan": smart, "processes": a.processes, "pages": a.pages,
                            "pages_to_scan": a.pages_to_scan, "sleep_millisecs": a.sleep_millisecs,
                            "kernel": kernel, "shmksm": emus})
    print("\n(each cell: kernel | shmksm; outcomes of several runs joined by /; a phase is equal when each of\n"
          " shmksm's whole rows is one of the kernel's)")
    return finish(results, a.json, same, "after every phase")


def finish(results: list[dict[str, Any]], json_path: str | None, same: bool, when: str) -> int:
    """Write the results as JSON if asked, say whether every counter was the kernel's; the exit status."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    print(f"same counters as the kernel {when}" if same else "COUNTERS DIFFER from the kernel")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
