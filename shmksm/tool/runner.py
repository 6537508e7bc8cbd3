"""Run guest memory images under ksmd until the counters settle, as bench/kernel_ksm.py does on Linux.

:func:`run_images` returns the same JSON-ready report as the kernel-side runner,
key by key (``ksm``, ``converged``, ``wall_seconds``, ``ksmd_cpu_seconds``,
``timeline``, ...), so that the two can be compared directly.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._ksm.sysfs import counters
from ..errors import OutOfFrames, UsageError
from ..machine import Machine
from .images import image_pages
from .memmap import MapRecorder

RUN_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned",
                "full_scans", "stable_node_chains", "stable_node_dups", "ksm_zero_pages", "general_profit")
_SETTLE_KEYS = ("pages_shared", "pages_sharing", "ksm_zero_pages")
_UNTRACKED = ("pages_scanned", "scanner_cpu_ns")  # they change at every look: a timeline entry is a change of the rest


def run_images(images: Sequence[str], *, knobs: dict[str, Any] | None = None, stable_scans: int = 3,
               max_scans: int | None = None, max_seconds: float | None = None, timeout: float = 600.0,
               frames: int | None = None, progress: Callable[[dict[str, int]], None] | None = None,
               format: str = "auto", explain: bool = False, timeline_extra: Sequence[str] = (),
               map_path: str | None = None, map_every: float | None = None,
               before_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Load each image into a guest, run ksmd, follow the counters; return the report.

    ``format`` says how to read the images: auto, raw or core (images.image_layout).
    ``explain`` adds why each page merged or not (Machine.explain) under "explain";
    ``map_path`` draws the frame pool at the end (and every ``map_every``
    seconds as an animation: tool.memmap), named under "map".
    ``before_start`` is called once the images are loaded, just before ksmd
    runs (a barrier, to start several runs at one instant).

    Stops when pages_shared, pages_sharing and ksm_zero_pages have not changed
    for ``stable_scans`` full scans (or after ``max_scans`` full scans, or
    ``max_seconds``), or at ``timeout``.  ``timeline_extra``: further
    counters (or control words, such as scanner_cpu_ns) the timeline's entries
    hold (the report's keys stay the kernel-side runner's).
    """
    if not images:
        raise UsageError("no image given")
    sizes = [image_pages(p, format) for p in images]
    knobs = dict(knobs or {})
    total = sum(sizes)
    nframes = frames if frames is not None else total + 1 + max(64, total // 64)
    from shmksm.workers.guest_image import load_image

    with Machine(frames=nframes, **knobs) as machine:
        guests = [machine.add_guest(pages=n) for n in sizes]
        loaders = [machine.spawn(load_image, g, os.path.abspath(p), True, format, name=f"load{g.id}")
                   for g, p in zip(guests, images, strict=True)]
        for loader in loaders:
            loader.join()
        system = machine.system
        if before_start is not None:
            before_start()
        base_scanned = system.get("pages_scanned")
        t0 = time.perf_counter()
        machine.ksm.run = 1
        timeline: list[dict[str, Any]] = []
        last: tuple[int, ...] | None = None
        last_change_scan = 0
        converged_at = (0.0, 0, 0)
        snap: dict[str, int] = {}
        mapper = MapRecorder(map_path, map_every, f"shmksm run: {len(images)} image(s)") if map_path else None
        while time.perf_counter() - t0 < timeout:
            time.sleep(0.005)
            if machine.ksmd is None or not machine.ksmd.is_alive():
                raise OutOfFrames("ksmd died during the run") if machine.deaths else UsageError("ksmd stopped")
            now = counters(system)
            snap = {k: now[k] if k in now else system.get(k) for k in (*RUN_COUNTERS, *timeline_extra)}
            snap["pages_scanned"] -= base_scanned
            key = tuple(snap[k] for k in _SETTLE_KEYS)
            elapsed = time.perf_counter() - t0
            if mapper is not None:
                mapper.tick(system, elapsed)
            if key != last:
                last, last_change_scan = key, snap["full_scans"]
                converged_at = (elapsed, snap["full_scans"], system.get("scanner_cpu_ns"))
            if not timeline or any(timeline[-1][k] != v for k, v in snap.items() if k not in _UNTRACKED):
                timeline.append({"t": round(elapsed, 4), **snap})
                if progress is not None:
                    progress(snap)
            if snap["full_scans"] - last_change_scan >= stable_scans:
                break
            if max_scans is not None and snap["full_scans"] >= max_scans:
                break
            if max_seconds is not None and elapsed >= max_seconds:
                break
        wall = time.perf_counter() - t0
        explained = machine.explain().as_dict() if explain else None
        drawn = mapper.finish(system, wall) if mapper is not None else None
        machine.ksm.run = 0
        cpu_ns = system.get("scanner_cpu_ns")
        per_scanner = zip(machine.ksm.per_scanner("scanner_cpu_ns"), machine.ksm.per_scanner("pages_scanned"),
                          strict=True)
        final = {k: v for k, v in counters(system).items() if k in RUN_COUNTERS}
        final["pages_scanned"] -= base_scanned
        stats = [g.ksm_stat() for g in guests]
        machine.check()
        return {
            "source": "shmksm",
            "kernel": f"shmksm emulator on {platform.python_implementation()} {platform.python_version()}",
            "images": list(images),
            "pages": total,
            "knobs": {k: getattr(machine.ksm, k) for k in ("pages_to_scan", "sleep_millisecs", "max_page_sharing",
                                                           "use_zero_pages", "smart_scan")},
            "ksm": final,
            # seconds and CPU as the look every 5 ms saw them, as the kernel-side
            # runner counts the kernel's; the full scan from ksmd's own record: a
            # look can come a full scan late when one takes less than 5 ms.
            "converged": {"seconds": round(converged_at[0], 4),
                          "full_scans": system.get("scanner_settled_scan"),
                          "ksmd_cpu_seconds": round(converged_at[2] / 1e9, 3)},
            "wall_seconds": round(wall, 4),
            "ksmd_cpu_seconds": round(cpu_ns / 1e9, 3),
            # each scanner's share (shmksm's own knob scanners), scanner 0 first
            "scanners": [{"cpu_seconds": round(cpu / 1e9, 3), "pages_scanned": scanned}
                         for cpu, scanned in per_scanner],
            "ksmd_startup_seconds": round(system.get("scanner_startup_ns") / 1e9, 3),
            "ksmd_rss_anon_kb": system.get("scanner_rss_kb"),
            "ksm_stat": stats,
            "timeline": timeline,
            **({"explain": explained} if explained is not None else {}),
            **({"map": drawn} if drawn is not None else {}),
        }
