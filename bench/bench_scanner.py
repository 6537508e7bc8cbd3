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
* parallel  — 1 and 2 scanners (shmksm's own knob ``scanners``) on the same
              1M-page workload, pages_to_scan 20000, sleep 0: wall seconds to
              converge, pages scanned per wall-second and scanner CPU per page
              (all scanners' CPU), both of the work to converge (every page
              once per full scan up to the one the counters settled in: a
              scanner ahead of the other goes on over settled pages, which
              pages_scanned counts); targets 2 scanners >= 1.7x the pages
              per wall-second of one and <= 1.15x its CPU per page.
              The serial part — what every scanner repeats for pages it does
              not own (walking their PTEs and checksums), measured as
              the growth of CPU per page from 1 to 2 scanners — gives the
              extension to more cores (Amdahl, each scanner on its own core).
              1 and 2 scanners run alternately --repeat times; medians are
              printed, with the 1-minute load average before each run (on a
              busy machine wall-clock scaling is depressed: --quiet LOAD
              waits for the load to fall below LOAD first).  Each round also
              runs two machines of one scanner each, started at one instant
              (--no-pair leaves them out): they share nothing but the
              hardware, so what each loses against one machine alone is
              the ceiling any two scanners meet on this machine (memory
              bandwidth, shared caches, a virtual machine's stolen time).
* batch     — ksmd's CPU per batch at the default knobs (100 pages, 20 ms
              sleep), in-process: back to back, after each sleep, ten per
              wake-up one by one, and ten per wake-up scanned as one (as
              ksmd runs them); what is above back to back is the fixed part
              a batch pays after a sleep.

    python bench/bench_scanner.py [--sections converge,unique,merged,memory,parallel,batch] [--repeat 3]
                                  [--parallel-pages 1048576] [--quiet LOAD] [--no-pair] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
from typing import Any

import kernel_ksm
from shmksm.workers.guest_image import load_image
from shmksm.workers.ksmd import batches_per_wake

from shmksm import Machine
from shmksm._ksm.scanner import Scanner
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


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (5 min {five:.2f}) on {os.cpu_count()} CPUs"


def _wait_quiet(max_load: float, timeout: float) -> None:
    """Wait (up to ``timeout`` seconds) for the 1-minute load average to fall below ``max_load``."""
    deadline = time.monotonic() + timeout
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)


def _parallel_run(paths: list[str], best: Any, n: int, before_start: Any = None) -> dict[str, Any]:
    """One run of ``n`` scanners to convergence.  The rates are of the work to converge: the
    pages of every full scan up to the one the counters settled in (the same work for 1 and 2
    scanners when they settle in the same full scan), over the wall and CPU seconds until then.
    Over the whole run, a scanner that finished its passes first goes on scanning settled pages
    (cheap) while the other finishes: its pages_scanned would flatter the rates."""
    load = _load()
    r = run_images(paths, knobs={**KNOBS, "pages_to_scan": 20000, "scanners": n}, timeout=3600,
                   before_start=before_start)
    work = r["pages"] * r["converged"]["full_scans"]
    seconds, cpu = r["converged"]["seconds"], r["converged"]["ksmd_cpu_seconds"]
    return {
        "load_before": load, "load_after": _load(),
        "wall_seconds_to_converge": seconds, "converged_full_scans": r["converged"]["full_scans"],
        "cpu_seconds_to_converge": cpu,
        "pages_per_wall_second": round(work / seconds),
        "cpu_us_per_page": round(cpu / work * 1e6, 4),
        # the cores the scanners got: on a loaded machine far below their number
        "cpu_per_wall_second": round(cpu / seconds, 3),
        # the busiest scanner's share of the CPU: a content's pages all go to one scanner
        "busiest_cpu_share": round(max(s["cpu_seconds"] for s in r["scanners"]) / max(1e-9, r["ksmd_cpu_seconds"]), 3),
        "whole_run": {"wall_seconds": r["wall_seconds"], "pages_scanned": r["ksm"]["pages_scanned"],
                      "cpu_seconds": r["ksmd_cpu_seconds"], "full_scans": r["ksm"]["full_scans"]},
        "counters_equal_ideal": best is None or (r["ksm"]["pages_shared"], r["ksm"]["pages_sharing"])
        == (best.pages_shared, best.pages_sharing)}


