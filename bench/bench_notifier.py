#!/usr/bin/env python3
"""Benchmark of the MMU-notifier path, as ratios against baselines of the same run.

Nothing here is compared with a figure measured elsewhere: each notifier
figure is measured next to a baseline doing the same job on the same machine
in the same run.

Sections::

    a  delivery, one record per emit: a producer process -> main ring -> broker
       -> shadow ring -> the shadow's callbacks, messages per second, vs the
       same number of 4-int tuples put by a producer process and got by a
       consumer process through a multiprocessing.Queue                      (>= 5x)
    b  the same delivery with batching: K records per notify-lock
       acquisition (Notifier.emit_locked under system.locks.notify)          (>= 500,000 msg/s)
    c  ksmd's merge rate with 2 shadow workers registered and reading
       (mode "free") vs with none: the same guests, pages_sharing reached
       per scanner CPU second (and per wall second, for information)        (>= 0.8x)
    d  message lag, max and p99, from the shadows' summaries
       (ShadowMMU.stop()): under a paced load of small bursts, and during
       the merges of section c                                               (p99 < 1 ms)
    e  a start and its end appended as one notified PTE change appends them
       (Notifier.emit_many, era 2012), recorded in the table of open
       invalidations vs the same appends unrecorded, in one process with no
       broker (the ring holds every record of the run)                       (reported)

Method.  Every producer and consumer is its own process, started the same
way (the machine's start method).  The notifier producer emits CHANGE_PTE
records for a registered guest whose shadow entries are not valid, so the
shadow's callbacks only look them up and count them; time runs from the
first emit until the shadow's ``S_MESSAGES`` reaches the count (the producer
polls it with 50 us sleeps).  The queue producer puts ``(word, page, pte,
time.monotonic_ns())`` tuples, the consumer gets and unpacks them; time runs
from the first put to the last get.  Each figure is the median of
``--repeat`` runs, baseline and notifier interleaved.  Section c runs ksmd
until pages_sharing has not changed for 2 full scans and takes the time and
the scanner CPU (``scanner_cpu_ns``) at its last change; both runs must
reach the same pages_sharing.  Saturated runs (a, b) show queueing lag — the
rings hold up to ~100,000 records — so their lag is a detail, not a target.

Run: ``python bench/bench_notifier.py [--quick] [--json FILE] [--only abcde]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.context import BaseContext
from typing import Any

import numpy as np
import numpy.typing as npt
from report import Row, exit_code, print_table, write_json

import shmksm
from shmksm._mm import mmu_notifier as mn
from shmksm._mm.frames import PAGE_SIZE
from shmksm._mm.locks import default_context
from shmksm._mm.system import System

GUEST_PAGES = 4096  # pages of the guest whose records the producers emit
_POLL = 0.00005


@dataclass
class Settings:
    messages: int
    batch: int
    repeat: int
    merge_guests: int
    merge_pages: int
    paced_seconds: float
    era: str


# -- the notifier side -------------------------------------------------------------------------------


def emit_array(system: System, kind: int, gid: int, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> int:
    """Append ``len(a)`` records of one kind and guest with one numpy write; return the first sequence number.

    A producer of records by the thousand (Notifier.emit_many takes a call
    site's few records as tuples), written against the documented ring layout: takes
    the notify lock, waits (without it) while the ring lacks room, writes the
    records with one time stamp, then publishes the head and rings a sleeping
    broker once, as emit_locked does for one record.
    """
    notifier, area = system.notifier, system.notify_area
    cv, v, hi = notifier.cv, notifier.v, notifier.head_index
    n = len(a)
    lock = notifier.lock
    lock.acquire()
    try:
        seq = cv[hi]
        while seq + n - v[mn.H_TAIL] > mn.MAIN_N:
            # wait without the notify lock, as emit_locked does: the broker takes it
            lock.release()
            try:
                v[mn.H_SLEEPING] = 0
                notifier.doorbell()
                time.sleep(0.0001)
            finally:
                lock.acquire()
            seq = cv[hi]
        seqs = np.arange(seq, seq + n, dtype=np.int64)
        recs = np.empty((n, mn.REC), np.int64)
        recs[:, 0] = kind | gid << 8 | seqs << 24
        recs[:, 1] = a
        recs[:, 2] = b
        recs[:, 3] = time.monotonic_ns()
        area.ring[seqs % mn.MAIN_N] = recs
        cv[hi] = seq + n
        if v[mn.H_SLEEPING]:
            v[mn.H_SLEEPING] = 0
            notifier.doorbell()
        return int(seq)
    finally:
        lock.release()


def produce(system: System, gid: int, slot: int, count: int, batch: int, many: bool = False) -> tuple[int, int]:
    """Producer process: emit ``count`` CHANGE_PTE records of guest ``gid``, ``batch`` per lock hold.

    ``many``: each batch with :func:`emit_array` instead of emit_locked per record.
    Returns (first emit, shadow ``slot`` has run them all) in time.monotonic_ns().
    """
    notifier = system.notifier
    v = system.notify_area.v
    messages = system.notify_area.slot_base(slot) + mn.S_MESSAGES
    want = v[messages] + count
    pages = system.table(gid).pages
    t0 = time.monotonic_ns()
    if batch <= 1:
        emit, kind = notifier.emit, mn.CHANGE_PTE
        for i in range(count):
            emit(kind, gid, i % pages, 0)
    elif many:
        zeros = np.zeros(batch, np.int64)
        for first in range(0, count, batch):
            k = min(batch, count - first)
            emit_array(system, mn.CHANGE_PTE, gid, np.arange(first, first + k, dtype=np.int64) % pages, zeros[:k])
    else:
        lock, emit_locked = system.locks.notify, notifier.emit_locked
        for first in range(0, count, batch):
            lock.acquire()
            try:
                for i in range(first, min(first + batch, count)):
                    emit_locked(mn.CHANGE_PTE, gid, i % pages, 0)
            finally:
                lock.release()
    while v[messages] < want:
        time.sleep(_POLL)
    return t0, time.monotonic_ns()


def produce_paced(system: System, gid: int, seconds: float, burst: int, period: float) -> int:
    """Producer process: ``burst`` records every ``period`` seconds for ``seconds``; return records emitted."""
    notifier = system.notifier
    lock, emit_locked = system.locks.notify, notifier.emit_locked
    pages = system.table(gid).pages
    n = 0
    start = time.monotonic()
    next_at = start
    while next_at - start < seconds:
        lock.acquire()
        try:
            for _ in range(burst):
                emit_locked(mn.CHANGE_PTE, gid, n % pages, 0)
                n += 1
        finally:
            lock.release()
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return n


def notifier_rates(s: Settings, batch: int, ctx: BaseContext, many: bool = False) -> tuple[list[float], dict[str, Any]]:
    """Messages per second through the notifier, ``s.repeat`` runs; and the shadow's summary."""
    with shmksm.Machine(frames=GUEST_PAGES + 64, ksmd=False, ctx=ctx) as machine:
        guest = machine.add_guest(pages=GUEST_PAGES)
        shadow = machine.add_shadow([guest])
        shadow.sync()
        rates = []
        for _ in range(s.repeat):
            t0, t1 = machine.spawn(produce, None, guest.id, shadow.slot, s.messages, batch, many).join(120)
            rates.append(s.messages / ((t1 - t0) / 1e9))
        summary = shadow.stop()
        machine.check()
    return rates, summary


# -- the multiprocessing.Queue baseline -----------------------------------------------------------------


def _queue_producer(q: Any, go: Any, out: Any, count: int) -> None:
    go.wait()
    t0 = time.monotonic_ns()
    put, kind, now = q.put, mn.CHANGE_PTE, time.monotonic_ns
    for i in range(count):
        put((kind, i % GUEST_PAGES, 0, now()))
    out.put(("t0", t0))


def _queue_consumer(q: Any, ready: Any, out: Any, count: int) -> None:
    ready.set()
    get = q.get
    for _ in range(count):
        _word, _page, _pte, _t = get()
    out.put(("t1", time.monotonic_ns()))


def queue_rate(count: int, ctx: BaseContext) -> float:
    """Messages per second from a producer process to a consumer process through multiprocessing.Queue."""
    q, out = ctx.Queue(), ctx.SimpleQueue()
    go, ready = ctx.Event(), ctx.Event()
    consumer = ctx.Process(target=_queue_consumer, args=(q, ready, out, count))  # type: ignore[attr-defined]
    producer = ctx.Process(target=_queue_producer, args=(q, go, out, count))  # type: ignore[attr-defined]
    consumer.start()
    producer.start()
    ready.wait(60)
    go.set()
    got = dict(out.get() for _ in range(2))
    producer.join()
    consumer.join()
    q.close()
    return float(count / ((got["t1"] - got["t0"]) / 1e9))


def bench_delivery(s: Settings, ctx: BaseContext) -> tuple[list[Row], list[Row]]:
    """Sections a and b, interleaved with the queue baseline; rows and their lag rows."""
    summaries: dict[str, dict[str, Any]] = {}
    queue = [queue_rate(s.messages, ctx)]
    single, summaries["a"] = notifier_rates(s, 1, ctx)
    queue.append(queue_rate(s.messages, ctx))
    batched, summaries["b"] = notifier_rates(s, s.batch, ctx)
    queue.append(queue_rate(s.messages, ctx))
    numpy_batched, summaries["b.many"] = notifier_rates(s, s.batch, ctx, many=True)
    q, one, many = statistics.median(queue), statistics.median(single), statistics.median(batched)
    fused = statistics.median(numpy_batched)
    ratio = one / q
    rows = [
        Row("a", "notifier delivery, 1 record per emit, vs multiprocessing.Queue", ratio, "x", q, ">= 5x",
            ratio >= 5.0, f"{one:,.0f} vs {q:,.0f} msg/s; {s.messages:,} msgs, median of {len(single)}"),
        Row("b", f"notifier delivery, {s.batch} records per notify-lock hold", many, "msg/s", q,
            ">= 500k/s", many >= 500_000, f"{many / q:.1f}x the queue; median of {len(batched)}"),
        Row("b.many", f"the same, {s.batch} records per numpy write (a numpy batch producer)", fused, "msg/s", q,
            ">= 500k/s", fused >= 500_000, f"{fused / q:.1f}x the queue; median of {len(numpy_batched)}"),
    ]
    lag = [Row(f"d.{k}", f"lag while saturated by {k} (queueing: a detail)", summaries[k]["lag_p99_us"], "us",
               None, "", None, f"max {summaries[k]['lag_max_us']:,.0f} us; {summaries[k]['messages']:,} msgs")
           for k in ("a", "b", "b.many")]
    return rows, lag


def bench_paced(s: Settings, ctx: BaseContext, burst: int = 64, period: float = 0.001) -> list[Row]:
    """Section d: two idle shadows, a producer emitting small bursts at a steady rate."""
    with shmksm.Machine(frames=GUEST_PAGES + 64, ksmd=False, ctx=ctx) as machine:
        guest = machine.add_guest(pages=GUEST_PAGES)
        shadows = [machine.add_shadow([guest]) for _ in range(2)]
        for sh in shadows:
            sh.sync()
        t0 = time.perf_counter()
        n = machine.spawn(produce_paced, None, guest.id, s.paced_seconds, burst, period).join(60)
        wall = time.perf_counter() - t0
        for sh in shadows:
            sh.sync()
        summaries = [sh.stop() for sh in shadows]
        machine.check()
    p99 = max(x["lag_p99_us"] for x in summaries)
    worst = max(x["lag_max_us"] for x in summaries)
    return [Row("d.paced", f"lag p99, 2 shadows, bursts of {burst} every {period * 1e3:g} ms", p99, "us", None,
                "< 1000 us", p99 < 1000, f"max {worst:,.0f} us; {n:,} msgs in {wall:.1f} s to each shadow")]


# -- section c: ksmd's merge rate with and without shadows --------------------------------------------------


def fill_duplicates(view: shmksm.GuestView, pages: int, seed: int) -> int:
    """Odd pages hold one of 8 shared patterns, even pages are unique; all mergeable."""
    patterns = np.random.default_rng([seed, 1 << 20]).integers(0, 256, (8, PAGE_SIZE), dtype=np.uint8)
    rng = np.random.default_rng([seed, view.gid])
    for i in range(pages):
        view.write(i * PAGE_SIZE, patterns[i % 8] if i % 2 else rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8))
    view.madvise(0, pages * PAGE_SIZE, shmksm.MADV_MERGEABLE)
    return pages


