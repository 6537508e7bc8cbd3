"""Run memory images on this machine's real KSM and report like ``shmksm run``.

Needs Linux with CONFIG_KSM and a writable /sys/kernel/mm/ksm (root).  One
process per image copies it into private anonymous memory and marks it
MADV_MERGEABLE; ksmd runs with the given knobs until pages_shared,
pages_sharing and ksm_zero_pages have not changed for ``stable_scans`` full
scans.  The knobs are restored and everything is unmerged (run=2) at the end.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import os
import time
from typing import Any

SYSFS = "/sys/kernel/mm/ksm/"
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned",
            "full_scans", "stable_node_chains", "stable_node_dups", "ksm_zero_pages", "general_profit")
KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages", "smart_scan")


class KernelKsmUnavailable(RuntimeError):
    pass


def available() -> bool:
    return os.access(SYSFS + "run", os.W_OK)


def read_sysfs(name: str) -> int:
    with open(SYSFS + name) as f:
        return int(f.read().split()[0])


def write_sysfs(name: str, value: int) -> None:
    with open(SYSFS + name, "w") as f:
        f.write(str(value))


def _ksmd_cpu_seconds() -> float | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "ksmd":
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return None


def _guest(path: str, ready: Any, done: Any) -> None:
    size = os.path.getsize(path)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with open(path, "rb") as f:
        f.readinto(mem)
    mem.madvise(mmap.MADV_MERGEABLE)
    ready.release()
    done.wait()
    mem.close()


def _wait_while_in_use(timeout: float) -> None:
    """The kernel's KSM is one per machine: while someone else's run has it (run is not 0), wait."""
    deadline = time.monotonic() + timeout
    while read_sysfs("run") != 0:
        if time.monotonic() > deadline:
            raise KernelKsmUnavailable(f"the kernel's KSM stayed in use (run != 0) for {timeout} s")
        time.sleep(1.0)


def run(images: list[str], knobs: dict[str, int], stable_scans: int = 3, timeout: float = 600) -> dict[str, Any]:
    """Run ``images`` on the kernel's KSM; return a report with ``ksm`` and ``converged``."""
    if not available():
        raise KernelKsmUnavailable("no writable /sys/kernel/mm/ksm (needs root and CONFIG_KSM)")
    _wait_while_in_use(timeout)
    saved = {k: read_sysfs(k) for k in KNOBS}
    if saved["run"] != 0 or read_sysfs("pages_shared") or read_sysfs("pages_sharing"):
        write_sysfs("run", 2)
        time.sleep(0.5)
    write_sysfs("run", 0)
    ctx = mp.get_context("fork")
    ready, done = ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=_guest, args=(p, ready, done), daemon=True) for p in images]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        for name in ("max_page_sharing", "use_zero_pages", "smart_scan", "pages_to_scan", "sleep_millisecs"):
            write_sysfs(name, knobs[name])
        base = {k: read_sysfs(k) for k in ("full_scans", "pages_scanned")}
        cpu0, t0 = _ksmd_cpu_seconds(), time.perf_counter()
        write_sysfs("run", 1)
        last, last_change, converged = None, 0, (0.0, 0, cpu0)
        while time.perf_counter() - t0 < timeout:
            time.sleep(0.005)
            snap = {k: read_sysfs(k) for k in COUNTERS}
            scans = snap["full_scans"] - base["full_scans"]
            key = (snap["pages_shared"], snap["pages_sharing"], snap["ksm_zero_pages"])
            if key != last:
                last, last_change = key, scans
                converged = (time.perf_counter() - t0, scans, _ksmd_cpu_seconds())
            if scans - last_change >= stable_scans:
                break
        final = {k: read_sysfs(k) for k in COUNTERS}
        final["full_scans"] -= base["full_scans"]
        final["pages_scanned"] -= base["pages_scanned"]
        cpu = _ksmd_cpu_seconds()
        return {
            "source": "linux-ksm", "kernel": os.uname().release, "ksm": final,
            "converged": {"seconds": round(converged[0], 4), "full_scans": converged[1],
                          "ksmd_cpu_seconds": None if cpu0 is None or converged[2] is None
                          else round(converged[2] - cpu0, 3)},
            "wall_seconds": round(time.perf_counter() - t0, 4),
            "ksmd_cpu_seconds": None if cpu0 is None or cpu is None else round(cpu - cpu0, 3),
        }
    finally:
        done.set()
        for p in procs:
            p.join(5)
        write_sysfs("run", 2)
        time.sleep(0.3)
        for name in ("max_page_sharing", "use_zero_pages", "smart_scan", "pages_to_scan", "sleep_millisecs"):
            with contextlib.suppress(OSError):
                write_sysfs(name, saved[name])
        write_sysfs("run", saved["run"])
