"""The demo and the stress run: machines of guests, shadows and ksmd, run to the end.

Each engine builds its machine, runs it, and returns a plain summary; the
command line (:mod:`shmksm.cli`) shows the progress it is handed and prints
the summary.  ``on_tick(snapshot)`` is called a few times a second while
the guests run, with a :class:`~shmksm.tool.dashboard.Snapshot`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .._ksm.sysfs import counters
from .._kvm.secondary import ShadowMMU
from ..machine import Guest, Machine, Worker
from .dashboard import Snapshot
from .memmap import MapRecorder

Tick = Callable[[Snapshot], None]
_PLOTTED_KNOBS = ("pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages")


def snapshot(machine: Machine, elapsed: float, guests: list[Guest], mmus: list[ShadowMMU]) -> Snapshot:
    """The machine now: counters, each guest's ksm_stat, the shadows' faults, the scanner's CPU."""
    return Snapshot(elapsed=elapsed, counters=counters(machine.system), pages=sum(g.pages for g in guests),
                    guests=[g.ksm_stat() for g in guests if g.alive],
                    shadow_faults=sum(m.stats()["faults"] for m in mmus) if mmus else None,
                    scanner_cpu_seconds=machine.system.get("scanner_cpu_ns") / 1e9)


def _watch(machine: Machine, workers: list[Worker], guests: list[Guest], mmus: list[ShadowMMU], on_tick: Tick,
           interval: float, every_second: Callable[[], None] | None = None,
           mapper: MapRecorder | None = None) -> tuple[float, list[dict[str, Any]]]:
    """Call ``on_tick`` until every worker has ended; return (seconds, the counters' timeline)."""
    t0 = time.monotonic()
    timeline: list[dict[str, Any]] = []
    last_second = 0.0
    while True:
        running = any(w.is_alive() for w in workers)
        elapsed = time.monotonic() - t0
        snap = snapshot(machine, elapsed, guests, mmus)
        timeline.append({"t": round(elapsed, 3), **snap.counters})
        on_tick(snap)
        if mapper is not None:
            mapper.tick(machine.system, elapsed)
        if not running:
            return elapsed, timeline
        if every_second is not None and time.monotonic() - last_second >= 1.0:
            last_second = time.monotonic()
            every_second()
        time.sleep(interval)


def demo_pages_to_scan(total_pages: int) -> int:
    """A full scan every ~2 s at 20 ms per batch: merging is visible as it happens."""
    return max(100, total_pages // 100)


def run_demo(guests: int, pages: int, seconds: float, *, use_zero_pages: bool = False, shadows: int = 1,
             era: str = "2024", on_tick: Tick = lambda snapshot: None,
             plot: str | None = None, map_path: str | None = None, map_every: float | None = None) -> dict[str, Any]:
    """VM-like guests (``shmksm.workers.guest_vm``) and shadow MMUs under ksmd; return what merging saved.

    The shadows' vCPUs read all memory once a second.  The summary holds the
    final counters, ``cow_ksm``, the guests' results and the shadows'
    summaries; with ``map_path``, the frame pool is drawn there at the end
    (and every ``map_every`` seconds as an animation: tool.memmap).
    """
    from ..workers.guest_vm import run_vm

    total = guests * pages
    with Machine(frames=total + 1 + total // 8, pages_to_scan=demo_pages_to_scan(total), sleep_millisecs=20,
                 use_zero_pages=int(use_zero_pages), notifier_era=era) as machine:
        handles = [machine.add_guest(pages=pages) for _ in range(guests)]
        mmus = [machine.add_shadow(handles) for _ in range(shadows)]
        workers = [machine.spawn(run_vm, g, i, seconds, name=f"vm{i}") for i, g in enumerate(handles)]
        machine.ksm.run = 1

        def read_all() -> None:
            for mmu in mmus:
                mmu.request_round()

        mapper = MapRecorder(map_path, map_every, f"shmksm demo: {guests} guests") if map_path else None
        elapsed, timeline = _watch(machine, workers, handles, mmus, on_tick, 0.2, read_all, mapper)
        drawn = mapper.finish(machine.system, elapsed) if mapper is not None else None
        results = [w.join() for w in workers]
        shadow_stats = [mmu.stop() for mmu in mmus]
        if plot:
            from .plots import plot_timeline

            plot_timeline({"timeline": timeline, "pages": total,
                           "knobs": {k: getattr(machine.ksm, k) for k in _PLOTTED_KNOBS}}, plot)
        final = counters(machine.system)
        machine.ksm.run = 0
        machine.check()
        return {"counters": final, "pages": total, "cow_ksm": machine.system.get("cow_ksm"),
                "guests": results, "shadows": shadow_stats, "map": drawn}


def run_stress(guests: int, pages: int, seconds: float, *, writes: int | None = None, shadows: int = 1,
               era: str = "2024", seed: int = 1, on_tick: Tick = lambda snapshot: None) -> dict[str, Any]:
    """Guests write and verify at full speed (``shmksm.workers.guest_random``) while ksmd merges.

    Returns the counters, the mismatched bytes per guest, the shadows'
    summaries and stale reads, and the bytes the guests wrote (every one
    verified by a read) with their sum of per-guest rates; ``machine.check()``
    has passed.
    """
    from ..workers.guest_random import run_counted as random_workload

    total = guests * pages
    with Machine(frames=total + 64, pages_to_scan=max(1000, total // 4), sleep_millisecs=0,
                 notifier_era=era) as machine:
        handles: list[Guest] = [machine.add_guest(pages=pages) for _ in range(guests)]
        for view in (g.view() for g in handles):
            view.set_memory_merge(True)
        mmus = [machine.add_shadow(handles, mode="free") for _ in range(shadows)]
        machine.ksm.run = 1
        limit = writes if writes is not None else 10**12
        workers = [machine.spawn(random_workload, g, seed + i, seconds if writes is None else 1e9, limit,
                                 name=f"stress{i}") for i, g in enumerate(handles)]
        elapsed, _ = _watch(machine, workers, handles, mmus, on_tick, 0.25)
        outcomes = [w.join() for w in workers]
        machine.ksm.run = 0
        summaries = [m.stop() for m in mmus]
        machine.check()
        return {"counters": counters(machine.system), "seconds": elapsed, "cow_ksm": machine.system.get("cow_ksm"),
                "mismatches": [o.mismatches for o in outcomes], "shadows": summaries,
                "bytes_written": sum(o.bytes_written for o in outcomes),
                "bytes_per_second": sum(o.bytes_written / o.seconds for o in outcomes),
                "stale_reads": sum(s.get("stale_reads", 0) for s in summaries)}