def merge_run(s: Settings, shadows: int, ctx: BaseContext) -> dict[str, Any]:
    """ksmd merges the same guests, with ``shadows`` free-reading shadow workers; return its figures."""
    pages = s.merge_pages
    with shmksm.Machine(frames=s.merge_guests * pages + 64, ctx=ctx, pages_to_scan=1000,
                        sleep_millisecs=0, notifier_era=s.era) as machine:
        guests = [machine.add_guest(pages=pages) for _ in range(s.merge_guests)]
        for filler in [machine.spawn(fill_duplicates, g, pages, 7) for g in guests]:
            filler.join(120)
        mmus = [machine.add_shadow(guests, mode="free") for _ in range(shadows)]
        for sh in mmus:
            sh.sync()
        system = machine.system
        t0 = time.perf_counter()
        machine.ksm.run = 1
        last, last_scan, reached = -1, 0, (0.0, 0)
        while True:
            time.sleep(0.002)
            sharing, scans = system.get("pages_sharing"), system.get("full_scans")
            if sharing != last:
                last, last_scan = sharing, scans
                reached = (time.perf_counter() - t0, system.get("scanner_cpu_ns"))
            if scans - last_scan >= 2 or time.perf_counter() - t0 > 300:
                break
        machine.ksm.run = 0
        summaries = [sh.stop() for sh in mmus]
        delivered = int(system.notify_area.v[mn.H_DELIVERED])
        machine.check()
    return {"pages_sharing": last, "wall": reached[0], "cpu": reached[1] / 1e9, "summaries": summaries,
            "delivered": delivered, "reads": sum(x["reads"] for x in summaries),
            "faults": sum(x["faults"] for x in summaries)}


