#!/usr/bin/env python3
"""ksmd against the real ksmd: CPU to converge, scan rates, memory per page.

Every figure is measured in this run; where the kernel's KSM is available
(root, a writable /sys/kernel/mm/ksm) the same images run on it too and the
ratios are printed.  Sections:

* converge  — scanner CPU seconds to converge on the 4-guest default mix,
              pages_to_scan 1000, sleep 0, counted from the scanner's first
              batch (as the kernel's ksmd is counted from run=1); start-up apart;
* unique    — scan rate over 200,000 unique pages: pages_scanned ÷ scanner
              CPU seconds over the same span;
* merged    — the same over 200,000 identical pages once merged;
* memory    — the scanner's private resident memory (RssAnon) per mergeable
              page at 1M pages (8 guests of 512 MiB), which must converge;
              an idle scanner's RssAnon (the interpreter and its modules)
              is printed beside it.

    python bench/bench_scanner.py [--sections converge,unique,merged,memory] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import kernel_ksm
from shmksm.workers.guest_image import load_image

from shmksm import Machine
from shmksm.tool.images import MIXES, Mix, ideal, write_mix
from shmksm.tool.runner import run_images

KNOBS = {"pages_to_scan": 1000, "sleep_millisecs": 0, "max_page_sharing": 256, "use_zero_pages": 0, "smart_scan": 1}


def converge(repeat: int, kernel: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shmksm-bench-") as tmp:
        paths = write_mix(tmp, 4, MIXES["default"])
        emu = [run_images(paths, knobs=KNOBS) for _ in range(repeat)]
        real = [kernel_ksm.run(paths, KNOBS) for _ in range(repeat)] if kernel else []
    out: dict[str, Any] = {
        "pages": emu[0]["pages"],
        "shmksm_cpu_seconds": statistics.median(r["converged"]["ksmd_cpu_seconds"] for r in emu),
        "shmksm_startup_seconds": statistics.median(r["ksmd_startup_seconds"] for r in emu),
        "shmksm_full_scans": [r["converged"]["full_scans"] for r in emu],
        "shmksm_counters": {k: emu[0]["ksm"][k] for k in ("pages_shared", "pages_sharing", "stable_node_dups")},
    }
    if real:
        out["kernel_cpu_seconds"] = statistics.median(r["converged"]["ksmd_cpu_seconds"] for r in real)
        out["kernel_full_scans"] = [r["converged"]["full_scans"] for r in real]
        out["kernel_counters"] = {k: real[0]["ksm"][k] for k in ("pages_shared", "pages_sharing", "stable_node_dups")}
        out["ratio"] = round(out["shmksm_cpu_seconds"] / out["kernel_cpu_seconds"], 3)
    return out


def _steady_rate(paths: list[str], pages: int, extra_scans: int, smart_scan: int) -> dict[str, float]:
    """Load, merge to convergence, then pages_scanned ÷ scanner CPU over ``extra_scans`` full scans."""
    with Machine(frames=pages + 1024, pages_to_scan=20000, sleep_millisecs=0, smart_scan=smart_scan) as m:
        guests = [m.add_guest(pages=pages // len(paths)) for _ in paths]
        for w in [m.spawn(load_image, g, p) for g, p in zip(guests, paths, strict=True)]:
            w.join()
        m.ksm.run = 1
        m.wait_full_scans(3, timeout=600)
        get = m.system.get
        cpu0, scanned0 = get("scanner_cpu_ns"), get("pages_scanned")
        m.wait_full_scans(extra_scans, timeout=600)
        cpu1, scanned1 = get("scanner_cpu_ns"), get("pages_scanned")
        m.ksm.run = 0
        return {"pages_scanned": scanned1 - scanned0, "cpu_seconds": round((cpu1 - cpu0) / 1e9, 4),
                "pages_per_cpu_second": round((scanned1 - scanned0) / max(1e-9, (cpu1 - cpu0) / 1e9))}


def scan_rate(mix: Mix, kernel: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shmksm-bench-") as tmp:
        paths = write_mix(tmp, 4, mix)
        pages = 4 * mix.pages
        out: dict[str, Any] = {"pages": pages}
        for smart in (1, 0):
            out[f"shmksm_smart_scan_{smart}"] = _steady_rate(paths, pages, 5, smart)
        if kernel:
            knobs = {**KNOBS, "pages_to_scan": 20000}
            r = kernel_ksm.run(paths, knobs)
            out["kernel"] = {"pages_scanned": r["ksm"]["pages_scanned"], "cpu_seconds": r["ksmd_cpu_seconds"],
                             "pages_per_cpu_second": round(r["ksm"]["pages_scanned"] / r["ksmd_cpu_seconds"])
                             if r["ksmd_cpu_seconds"] else None}
    return out


def memory(guests: int = 8, pages_per_guest: int = 131072) -> dict[str, Any]:
    mix = Mix(common=pages_per_guest // 2, zero=pages_per_guest // 8, unique=pages_per_guest // 4,
              intra=pages_per_guest - pages_per_guest // 2 - pages_per_guest // 8 - pages_per_guest // 4,
              intra_distinct=512)
    with tempfile.TemporaryDirectory(prefix="shmksm-bench-") as tmp:
        paths = write_mix(tmp, guests, mix)
        best = ideal(paths)
        t0 = time.perf_counter()
        r = run_images(paths, knobs={**KNOBS, "pages_to_scan": 20000}, timeout=1800)
        wall = time.perf_counter() - t0
    pages = r["pages"]
    return {"pages": pages, "guests": guests, "rss_anon_kb": r["ksmd_rss_anon_kb"],
            "idle_rss_anon_kb": _idle_scanner_rss_kb(),
            "bytes_per_page": round(r["ksmd_rss_anon_kb"] * 1024 / pages, 1),
            "converged_full_scans": r["converged"]["full_scans"],
            "counters_equal_ideal": (r["ksm"]["pages_shared"], r["ksm"]["pages_sharing"])
            == (best.pages_shared, best.pages_sharing),
            "ksmd_cpu_seconds": r["converged"]["ksmd_cpu_seconds"], "wall_seconds_with_loading": round(wall, 1)}


def _idle_scanner_rss_kb() -> int:
    """RssAnon of a scanner that has scanned nothing: the interpreter, numpy and xxhash."""
    with Machine(frames=1024) as machine:
        deadline = time.monotonic() + 10
        while not machine.system.get("scanner_pid") and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        with open(f"/proc/{machine.system.get('scanner_pid')}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="converge,unique,merged,memory")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-kernel", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    kernel = not a.no_kernel and kernel_ksm.available()
    sections = a.sections.split(",")
    results: dict[str, Any] = {"kernel_available": kernel}
    if "converge" in sections:
        r = results["converge"] = converge(a.repeat, kernel)
        print(f"converge: shmksm {r['shmksm_cpu_seconds']} CPU-s (start-up {r['shmksm_startup_seconds']} s, "
              f"full scans {r['shmksm_full_scans']})", end="")
        print(f"; kernel {r['kernel_cpu_seconds']} CPU-s (full scans {r['kernel_full_scans']}); ratio {r['ratio']}x"
              if kernel else "")
    for name, mix in (("unique", Mix(common=0, zero=0, unique=50000, intra=0)),
                      ("merged", Mix(common=50000, zero=0, unique=0, intra=0))):
        if name in sections:
            r = results[name] = scan_rate(mix, kernel)
            print(f"{name}: shmksm {r['shmksm_smart_scan_1']['pages_per_cpu_second']:,} pages/CPU-s "
                  f"(smart_scan 0: {r['shmksm_smart_scan_0']['pages_per_cpu_second']:,})", end="")
            print(f"; kernel {r['kernel']['pages_per_cpu_second']:,} pages/CPU-s" if kernel else "")
    if "memory" in sections:
        r = results["memory"] = memory()
        print(f"memory: {r['bytes_per_page']} bytes of scanner RssAnon per page at {r['pages']:,} pages "
              f"(an idle scanner's: {r['idle_rss_anon_kb']:,} kB); converged at full scan {r['converged_full_scans']}, "
              f"counters equal the ideal: {r['counters_equal_ideal']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
