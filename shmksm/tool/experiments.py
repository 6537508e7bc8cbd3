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

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np

from .._mm import mmu_notifier as mn
from .._mm.frames import PAGE_SIZE
from ..errors import ShmksmError, UsageError
from ..guest import MADV_MERGEABLE, GuestView
from ..machine import Machine
from .fleet import map_on_cluster
from .images import MIXES


def _fill_duplicates(view: GuestView, pages: int, seed: int) -> int:
    """Odd pages hold one of a few shared patterns, even pages are unique."""
    patterns = np.random.default_rng([seed, 1 << 20]).integers(0, 256, (8, PAGE_SIZE), dtype=np.uint8)
    rng = np.random.default_rng([seed, view.gid])
    for i in range(pages):
        view.write(i * PAGE_SIZE, patterns[i % 8] if i % 2 else rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8))
    view.madvise(0, pages * PAGE_SIZE, MADV_MERGEABLE)
    return pages


def _break_cow(view: GuestView, pages: int) -> tuple[int, float]:
    """Write one byte into every odd (merged) page: each write copies.  Returns (writes, seconds)."""
    t0 = time.perf_counter()
    for i in range(1, pages, 2):
        view.write(i * PAGE_SIZE + 1, b"\x01")
    return pages // 2, time.perf_counter() - t0


def _merging_scans(machine: Machine) -> tuple[int, float]:
    """Run ksmd through the two full scans that merge (checksums, then merges); (pages merged, seconds)."""
    system = machine.system
    end = system.get("full_scans") + 2
    t0 = time.perf_counter()
    machine.ksm.run = 1
    while system.get("full_scans") < end:
        time.sleep(0.0002)
    seconds = time.perf_counter() - t0
    merged = machine.ksm.counters()
    return merged["pages_shared"] + merged["pages_sharing"], seconds


def notifier_era_run(era: str, guests: int = 2, pages: int = 1024, shadows: int = 2, seed: int = 3,
                     sync: bool = False) -> dict[str, Any]:
    """Run the workload under one era (the shadows added with ``sync``); return its figures."""
    with Machine(frames=guests * pages * 2 + 64, pages_to_scan=4 * pages, sleep_millisecs=0,
                 notifier_era=era) as machine:
        handles = [machine.add_guest(pages=pages) for _ in range(guests)]
        for g in handles:
            machine.spawn(_fill_duplicates, g, pages, seed).join()
        mmus = [machine.add_shadow(handles, sync=sync) for _ in range(shadows)]
        warm = [s.round()["faults"] for s in mmus]
        merges, merge_seconds = _merging_scans(machine)
        machine.wait_converged()
        machine.ksm.run = 0
        merge = [s.round() for s in mmus]
        breaks = [machine.spawn(_break_cow, g, pages).join() for g in handles]
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
        "cow_break_us": round(sum(t for _, t in breaks) / max(1, sum(n for n, _ in breaks)) * 1e6, 1),
        "merges_per_s": round(merges / merge_seconds) if merge_seconds else None,
    }


def notifier_experiment(guests: int = 2, pages: int = 1024, shadows: int = 2, eras: tuple[str, ...] = mn.ERAS,
                        progress: Any = None, sync: bool = True) -> dict[str, Any]:
    """The workload under each era; ``faults_avoided`` is relative to the 2024 era.

    With ``sync``, each era runs again with synchronous shadows (``sync``
    key): what waiting for the shadows' acknowledgement costs a
    copy-on-write break and ksmd's merging, beside the asynchronous run.
    """
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for era in eras:
        results[era] = notifier_era_run(era, guests, pages, shadows)
        if sync:
            synced = notifier_era_run(era, guests, pages, shadows, sync=True)
            results[era]["sync"] = {k: synced[k] for k in ("cow_break_us", "merges_per_s", "shadow_faults",
                                                          "merge_faults", "cow_faults", "stale_reads")}
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


def run_report(args: list[str]) -> dict[str, Any]:
    """``shmksm run ARGS --json -`` as a process of its own (a whole machine); its report.

    ShmksmError with the run's last line of error if it failed.  Module-level,
    so that a Dask worker can run it as a task.
    """
    proc = subprocess.run([sys.executable, "-m", "shmksm.cli", "run", *args, "--json", "-"], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        err = proc.stderr.strip()
        raise ShmksmError(err.splitlines()[-1].removeprefix("Error: ") if err else f"exit code {proc.returncode}")
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def _sweep_run(task: tuple[str, list[str]]) -> dict[str, Any]:
    """run_report of a sweep's run (label, args), its failure named by the label (knob=value)."""
    label, args = task
    try:
        return run_report(args)
    except ShmksmError as exc:
        raise ShmksmError(f"a run with {label} failed: {exc}") from None


def _run_args(scenario: str, guests: int, knobs: dict[str, int]) -> list[str]:
    args = ["--scenario", scenario, "--guests", str(guests), "--pages-to-scan", str(knobs["pages_to_scan"]),
            "--sleep-millisecs", str(knobs["sleep_millisecs"]), "--max-page-sharing", str(knobs["max_page_sharing"])]
    return [*args, "--use-zero-pages"] if knobs["use_zero_pages"] else args


def sweep(knob: str, values: list[int], runs: int = 3, scenario: str = "default", guests: int = 4,
          base: dict[str, int] | None = None, jobs: int | None = None, progress: Any = None,
          scheduler: str | None = None) -> dict[str, Any]:
    """Vary one knob over ``values``, ``runs`` runs each, as separate ``shmksm run`` processes.

    Every run is a separate host (its own machine and processes), so runs
    go side by side: ``jobs`` at a time here, or one task each on the Dask
    cluster at ``scheduler``.  Reports, per value, the mean and standard
    deviation of the convergence time, the scanner's CPU seconds and the
    memory saved.
    """
    if knob not in SWEEP_KNOBS:
        raise UsageError(f"cannot sweep {knob!r}; knobs: {', '.join(SWEEP_KNOBS)}")
    if scenario not in MIXES:
        raise UsageError(f"unknown scenario {scenario!r}; scenarios: {', '.join(MIXES)}")
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 0, "max_page_sharing": 256, "use_zero_pages": 0,
             **(base or {})}
    tasks = [value for value in values for _ in range(runs)]
    runs_args = [(f"{knob}={value}", _run_args(scenario, value, knobs) if knob == "guests"
                  else _run_args(scenario, guests, {**knobs, knob: value})) for value in tasks]

    def done(i: int, report: dict[str, Any]) -> None:
        if progress is not None:
            progress(tasks[i], report)

    if scheduler:
        reports = map_on_cluster(_sweep_run, runs_args, scheduler, done)
    else:
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            futures = {pool.submit(_sweep_run, task): i for i, task in enumerate(runs_args)}
            reports = [{}] * len(runs_args)
            for future in as_completed(futures):
                i = futures[future]
                reports[i] = future.result()
                done(i, reports[i])
    results: dict[int, list[dict[str, Any]]] = {v: [] for v in values}
    for value, report in zip(tasks, reports, strict=True):
        results[value].append(report)

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