def bench_merge(s: Settings, ctx: BaseContext) -> list[Row]:
    """Section c, and the lag during its merges (d.merge)."""
    runs: dict[int, list[dict[str, Any]]] = {0: [], 2: []}
    for _ in range(s.repeat):
        for n in (0, 2):
            runs[n].append(merge_run(s, n, ctx))
    same = {r["pages_sharing"] for rs in runs.values() for r in rs}
    cpu = {n: statistics.median(r["pages_sharing"] / r["cpu"] for r in rs) for n, rs in runs.items()}
    wall = {n: statistics.median(r["pages_sharing"] / r["wall"] for r in rs) for n, rs in runs.items()}
    ratio = cpu[2] / cpu[0]
    with_shadows = runs[2][-1]
    p99 = max(x["lag_p99_us"] for r in runs[2] for x in r["summaries"])
    worst = max(x["lag_max_us"] for r in runs[2] for x in r["summaries"])
    pages = s.merge_guests * s.merge_pages
    return [
        Row("c", f"ksmd merge rate (per scanner CPU s), 2 free shadows vs none, era {s.era}", ratio, "x", cpu[0],
            ">= 0.8x",
            ratio >= 0.8 and len(same) == 1,
            f"{cpu[2]:,.0f} vs {cpu[0]:,.0f} pages_sharing/CPU s; {pages:,} pages, pages_sharing {sorted(same)}"),
        Row("c.wall", "ksmd merge rate (per wall s), 2 free shadows vs none", wall[2] / wall[0], "x", wall[0],
            "", None, f"{wall[2]:,.0f} vs {wall[0]:,.0f} pages_sharing/s on {os.cpu_count()} CPUs; shadows "
            f"read {with_shadows['reads']:,} pages, {with_shadows['faults']:,} faults"),
        Row("d.merge", "lag p99 during those merges (2 free shadows)", p99, "us", None, "< 1000 us", p99 < 1000,
            f"max {worst:,.0f} us; {with_shadows['delivered']:,} msgs delivered"),
    ]


