"""Scanner entry point: ksmd, the process that merges identical pages.

The host starts it with ``machine.start_ksmd()``.  It scans while the ``run``
knob is 1, unmerges everything once when it becomes 2, idles at 0, and exits
when the host sets ``scanner_stop`` or dies.  It reports its CPU time (from
its first batch, as the kernel's ksmd is counted from ``run=1``), its
start-up time (spawn to ready) and the peak of its private resident memory
(RssAnon, sampled every 16 batches and at every full scan) in the control
segment.
"""

from __future__ import annotations

import os
import time

from shmksm._ksm import explain
from shmksm._ksm.scanner import Scanner
from shmksm._mm.system import System


def _anon_rss_kb() -> int:
    """This process's private resident memory (RssAnon): the frame pool it reads is not counted."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _settle_key(scanner: Scanner) -> tuple[int, int, int]:
    """What the scanner's merging changes: the full scan it last changed in is where it settled."""
    return scanner.pages_shared, scanner.pages_sharing, scanner.zero_merges


def ksmd(system: System, started_ns: int = 0) -> dict[str, int]:
    """The scanner process's main loop: scan while run=1, unmerge on run=2, exit on stop.

    ``started_ns`` is the host's time.monotonic_ns() at spawn, to report start-up time.
    """
    get = system.get
    scanner = Scanner(system)
    system.set("scanner_pid", os.getpid())
    if started_ns:
        system.set("scanner_startup_ns", time.monotonic_ns() - started_ns)
    cpu0: float | None = None
    unmerged = False
    host = os.getppid()
    batches = 0
    settle = _settle_key(scanner)
    while not get("scanner_stop"):
        if (requester := get("explain_request")) != get("explain_answer"):
            explain.answer(scanner, system.spec.prefix, requester)
            system.set("explain_answer", requester)
        run = get("run")
        if run == 1:
            if cpu0 is None:
                cpu0 = time.process_time()
            unmerged = False
            full = scanner.full_scans
            scanner.do_scan(max(1, get("pages_to_scan")))
            system.set("scanner_cpu_ns", int((time.process_time() - cpu0) * 1e9))
            if (key := _settle_key(scanner)) != settle:
                settle = key
                system.set("scanner_settled_scan", full + 1)
            batches += 1
            system.set("scanner_batches", batches)
            if scanner.full_scans != full or batches % 16 == 0:
                system.set("scanner_rss_kb", max(get("scanner_rss_kb"), _anon_rss_kb()))
            sleep_ms = get("sleep_millisecs")
            if sleep_ms:
                time.sleep(sleep_ms / 1000)
        elif run == 2 and not unmerged:
            scanner.unmerge_all()
            unmerged = True
            system.set("scanner_unmerges", get("scanner_unmerges") + 1)
        else:
            unmerged = run == 2 and unmerged
            time.sleep(0.005)
        if os.getppid() != host:
            break
    system.set("scanner_pid", 0)
    return {"full_scans": scanner.full_scans, "pages_scanned": scanner.pages_scanned}
