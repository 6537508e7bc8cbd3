#!/usr/bin/env python3
"""The counters after full scan 1, 2, 3 ... of a ``shmksm run`` of the built-in mixes, and of the kernel's KSM.

The shmksm side is ``shmksm run`` itself (``run_images``) with
``pages_to_scan`` above the mix's pages and a long ``sleep_millisecs``: a
batch ends at the end of a full scan, so each batch is one full scan and the
run's timeline holds the counters at the end of every full scan.  The kernel
side loads the same images into child processes and runs ksmd one full scan
at a time (``shmksm.tool.phases``).  Needs root and a writable
/sys/kernel/mm/ksm; restores the knobs and unmerges everything at the end.
Exit 1 if a counter differs.

    python bench/compare_convergence.py --mix default --scans 4 --smart-scan 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
from compare_phases import KernelSide, finish, kernel_knobs

from shmksm.tool.images import MIXES, write_mix
from shmksm.tool.phases import PAGES_TO_SCAN, SLEEP_MILLISECS, Phase, drive
from shmksm.tool.runner import run_images

COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "pages_skipped", "full_scans",
            "stable_node_chains", "stable_node_dups")


def shmksm_scans(paths: list[str], scans: int, smart_scan: int) -> list[dict[str, int]]:
    """The counters at the end of each full scan, from a ``shmksm run``'s timeline."""
    report = run_images(paths, knobs={"pages_to_scan": PAGES_TO_SCAN, "sleep_millisecs": SLEEP_MILLISECS,
                                      "smart_scan": smart_scan}, max_scans=scans, stable_scans=scans + 1,
                        timeline_extra=("pages_skipped",))
    out = []
    for k in range(1, scans + 1):
        at = [row for row in report["timeline"] if row["full_scans"] == k]
        out.append({c: at[-1][c] for c in COUNTERS} if at else {})
    return out


def kernel_scans(paths: list[str], scans: int, smart_scan: int) -> list[dict[str, int]]:
    images = [np.fromfile(p, np.uint8).tobytes() for p in paths]
    pages = max(len(im) for im in images) // 4096
    with kernel_knobs(smart_scan, PAGES_TO_SCAN, SLEEP_MILLISECS):
        side = KernelSide(len(paths), [len(im) // 4096 for im in images])
        try:
            for proc, data in enumerate(images):
                side.write(proc, 0, data)
            rows = drive(side, tuple(Phase(scans=1) for _ in range(scans)), len(paths), pages,
                         counters=COUNTERS)
        finally:
            side.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", action="append", choices=sorted(MIXES), help="repeatable; default: all")
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--scans", type=int, default=3)
    ap.add_argument("--smart-scan", type=int, action="append", choices=[0, 1], help="repeatable; default: 1")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    if not os.access("/sys/kernel/mm/ksm/run", os.W_OK):
        print("compare_convergence: no writable /sys/kernel/mm/ksm (needs root and CONFIG_KSM)", file=sys.stderr)
        return 3
    same, results = True, []
    for smart in a.smart_scan or [1]:
        for mix in a.mix or sorted(MIXES):
            with tempfile.TemporaryDirectory(prefix="shmksm-images-") as tmp:
                paths = write_mix(tmp, a.guests, MIXES[mix])
                emu = shmksm_scans(paths, a.scans, smart)
                real = kernel_scans(paths, a.scans, smart)
            print(f"\n== mix {mix}, {a.guests} guests, smart_scan={smart}: kernel | shmksm after each full scan")
            print(f"{'scan':<6}" + "".join(f"{c:>22}" for c in COUNTERS))
            for k, (r, e) in enumerate(zip(real, emu, strict=True)):
                ok = all(r[c] == e.get(c) for c in COUNTERS)
                same &= ok
                print(f"{k + 1:<6}" + "".join(f"{str(r[c]) + ' | ' + str(e.get(c, '-')):>22}" for c in COUNTERS)
                      + ("" if ok else "   DIFFERS"))
            results.append({"mix": mix, "smart_scan": smart, "kernel": real, "shmksm": emu})
    print()
    return finish(results, a.json, same, "after every full scan")


if __name__ == "__main__":
    sys.exit(main())
