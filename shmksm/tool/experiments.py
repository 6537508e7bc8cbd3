"""Experiments: the same workload under each notifier era, and knob sweeps.

The notifier experiment reproduces the story of ``change_pte`` (see
:mod:`shmksm.mmu_notifier`): guests hold duplicate pages; shadow workers
mirror them and read every page once (the warm-up: every entry faults in);
ksmd merges the duplicates while the shadows read a round; then the guests
write into the merged pages, breaking copy-on-write, and the shadows read a
round again.  Shadow faults after the warm-up are the result, apart by cause:
a merge maps a read-only PTE, which KVM's change_pte handler repoints in
place (2009: no fault); a copy-on-write maps a writable one, which the same
handler drops (a fault in every era) — so change_pte could only ever save the
merges' faults.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .._mm import mmu_notifier as mn
from .._mm.frames import PAGE_SIZE
from ..guest import MADV_MERGEABLE, GuestView
from ..machine import Machine


def _fill_duplicates(view: GuestView, pages: int, seed: int) -> int:
    """Odd pages hold one of a few shared patterns, even pages are unique."""
    patterns = np.random.default_rng([seed, 1 << 20]).integers(0, 256, (8, PAGE_SIZE), dtype=np.uint8)
    rng = np.random.default_rng([seed, view.gid])
    for i in range(pages):
        view.write(i * PAGE_SIZE, patterns[i % 8] if i % 2 else rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8))
    view.madvise(0, pages * PAGE_SIZE, MADV_MERGEABLE)
    return pages


def _break_cow(view: GuestView, pages: int) -> int:
    """Write one byte into every odd (merged) page: each write copies."""
    for i in range(1, pages, 2):
        view.write(i * PAGE_SIZE + 1, b"\x01")
    return pages // 2


def notifier_era_run(era: str, guests: int = 2, pages: int = 1024, shadows: int = 2, seed: int = 3) -> dict[str, Any]:
    """Run the workload under one era; return its figures."""
    with Machine(frames=guests * pages * 2 + 64, pages_to_scan=4 * pages, sleep_millisecs=0,
                 notifier_era=era) as machine:
        handles = [machine.add_guest(pages=pages) for _ in range(guests)]
        for g in handles:
            machine.spawn(_fill_duplicates, g, pages, seed).join()
        mmus = [machine.add_shadow(handles) for _ in range(shadows)]
        warm = [s.round()["faults"] for s in mmus]
        machine.ksm.run = 1
        machine.wait_converged()
        machine.ksm.run = 0
        merge = [s.round() for s in mmus]
        for g in handles:
            machine.spawn(_break_cow, g, pages).join()
        cow = [s.round() for s in mmus]
        for s in mmus:
            s.sync()
        counters = machine.ksm.counters()
        cow_ksm = machine.system.get("cow_ksm")
        area = machine.system.notify_area
        delivered = int(area.v[mn.H_DELIVERED])
        busy = int(area.v[mn.H_BUSY_NS]) / 1e9
        summaries = [s.stop() for s in mmus]
        machine.check()
    return {
        "warmup_faults": sum(warm),
        "merge_faults": sum(r["faults"] for r in merge),
        "cow_faults": sum(r["faults"] for r in cow),
        "shadow_faults": sum(r["faults"] for r in merge) + sum(r["faults"] for r in cow),
        "updated_in_place": sum(s["updated_in_place"] for s in summaries),
        "retries": sum(s["retries"] for s in summaries),
        "messages": delivered,
        "broker_messages_per_s": round(delivered / busy) if busy else None,
        "lag_max_us": max(s["lag_max_us"] for s in summaries),
        "lag_p99_us": max(s["lag_p99_us"] for s in summaries),
        "stale_reads": sum(s["stale_reads"] for s in summaries),
        "pages_sharing": counters["pages_sharing"],
        "cow_ksm": cow_ksm,
    }


def notifier_experiment(guests: int = 2, pages: int = 1024, shadows: int = 2, eras: tuple[str, ...] = mn.ERAS,
                        progress: Any = None) -> dict[str, Any]:
    """The workload under each era; ``faults_avoided`` is relative to the 2024 era."""
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for era in eras:
        results[era] = notifier_era_run(era, guests, pages, shadows)
        if progress is not None:
            progress(era, results[era])
    base = results.get("2024")
    for r in results.values():
        for key, faults in (("faults_avoided", "shadow_faults"), ("merge_faults_avoided", "merge_faults"),
                            ("cow_faults_avoided", "cow_faults")):
            r[key] = None if base is None else base[faults] - r[faults]
    return {"eras": results, "workload": {"guests": guests, "pages": pages, "shadows": shadows,
                                          "duplicate_pages": guests * (pages // 2)},
            "seconds": round(time.perf_counter() - t0, 2)}


SWEEP_KNOBS = ("pages_to_scan", "sleep_millisecs", "guests", "max_page_sharing", "use_zero_pages")


def sweep(knob: str, values: list[int], runs: int = 3, scenario: str = "default", guests: int = 4,
          base: dict[str, int] | None = None, jobs: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Vary one knob over ``values``, ``runs`` runs each, as parallel ``shmksm run`` processes.

    Every run is a separate host (its own machine and processes), so runs
    may go side by side on the available cores.  Reports, per value, the
    mean and standard deviation of the convergence time, the scanner's CPU
    seconds and the memory saved.
    """
    import json
    import os
    import statistics
    import subprocess
    import sys
    import tempfile

    from ..errors import ShmksmError, UsageError
    from .images import MIXES

    if knob not in SWEEP_KNOBS:
        raise UsageError(f"cannot sweep {knob!r}; knobs: {', '.join(SWEEP_KNOBS)}")
    if scenario not in MIXES:
        raise UsageError(f"unknown scenario {scenario!r}; scenarios: {', '.join(MIXES)}")
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 0, "max_page_sharing": 256, "use_zero_pages": 0,
             **(base or {})}
    jobs = jobs or os.cpu_count() or 1
    tasks = [(value, i) for value in values for i in range(runs)]
    results: dict[int, list[dict[str, Any]]] = {v: [] for v in values}
    with tempfile.TemporaryDirectory(prefix="shmksm-sweep-") as tmp:
        pending = list(tasks)
        running: list[tuple[int, Any, str]] = []
        while pending or running:
            while pending and len(running) < jobs:
                value, i = pending.pop(0)
                k = {**knobs}
                g = guests
                if knob == "guests":
                    g = value
                else:
                    k[knob] = value
                out = os.path.join(tmp, f"{value}-{i}.json")
                cmd = [sys.executable, "-m", "shmksm.cli", "run", "--scenario", scenario, "--guests", str(g),
                       "--pages-to-scan", str(k["pages_to_scan"]), "--sleep-millisecs", str(k["sleep_millisecs"]),
                       "--max-page-sharing", str(k["max_page_sharing"]), "--json", out]
                if k["use_zero_pages"]:
                    cmd.append("--use-zero-pages")
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                running.append((value, proc, out))
            value, proc, out = running.pop(0)
            _, err = proc.communicate()
            if proc.returncode:
                why = err.strip().splitlines()[-1] if err.strip() else f"exit code {proc.returncode}"
                raise ShmksmError(f"a run with {knob}={value} failed: {why}")
            with open(out) as f:
                report = json.load(f)
            results[value].append(report)
            if progress is not None:
                progress(value, report)

    def stat(xs: list[float]) -> dict[str, float]:
        return {"mean": round(statistics.fmean(xs), 4), "stdev": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0}

    points = []
    for value in values:
        reps = results[value]
        points.append({
            "value": value,
            "runs": len(reps),
            "converged_seconds": stat([r["converged"]["seconds"] for r in reps]),
            "ksmd_cpu_seconds": stat([r["converged"]["ksmd_cpu_seconds"] for r in reps]),
            "saved_mib": stat([(r["ksm"]["pages_sharing"] + r["ksm"]["ksm_zero_pages"]) * PAGE_SIZE / 2**20
                               for r in reps]),
            "full_scans": stat([r["converged"]["full_scans"] for r in reps]),
        })
    return {"knob": knob, "scenario": scenario, "guests": guests, "base": knobs, "points": points}