def bench_open_record(s: Settings, pairs: int = 1000, rounds: int = 12) -> list[Row]:
    """Section e: a start and its end appended, recorded as open and closed, vs unrecorded; minimums of
    ``rounds`` interleaved runs of ``pairs`` pairs each."""
    start, end = ((mn.RANGE_START, 1, 2),), ((mn.RANGE_END, 1, 2),)
    times: dict[bool, list[float]] = {False: [], True: []}
    with shmksm.Machine(frames=64, ksmd=False, notifier_era="2012") as machine:
        gid = machine.add_guest(pages=8).id
        notifier = machine.system.notifier
        for _ in range(rounds if s.repeat > 1 else 2):
            for recorded in (False, True):
                t = time.perf_counter()
                for _ in range(pairs):
                    notifier.emit_many(start, gid, opening=int(recorded))
                    notifier.emit_many(end, gid, closing=recorded)
                times[recorded].append((time.perf_counter() - t) / pairs * 1e6)
    plain, recorded = min(times[False]), min(times[True])
    return [Row("e", "a start and its end appended, recorded as open vs unrecorded", recorded / plain, "x", plain,
                note=f"{recorded:.2f} us against {plain:.2f} us")]


# -- report -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE ('-' for stdout)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller runs: a smoke run, not a measurement")
    parser.add_argument("--only", default="abcde", help="sections to run, e.g. 'ab' (default: all)")
    parser.add_argument("--messages", type=int, help="messages per delivery run (default 300000; quick 50000)")
    parser.add_argument("--batch", type=int, default=64, help="records per notify-lock hold in b (default 64)")
    parser.add_argument("--repeat", type=int, help="runs per figure (default 3; quick 1)")
    parser.add_argument("--era", default="2024", choices=mn.ERAS, help="notifier era of section c (default 2024)")
    args = parser.parse_args(argv)
    if args.quick:
        s = Settings(messages=50_000, batch=args.batch, repeat=1, merge_guests=2, merge_pages=2048,
                     paced_seconds=0.5, era=args.era)
    else:
        s = Settings(messages=300_000, batch=args.batch, repeat=3, merge_guests=4, merge_pages=8192,
                     paced_seconds=2.0, era=args.era)
    if args.messages:
        s.messages = args.messages
    if args.repeat:
        s.repeat = args.repeat
    ctx = default_context()
    only = set(args.only)
    load0 = os.getloadavg()[0]
    rows: list[Row] = []
    if only & {"a", "b"}:
        delivery, lag = bench_delivery(s, ctx)
        rows += delivery + (lag if "d" in only else [])
    if "d" in only:
        rows += bench_paced(s, ctx)
    if "c" in only:
        merge = bench_merge(s, ctx)
        rows += [r for r in merge if "d" in only or not r.key.startswith("d")]
    if "e" in only:
        rows += bench_open_record(s)
    rows.sort(key=lambda r: r.key)
    load = (load0, os.getloadavg()[0])
    print(f"shmksm {shmksm.__version__}, Python {platform.python_version()}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"start method {ctx.get_start_method()}, load average {load[0]:.1f} at start, {load[1]:.1f} at end")
    print_table(rows)
    if args.json:
        doc = {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
               "load_average": load, "settings": asdict(s), "rows": [asdict(r) for r in rows]}
        write_json(args.json, doc)
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
