"""Scanner entry point: ksmd, the process that merges identical pages.

The host starts it with ``machine.start_ksmd()``, one process per scanner
(the ``scanners`` knob).  It scans while the ``run`` knob is 1, unmerges
everything once when it becomes 2, idles at 0 (still doing the puts that
write faults deferred, see frames.Frames.defer_put), and exits when the host sets
``scanner_stop`` or dies, or when ``scanners`` drops to its index or below.
Small batches with a sleep between them are run a few back to back per
wake-up, scanned as one (Scanner.do_scan_batches), with their sleeps taken
together (:func:`batches_per_wake`).
It reports its CPU time (from its first batch, as the kernel's ksmd is
counted from ``run=1``), its start-up time (spawn to ready) and the peak of
its private resident memory (RssAnon, sampled every 16 batches and at every
full scan) in its entry of the control segment, folded with the other
scanners' into the named words.
"""

from __future__ import annotations

import os
import time

from shmksm._ksm import explain
from shmksm._ksm.scanner import Scanner
from shmksm._mm.system import System

WAKE_PAGES = 1000  # pages a wake-up of ksmd scans at least, in batches of pages_to_scan (see batches_per_wake)
MAX_WAKE_MILLISECS = 200  # ... unless that would space the wake-ups further apart
WAIT_SECONDS = 0.001  # a scanner ahead of the others looks again this often (with sleep_millisecs 0)


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


def batches_per_wake(pages_to_scan: int, sleep_millisecs: int) -> int:
    """Batches ksmd runs back to back each time it wakes, then sleeping as long as their sleeps.

    The kernel's ksmd sleeps ``sleep_millisecs`` after each batch of
    ``pages_to_scan`` pages.  Here a small batch costs much more per page
    than a large one: each wake-up meets cold caches, every distinct numpy
    operation then costs tens of microseconds whatever its size, and a
    small batch merges page by page where a large one merges a run of pages
    under one lock.  So small batches are run a few in a row — enough for
    WAKE_PAGES pages, the wake-ups no more than MAX_WAKE_MILLISECS apart —
    scanned as one (Scanner.do_scan_batches: the pages the batches would
    scan, split where a full scan ends as theirs are), and ksmd then sleeps
    their sleeps at once: the same batches, the same pages per second,
    counted batch by batch; only the instants at which they run are grouped.
    """
    if not sleep_millisecs:
        return 1
    return max(1, min(MAX_WAKE_MILLISECS // sleep_millisecs, -(-WAKE_PAGES // pages_to_scan)))


def _settle_key(scanner: Scanner) -> tuple[int, int, int]:
    """What the scanner's merging changes: the full scan it last changed in is where it settled."""
    return scanner.pages_shared, scanner.pages_sharing, scanner.zero_merges


def ksmd(system: System, started_ns: int = 0, index: int = 0) -> dict[str, int]:
    """Scanner ``index``'s main loop: scan while run=1, unmerge on run=2, exit on stop.

    ``started_ns`` is the host's time.monotonic_ns() at spawn, to report start-up time.
    """
    get = system.get
    scanner = Scanner(system, index, pid=os.getpid())
    own = scanner.words
    if started_ns:
        own.set("scanner_startup_ns", time.monotonic_ns() - started_ns)
    own.fold()
    cpu0: float | None = None
    unmerged = False
    host = os.getppid()
    batches = 0
    settle = _settle_key(scanner)
    drain_deferred = system.frames.drain_deferred
    while not get("scanner_stop") and index < get("scanners"):
        # The puts that mitigation "vusion"'s write faults left, out of the
        # faults' time; their CPU is ksmd's, also while it idles.
        if drain_deferred() and cpu0 is not None:
            own.set("scanner_cpu_ns", int((time.process_time() - cpu0) * 1e9))
            own.fold()
        if (request := get("explain_request")) != own.get("explain_answer"):
            explain.answer(scanner, system.spec.prefix, request)
            own.set("explain_answer", request)
        run = get("run")
        if run == 1:
            if cpu0 is None:
                cpu0 = time.process_time()
            unmerged = False
            sleep_ms = get("sleep_millisecs")
            pages = max(1, get("pages_to_scan"))
            wake = left = batches_per_wake(pages, sleep_ms)
            while left:
                full = scanner.full_scans
                ran = scanner.do_scan_batches(pages, left)
                if scanner.waiting:
                    break
                if (key := _settle_key(scanner)) != settle:
                    settle = key
                    # Counted as full_scans counts: a scanner ahead of the others
                    # merging what they handed it changes the counters in the
                    # full scan they are in, not in its own later one.
                    own.set("scanner_settled_scan", own.slowest_full_scans(full) + 1)
                left -= ran
                batches += ran
                if scanner.full_scans != full or batches // 16 != (batches - ran) // 16:
                    own.set("scanner_rss_kb", max(own.get("scanner_rss_kb"), _anon_rss_kb()))
            own.set("scanner_batches", batches)
            own.set("scanner_cpu_ns", int((time.process_time() - cpu0) * 1e9))
            scanner.publish()
            if sleep_ms:
                time.sleep(wake * sleep_ms / 1000)
            elif scanner.waiting:
                time.sleep(WAIT_SECONDS)
        elif run == 2 and not unmerged:
            scanner.unmerge_all()
            unmerged = True
            own.set("scanner_unmerges", own.get("scanner_unmerges") + 1)
            own.fold()
        else:
            unmerged = run == 2 and unmerged
            time.sleep(0.005)
        if os.getppid() != host:
            break
    own.set("scanner_pid", 0)
    own.fold()
    return {"full_scans": scanner.full_scans, "pages_scanned": scanner.pages_scanned}
