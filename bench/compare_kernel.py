#!/usr/bin/env python3
"""Run the same memory images on shmksm and, where it is available, on the real KSM.

For each mix (see shmksm.tool.images.MIXES) it writes the images, counts the ideal
by brute force, runs them under shmksm's ksmd and under the kernel's, and
prints the counters side by side with the CPU each scanner spent to converge.

    python bench/compare_kernel.py --mix default --mix zero-heavy --pages-to-scan 1000 --sleep-millisecs 0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any

import kernel_ksm

from shmksm.tool.images import MIXES, ideal, write_mix
from shmksm.tool.runner import run_images

COMPARED = ("pages_shared", "pages_sharing", "ksm_zero_pages", "stable_node_chains", "stable_node_dups")


def compare(mix_name: str, guests: int, knobs: dict[str, int], kernel: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shmksm-images-") as tmp:
        paths = write_mix(tmp, guests, MIXES[mix_name])
        best = ideal(paths, knobs["max_page_sharing"])
        emu = run_images(paths, knobs=knobs)
        real = kernel_ksm.run(paths, knobs) if kernel else None
    zero = knobs["use_zero_pages"]
    want = {"pages_shared": best.pages_shared_zero if zero else best.pages_shared,
            "pages_sharing": best.pages_sharing_zero if zero else best.pages_sharing,
            "ksm_zero_pages": best.zero_pages if zero else 0}
    return {"mix": mix_name, "pages": best.pages, "knobs": knobs, "ideal": want, "shmksm": emu, "kernel": real}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", action="append", choices=sorted(MIXES), help="image mix (repeatable); default: all")
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--pages-to-scan", type=int, default=1000)
    ap.add_argument("--sleep-millisecs", type=int, default=0)
    ap.add_argument("--max-page-sharing", type=int, default=256)
    ap.add_argument("--use-zero-pages", type=int, choices=[0, 1], default=0)
    ap.add_argument("--smart-scan", type=int, choices=[0, 1], default=1)
    ap.add_argument("--no-kernel", action="store_true", help="do not run the real KSM")
    ap.add_argument("--json", metavar="FILE", help="also write every report as JSON")
    a = ap.parse_args()
    knobs = {"pages_to_scan": a.pages_to_scan, "sleep_millisecs": a.sleep_millisecs,
             "max_page_sharing": a.max_page_sharing, "use_zero_pages": a.use_zero_pages, "smart_scan": a.smart_scan}
    kernel = not a.no_kernel and kernel_ksm.available()
    if not kernel and not a.no_kernel:
        print("real KSM not available here (needs root and a writable /sys/kernel/mm/ksm): shmksm and ideal only")
    results, same = [], True
    for mix in a.mix or sorted(MIXES):
        r = compare(mix, a.guests, knobs, kernel)
        results.append(r)
        print(f"\n== mix {mix}: {a.guests} guests, {r['pages']} pages, knobs {knobs}")
        print(f"{'counter':<20}{'ideal':>10}{'kernel':>10}{'shmksm':>10}")
        for name in COMPARED:
            real = r["kernel"]["ksm"][name] if r["kernel"] else "-"
            emu = r["shmksm"]["ksm"][name]
            print(f"{name:<20}{r['ideal'].get(name, '-'):>10}{real:>10}{emu:>10}")
            if r["kernel"] and real != emu:
                same = False
        for key in ("full_scans", "ksmd_cpu_seconds", "seconds"):
            real = r["kernel"]["converged"][key] if r["kernel"] else "-"
            print(f"{'converged ' + key:<20}{'':>10}{real!s:>10}{r['shmksm']['converged'][key]!s:>10}")
        if r["kernel"] and r["kernel"]["converged"]["ksmd_cpu_seconds"]:
            ratio = r["shmksm"]["converged"]["ksmd_cpu_seconds"] / r["kernel"]["converged"]["ksmd_cpu_seconds"]
            print(f"scanner CPU to converge, shmksm / kernel: {ratio:.2f}x "
                  f"(shmksm start-up, not counted: {r['shmksm']['ksmd_startup_seconds']} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    if kernel:
        print("\nsame counters as the kernel on every mix" if same else "\nCOUNTERS DIFFER from the kernel")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