def _pair_child(paths: list[str], barrier: Any, results: Any) -> None:
    """One of two machines of one scanner each, started together (see _pair_run)."""
    results.put(_parallel_run(paths, None, 1, before_start=barrier.wait))


def _pair_run(paths: list[str]) -> dict[str, Any]:
    """Two machines of one scanner each, on the same images, started at one instant: nothing is
    shared but the cores, the caches and the memory, so what each loses against a machine run
    alone is what this machine's hardware takes from any two scanners (the ceiling of 2 scanners)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_pair_child, args=(paths, barrier, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    runs: list[dict[str, Any]] = []
    while len(runs) < len(procs):
        try:
            runs.append(results.get(timeout=1.0))
        except queue.Empty:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                for proc in procs:  # the other waits at the barrier, or runs on alone
                    proc.terminate()
                    proc.join()
                raise RuntimeError("a machine of the ceiling's pair failed: "
                                   + ", ".join(f"exit {proc.exitcode}" for proc in procs)) from None
    for proc in procs:
        proc.join()
    return {"pages_per_wall_second": sum(r["pages_per_wall_second"] for r in runs),
            "cpu_us_per_page": round(statistics.mean(r["cpu_us_per_page"] for r in runs), 4),
            "runs": runs}


def parallel(total_pages: int, guests: int = 8, scanner_counts: tuple[int, ...] = (1, 2), repeat: int = 3,
             quiet: float = 0.0, quiet_timeout: float = 600, pair: bool = True) -> dict[str, Any]:
    """1 and 2 scanners on one workload of ``total_pages``, alternately ``repeat`` times: medians of
    wall, rate and CPU per page to converge, the serial part, and the load beside each run.  With
    ``quiet``, each run waits (up to ``quiet_timeout`` s) for the load average to fall below it."""
    per_guest = total_pages // guests
    mix = Mix(common=per_guest // 2, zero=per_guest // 8, unique=per_guest // 4,
              intra=per_guest - per_guest // 2 - per_guest // 8 - per_guest // 4, intra_distinct=512)
    out: dict[str, Any] = {"pages": per_guest * guests, "guests": guests, "repeat": repeat,
                           "load_before": _load()}
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in scanner_counts}
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="shmksm-bench-") as tmp:
        paths = write_mix(tmp, guests, mix)
        best = ideal(paths)
        for _ in range(repeat):
            for n in scanner_counts:
                if quiet:
                    _wait_quiet(quiet, quiet_timeout)
                r = _parallel_run(paths, best, n)
                runs[n].append(r)
                print(f"  ({n} scanner(s): converged in {r['wall_seconds_to_converge']} s, "
                      f"{r['cpu_seconds_to_converge']} CPU-s; {r['load_before']})", file=sys.stderr, flush=True)
            if pair:
                if quiet:
                    _wait_quiet(quiet, quiet_timeout)
                pairs.append(_pair_run(paths))
                print("  (two machines of 1 scanner at once: converged in "
                      + ", ".join(f"{x['wall_seconds_to_converge']} s" for x in pairs[-1]["runs"]) + ")",
                      file=sys.stderr, flush=True)
    for n, rs in runs.items():
        med = {key: statistics.median(r[key] for r in rs) for key, v in rs[0].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
        med["counters_equal_ideal"] = all(r["counters_equal_ideal"] for r in rs)
        med["loads"] = [r["load_before"].split(" (")[0].split()[-1] for r in rs]
        out[f"scanners_{n}"] = {**med, "runs": rs}
    one, two = out["scanners_1"], out[f"scanners_{scanner_counts[-1]}"]
    k = scanner_counts[-1]
    out["rate_ratio"] = round(two["pages_per_wall_second"] / one["pages_per_wall_second"], 3)
    out["converge_wall_ratio"] = round(one["wall_seconds_to_converge"] / two["wall_seconds_to_converge"], 3)
    out["cpu_per_page_ratio"] = round(two["cpu_us_per_page"] / one["cpu_us_per_page"], 3)
    # Every scanner pays the serial part on every page; the rest divides among them.
    serial = max(0.0, (two["cpu_us_per_page"] - one["cpu_us_per_page"]) / (k - 1))
    own = one["cpu_us_per_page"]
    out["serial_us_per_page"] = round(serial, 4)
    out["per_scanner_pages_per_cpu_second"] = round(1e6 / (own / k + serial))
    out["projected_speedup"] = {n: round(n * own / (own + (n - 1) * serial), 2) for n in (2, 4, 8, 12, 16)}
    # ... and no faster than the busiest scanner's share of the work allows
    out["balance_limit"] = round(1 / two["busiest_cpu_share"], 2)
    # On a shared machine a run's speed moves by several per cent from one run to the
    # next: each round's runs of k scanners against its own run of one, and the best
    # run of each (the least disturbed), beside the medians.
    out["rounds"] = [{"rate_ratio": round(b["pages_per_wall_second"] / a["pages_per_wall_second"], 3),
                      "cpu_per_page_ratio": round(b["cpu_us_per_page"] / a["cpu_us_per_page"], 3)}
                     for a, b in zip(one["runs"], two["runs"], strict=True)]
    out["best_rate_ratio"] = round(max(r["pages_per_wall_second"] for r in two["runs"])
                                   / max(r["pages_per_wall_second"] for r in one["runs"]), 3)
    out["best_cpu_per_page_ratio"] = round(min(r["cpu_us_per_page"] for r in two["runs"])
                                           / min(r["cpu_us_per_page"] for r in one["runs"]), 3)
    if pairs:
        # The ceiling: two machines of one scanner each, at once, against one alone in the same
        # round — what the hardware (memory bandwidth, shared caches) allows any two scanners.
        ceiling = [{"rate_ratio": round(p["pages_per_wall_second"] / a["pages_per_wall_second"], 3),
                    "cpu_per_page_ratio": round(p["cpu_us_per_page"] / a["cpu_us_per_page"], 3)}
                   for a, p in zip(one["runs"], pairs, strict=True)]
        out["two_machines"] = {"rounds": ceiling, "runs": pairs,
                               "rate_ratio": statistics.median(c["rate_ratio"] for c in ceiling),
                               "cpu_per_page_ratio": statistics.median(c["cpu_per_page_ratio"] for c in ceiling)}
    return out


def batch_cost(batches: int = 1500) -> dict[str, Any]:
    """CPU per batch of 100 pages on the 4-guest default mix (its merges included): do_scan(100)
    back to back, after each 20 ms sleep (the kernel's pattern), grouped per wake-up one by one
    (batches_per_wake), and grouped per wake-up scanned as one as ksmd runs them (do_scan_batches)."""
    out: dict[str, Any] = {"load": _load()}
    group = batches_per_wake(100, 20)
    with tempfile.TemporaryDirectory(prefix="shmksm-bench-") as tmp:
        paths = write_mix(tmp, 4, MIXES["default"])
        for sleep, per_wake, together, name in ((0.0, 1, False, "back_to_back"), (0.02, 1, False, "sleep_each"),
                                                (0.02 * group, group, False, f"grouped_{group}_one_by_one"),
                                                (0.02 * group, group, True, f"grouped_{group}_as_one")):
            with Machine(frames=4 * MIXES["default"].pages + 1024, ksmd=False) as m:
                guests = [m.add_guest(pages=MIXES["default"].pages) for _ in paths]
                for w in [m.spawn(load_image, g, p) for g, p in zip(guests, paths, strict=True)]:
                    w.join()
                m.ksm.run = 1
                scanner = Scanner(m.system)
                cpu = []  # per batch: a wake-up's CPU shared among its batches
                while len(cpu) < batches:
                    t = time.process_time()
                    if together:
                        left = per_wake
                        while left:
                            left -= scanner.do_scan_batches(100, left)
                    else:
                        for _ in range(per_wake):
                            scanner.do_scan(100, publish=False)
                    scanner.publish()
                    cpu += [(time.process_time() - t) / per_wake] * per_wake
                    if sleep:
                        time.sleep(sleep)
                out[name] = {
                    "median_us": round(statistics.median(cpu) * 1e6), "mean_us": round(statistics.mean(cpu) * 1e6),
                    "cpu_seconds": round(sum(cpu), 3), "full_scans": scanner.full_scans}
    return out


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
    ap.add_argument("--sections", default="converge,unique,merged,memory,parallel,batch")
    ap.add_argument("--parallel-pages", type=int, default=1 << 20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quiet", type=float, default=0.0, metavar="LOAD",
                    help="parallel: before each run, wait up to 10 min for the 1-min load average to fall below LOAD")
    ap.add_argument("--no-pair", action="store_true",
                    help="parallel: leave out the two machines of one scanner each run at once (the ceiling)")
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
    if "parallel" in sections:
        r = results["parallel"] = parallel(a.parallel_pages, repeat=a.repeat, quiet=a.quiet, pair=not a.no_pair)
        print(f"parallel: {r['pages']:,} pages, medians of {r['repeat']} runs each; {r['load_before']}")
        for key in ("scanners_1", "scanners_2"):
            s = r[key]
            print(f"  {key.replace('_', ' ')}: converged in {s['wall_seconds_to_converge']} wall-s "
                  f"(full scan {s['converged_full_scans']}), {s['pages_per_wall_second']:,.0f} pages/wall-s to "
                  f"converge, "
                  f"{s['cpu_us_per_page']:.4f} CPU-us/page, {s['cpu_per_wall_second']:.3f} CPU-s per "
                  f"wall-s (the busiest scanner's share {s['busiest_cpu_share']:.3f}), ideal reached: "
                  f"{s['counters_equal_ideal']}; 1-min load before each run: "
                  + ", ".join(s["loads"]))
        print(f"  2 vs 1: {r['rate_ratio']}x pages/wall-s (target >= 1.7), {r['cpu_per_page_ratio']}x CPU/page "
              f"(target <= 1.15); converged {r['converge_wall_ratio']}x as fast; the busiest scanner's share of "
              f"the work alone limits 2 scanners to {r['balance_limit']}x")
        print("  each round, 2 vs 1 of the same round: "
              + "; ".join(f"{x['rate_ratio']}x, {x['cpu_per_page_ratio']}x" for x in r["rounds"])
              + f"; best run of each: {r['best_rate_ratio']}x pages/wall-s, {r['best_cpu_per_page_ratio']}x CPU/page")
        if "two_machines" in r:
            t = r["two_machines"]
            print(f"  the machine's ceiling, two machines of 1 scanner each at once (nothing shared but the "
                  f"hardware) vs 1 alone: {t['rate_ratio']}x pages/wall-s, {t['cpu_per_page_ratio']}x CPU/page "
                  f"(medians; rounds: " + "; ".join(f"{x['rate_ratio']}x, {x['cpu_per_page_ratio']}x"
                                                    for x in t["rounds"]) + ")")
        print(f"  serial part {r['serial_us_per_page']} CPU-us/page (repeated by every scanner); per-scanner "
              f"{r['per_scanner_pages_per_cpu_second']:,} pages/CPU-s at 2; projected speedup on N free cores: "
              + ", ".join(f"{n}: {x}x" for n, x in r["projected_speedup"].items()) + " (PageONE: 13.7x on 12)")
    if "batch" in sections:
        r = results["batch"] = batch_cost()
        print(f"batch: CPU per batch of 100 pages, median (mean; total over {r['sleep_each']['full_scans']} full "
              f"scans), {r['load']}:")
        for key, what in (("back_to_back", "do_scan(100) back to back"),
                          ("sleep_each", "do_scan(100) after each 20 ms sleep"),
                          (next(k for k in r if k.endswith("_one_by_one")), "per wake-up, one by one"),
                          (next(k for k in r if k.endswith("_as_one")), "per wake-up, as one (ksmd)")):
            label = f"{key.split('_')[1]} {what}" if key.startswith("grouped_") else what
            print(f"  {label:<40} {r[key]['median_us']:>6} us ({r[key]['mean_us']} us; {r[key]['cpu_seconds']} CPU-s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
