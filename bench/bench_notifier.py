#!/usr/bin/env python3
"""What recording open invalidations costs a notified PTE change.

Every invalidation a producer starts is recorded as open until its end
(shmksm._mm.mmu_notifier: the table of open invalidations, for recovery to
end those of a killed producer).  Timed here: appending a start record and
its end record to the notifier ring, as ``begin_change``/``end_change`` do
for one PTE in era 2012, recorded (``opening``/``closing``) against the same
two appends unrecorded, interleaved, in one process, with no broker running
(the ring holds every record of the run).  Printed: the minimum and the
median over the repetitions, per pair, and their ratio.

    python bench/bench_notifier.py [--repeat 12] [--pairs 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import shmksm
from shmksm._mm import mmu_notifier as mn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--pairs", type=int, default=1000)
    a = ap.parse_args()
    if not 0 < a.repeat * a.pairs * 2 < mn.MAIN_N:
        print(f"error: --repeat x --pairs x 2 must stay below the ring's {mn.MAIN_N} records", file=sys.stderr)
        return 2
    start, end = ((mn.RANGE_START, 1, 2),), ((mn.RANGE_END, 1, 2),)
    times: dict[str, list[float]] = {"unrecorded": [], "recorded": []}
    with shmksm.Machine(frames=64, ksmd=False, notifier_era="2012") as machine:
        gid = machine.add_guest(pages=8).id
        notifier = machine.system.notifier
        for _ in range(a.repeat):
            for name, opening, closing in (("unrecorded", 0, False), ("recorded", 1, True)):
                t = time.perf_counter()
                for _ in range(a.pairs):
                    notifier.emit_many(start, gid, opening=opening)
                    notifier.emit_many(end, gid, closing=closing)
                times[name].append((time.perf_counter() - t) / a.pairs * 1e6)
    load = os.getloadavg()[0]
    for name, ts in times.items():
        print(f"{name:>10}: a start and its end appended in {min(ts):.3f} us (median {statistics.median(ts):.3f})")
    print(f"recorded / unrecorded: {min(times['recorded']) / min(times['unrecorded']):.2f}x (minimums; "
          f"1-min load average {load:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
