"""Parallel scanners (shmksm's own ``scanners`` knob): the counters converge to the one-scanner values.

Each scanner process merges the pages it owns — those whose content
fingerprint routes to it, or with merge_across_nodes=0 and enough nodes,
those of its nodes — on trees of its own; identical pages always have the
same owner, so the counters converge to the ideal by the same full scan as
one scanner's or the next.  The tests here check that against the ideal and
against one scanner, with guests writing (copy-on-write breaks), unmerging,
and a scanner killed and restarted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import FAST, advise, assert_data, content, fill, ideal, ksm_mappings, start_ksmd, wait_until
from shmksm.workers import guest_random

import shmksm
from shmksm import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE
from shmksm._ksm.scanner import Scanner, ScannerWords
from shmksm._mm import control
from shmksm._mm.locks import process_state
from shmksm.tool.images import Mix, write_mix
from shmksm.tool.images import ideal as ideal_of_images
from shmksm.tool.runner import run_images

MIX = Mix(common=600, zero=100, unique=150, intra=300, intra_distinct=20)


def keys_for(nguests: int, pages: int, seed: int) -> list[list[int]]:
    """Page contents per guest: most drawn from 40 shared contents, some unique to the guest."""
    rng = np.random.default_rng(seed)
    return [[int(k) for k in rng.integers(100, 140, pages - pages // 4)]
            + [10_000 * (g + 1) + i for i in range(pages // 4)] for g in range(nguests)]


@contextlib.contextmanager
def filled(keys: list[list[int]], **options: int) -> Iterator[shmksm.Machine]:
    """A machine of ``options`` whose guest g holds pages of contents ``keys[g]``; run=1 is set."""
    with shmksm.Machine(**options) as machine:
        guests = [machine.add_guest(pages=len(k)) for k in keys]
        for g, k in zip(guests, keys, strict=True):
            machine.spawn(fill, g, k).join(60)
        machine.ksm.run = 1
        yield machine


@pytest.mark.parametrize("sleep_millisecs", [0, 5])
def test_two_scanners_reach_the_ideal_by_the_same_full_scan_or_the_next(tmp_path: object,
                                                                      sleep_millisecs: int) -> None:
    paths = write_mix(str(tmp_path), 4, MIX)
    best = ideal_of_images(paths)
    knobs = {"pages_to_scan": 400, "sleep_millisecs": sleep_millisecs}
    one = run_images(paths, knobs=knobs)
    two = run_images(paths, knobs={**knobs, "scanners": 2})
    for r in (one, two):
        assert (r["ksm"]["pages_shared"], r["ksm"]["pages_sharing"]) == (best.pages_shared, best.pages_sharing)
    settled = ("pages_shared", "pages_sharing", "ksm_zero_pages", "stable_node_chains", "stable_node_dups")
    assert {k: two["ksm"][k] for k in settled} == {k: one["ksm"][k] for k in settled}
    # which unique pages sit on an unstable tree depends on where smart_scan's skips are; not their sum
    assert (two["ksm"]["pages_unshared"] + two["ksm"]["pages_volatile"]
            == one["ksm"]["pages_unshared"] + one["ksm"]["pages_volatile"])
    assert two["converged"]["full_scans"] <= one["converged"]["full_scans"] + 1
    assert [s["ksm_merging_pages"] for s in two["ksm_stat"]] == [s["ksm_merging_pages"] for s in one["ksm_stat"]]


def test_each_scanner_merges_a_share_of_the_pages() -> None:
    keys = keys_for(2, 800, 3)
    with filled(keys, frames=4096, scanners=2, **FAST) as machine:
        c = machine.wait_converged(timeout=120)
        assert (c["pages_shared"], c["pages_sharing"]) == ideal([k for ks in keys for k in ks], 256)
        workers = machine.scanner_workers()
        assert [w.name for w in workers] == ["ksmd", "ksmd1"] and all(w.is_alive() for w in workers)
        shares = machine.ksm.per_scanner("pages_sharing")
        assert len(shares) == 2 and sum(shares) == c["pages_sharing"] and min(shares) > 0, shares
        assert sum(machine.ksm.per_scanner("rmap_items")) == machine.system.get("rmap_items")
        assert min(machine.ksm.per_scanner("scanner_cpu_ns")) > 0
        machine.check()


def test_one_scanner_per_node_without_merging_across_nodes() -> None:
    layout = [(0, list(range(1, 41))), (1, list(range(1, 41))), (0, list(range(1, 41))), (1, list(range(21, 61)))]
    with shmksm.Machine(frames=1024, nodes=2, scanners=2, merge_across_nodes=0, **FAST) as machine:
        guests = [machine.add_guest(pages=40, node=node) for node, _ in layout]
        for g, (_, k) in zip(guests, layout, strict=True):
            machine.spawn(fill, g, k).join(60)
        machine.ksm.run = 1
        c = machine.wait_converged(timeout=120)
        # node 0: contents 1..40 twice; node 1: 21..40 twice, 1..20 and 41..60 once
        assert (c["pages_shared"], c["pages_sharing"]) == (40 + 20, 40 + 20)
        machine.check()


@contextlib.contextmanager
def two_scanners_merging(nguests: int, pages: int) -> Iterator[tuple[shmksm.Machine, list[shmksm.Guest]]]:
    """A machine of two scanners merging ``nguests`` mergeable guests of ``pages`` pages, empty so far.

    smart_scan off: pages written often reach high ages, and skip_age then
    looks at each only every 9th pass, in phases of its own, so two copies of
    one content may not meet in a pass for long (the kernel's smart_scan does
    the same).  What the tests using it test is the scanners' partition.
    """
    with shmksm.Machine(frames=nguests * pages * 3, ksmd=False, scanners=2, pages_to_scan=64,
                        sleep_millisecs=0, smart_scan=0) as machine:
        guests = [machine.add_guest(pages=pages) for _ in range(nguests)]
        for g in guests:
            machine.spawn(advise, g, 0, pages, MADV_MERGEABLE).join(60)
        start_ksmd(machine)
        machine.ksm.run = 1
        yield machine, guests


def test_guests_write_and_unmerge_while_two_scanners_merge() -> None:
    nguests, pages = 3, 128
    keys = keys_for(nguests, pages, 7)
    with two_scanners_merging(nguests, pages) as (machine, guests):
        # copy-on-write breaks: every guest writes at random over its pages while both scanners merge
        workers = [machine.spawn(guest_random.run, g, 200 + i, 1.5) for i, g in enumerate(guests)]
        assert [w.join(60) for w in workers] == [0] * nguests, "a guest read back something it did not write"
        assert machine.system.get("cow_ksm") > 0, "no write ever hit a merged page: the race was not exercised"
        machine.check()
        # new contents everywhere, then unmerge a range of one guest while merging goes on
        for g, k in zip(guests, keys, strict=True):
            machine.spawn(fill, g, k, "none").join(60)
        machine.spawn(advise, guests[0], 0, pages // 2, MADV_UNMERGEABLE).join(60)
        c = machine.wait_converged(timeout=120)
        merged = [k for i, ks in enumerate(keys) for p, k in enumerate(ks) if i or p >= pages // 2]
        assert (c["pages_shared"], c["pages_sharing"]) == ideal(merged, 256)
        assert ksm_mappings(machine) == (c["pages_shared"], c["pages_shared"] + c["pages_sharing"])
        for g, k in zip(guests, keys, strict=True):
            assert_data(g, k)
        # run=2 with two scanners: every KSM mapping broken, the counters back to 0
        machine.ksm.run = 2
        assert ksm_mappings(machine) == (0, 0)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (0, 0, 0)
        machine.check()


def test_a_killed_scanner_restarted_converges_to_the_ideal() -> None:
    nguests, pages, m = 4, 1000, 64
    keys = keys_for(nguests, pages, 5)
    want = ideal([k for ks in keys for k in ks], m)
    with shmksm.Machine(frames=nguests * pages * 2, ksmd=False, scanners=2, pages_to_scan=16, sleep_millisecs=0,
                        max_page_sharing=m) as machine:
        guests = [machine.add_guest(pages=pages) for _ in range(nguests)]
        for w in [machine.spawn(fill, g, k) for g, k in zip(guests, keys, strict=True)]:
            w.join(60)
        start_ksmd(machine)
        machine.ksm.run = 1
        # Looked at every millisecond: a full scan takes about a hundred, and the kill must come mid-way.
        deadline = time.monotonic() + 60
        while machine.ksm.pages_sharing < want[1] // 4:
            assert time.monotonic() < deadline, "the scanners did not start merging"
            time.sleep(0.001)
        victim = machine.scanner_workers()[1]
        victim.kill()
        assert machine.ksm.pages_sharing < want[1], "killed before it was done"
        wait_until(lambda: any(d.pid == victim.pid for d in machine.deaths), 30, "the host to record the death")
        death = next(d for d in machine.deaths if d.pid == victim.pid)
        assert (death.name, death.signal) == ("ksmd1", signal.SIGKILL)
        assert machine.scanner_workers()[0].is_alive()
        machine.check()
        machine.start_ksmd()  # restarts the dead one only
        assert [w.is_alive() for w in machine.scanner_workers()] == [True, True]
        wait_until(lambda: (machine.ksm.pages_shared, machine.ksm.pages_sharing) == want, 60,
                   f"the restarted scanner to reach {want}")
        machine.wait_full_scans(2)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == want
        assert ksm_mappings(machine) == (want[0], want[0] + want[1])
        machine.check()
        for g, k in zip(guests, keys, strict=True):
            assert_data(g, k)


def test_wait_converged_waits_for_a_restarted_scanner_to_show() -> None:
    """Until a scanner's pid shows in its entry the others neither wait for it nor count it:
    full scans pass without its pages, and counters still there would look settled."""
    with shmksm.Machine(frames=4096, ksmd=False, scanners=2, pages_to_scan=64, sleep_millisecs=0) as machine:
        g = machine.add_guest(pages=256)
        machine.spawn(fill, g, [1 + i % 8 for i in range(256)]).join(60)
        start_ksmd(machine)
        machine.ksm.run = 1
        machine.wait_converged(timeout=60)
        word = control.scanner_word(0, "scanner_pid")
        pid = int(machine.system.ctl[word])
        assert pid == machine.scanner_workers()[0].pid
        # As an older scanner's dead pid stays in the entry while its successor starts up.
        machine.system.ctl[word] = 2 ** 22 + 1
        try:
            with pytest.raises(shmksm.ProcessDied, match="did not start"):
                machine.wait_converged(timeout=0.3)
        finally:
            machine.system.ctl[word] = pid
        assert machine.wait_converged(timeout=60)["pages_sharing"] > 0


def test_a_scanner_killed_while_guests_write_restarts_and_converges_to_the_ideal() -> None:
    """The kill lands amid copy-on-write breaks: the surviving scanner goes on, the restarted one starts
    from empty trees beside the dead one's KSM pages; then an unmerge, and both reach the ideal."""
    nguests, pages = 3, 128
    keys = keys_for(nguests, pages, 13)
    with two_scanners_merging(nguests, pages) as (machine, guests):
        workers = [machine.spawn(guest_random.run, g, 300 + i, 2.0) for i, g in enumerate(guests)]
        wait_until(lambda: machine.ksm.pages_sharing > 0, 60, "the scanners to merge")
        victim = machine.scanner_workers()[1]
        victim.kill()
        wait_until(lambda: any(d.pid == victim.pid for d in machine.deaths), 30, "the host to record the death")
        assert any(w.is_alive() for w in workers), "the guests stopped writing before the kill"
        machine.start_ksmd()  # restarts the dead one only, while the guests still write
        assert [w.join(60) for w in workers] == [0] * nguests, "a guest read back something it did not write"
        assert machine.system.get("cow_ksm") > 0, "no write ever hit a merged page: the race was not exercised"
        machine.check()
        for g, k in zip(guests, keys, strict=True):
            machine.spawn(fill, g, k, "none").join(60)
        machine.spawn(advise, guests[1], pages // 4, pages // 2, MADV_UNMERGEABLE).join(60)
        c = machine.wait_converged(timeout=120)
        merged = [k for i, ks in enumerate(keys) for p, k in enumerate(ks)
                  if i != 1 or not pages // 4 <= p < pages // 4 + pages // 2]
        assert (c["pages_shared"], c["pages_sharing"]) == ideal(merged, 256)
        assert ksm_mappings(machine) == (c["pages_shared"], c["pages_shared"] + c["pages_sharing"])
        assert [w.is_alive() for w in machine.scanner_workers()] == [True, True]
        for g, k in zip(guests, keys, strict=True):
            assert_data(g, k)
        machine.check()


def test_changing_the_number_of_scanners_keeps_the_counters() -> None:
    keys = keys_for(2, 600, 11)
    want = ideal([k for ks in keys for k in ks], 256)
    with shmksm.Machine(frames=4096, **FAST) as machine:
        guests = [machine.add_guest(pages=600) for _ in keys]
        for g, k in zip(guests, keys, strict=True):
            machine.spawn(fill, g, k).join(60)
        machine.ksm.run = 1
        c = machine.wait_converged(timeout=120)
        assert (c["pages_shared"], c["pages_sharing"]) == want
        for n in (2, 3, 1):
            machine.ksm.scanners = n
            assert machine.ksm.scanners == n
            wait_until(lambda n=n: sum(w.is_alive() for w in machine.scanner_workers()) == n, 30,  # type: ignore[misc]
                       f"{n} scanners to run")
            machine.wait_full_scans(3, timeout=120)
            c = machine.wait_converged(timeout=120)
            assert (c["pages_shared"], c["pages_sharing"]) == want, n
        machine.check()


@pytest.mark.parametrize("bad", [0, 17, -1, "many"])
def test_bad_scanner_counts_are_refused(bad: object) -> None:
    with pytest.raises(shmksm.KnobError, match="scanners"):
        shmksm.Machine(frames=64, ksmd=False, scanners=bad)


def test_guests_read_what_they_wrote_with_three_scanners() -> None:
    with shmksm.Machine(frames=2048, scanners=3, **FAST) as machine:
        guests = [machine.add_guest(pages=200) for _ in range(3)]
        for g in guests:
            machine.spawn(fill, g, [1 + p % 50 for p in range(200)]).join(60)
        machine.ksm.run = 1
        c = machine.wait_converged(timeout=120)
        assert (c["pages_shared"], c["pages_sharing"]) == (50, 550)
        view = guests[1].view()
        assert view.read(7 * PAGE_SIZE, PAGE_SIZE) == content(8)
        machine.check()


def test_scanners_go_from_one_full_scan_to_the_next_together() -> None:
    # Most pages are empty: one content, so one scanner owns most of the work.
    # The other, done with its part of each pass first, waits for it instead of
    # scanning its settled pages again: their full scans never drift apart.
    keys = [[0] * 3072 + [10_000 * (g + 1) + i for i in range(1024)] for g in range(2)]
    with filled(keys, frames=16384, scanners=2, pages_to_scan=1024, sleep_millisecs=0) as machine:
        spread = 0
        deadline = time.monotonic() + 60
        while min(counts := machine.ksm.per_scanner("full_scans")) < 12 and time.monotonic() < deadline:
            spread = max(spread, max(counts) - min(counts))
            time.sleep(0.001)
        assert min(machine.ksm.per_scanner("full_scans")) >= 12
        assert spread <= 1
        c = machine.wait_converged(timeout=120)
        assert (c["pages_shared"], c["pages_sharing"]) == ideal([k for ks in keys for k in ks], 256)
        machine.check()


def stop_holding_no_lock(machine: shmksm.Machine, pid: int) -> None:
    """SIGSTOP ``pid`` at an instant it holds no lock: a stopped holder keeps its lock (locks.py),
    and everyone who needs it waits, the other scanners too."""
    locks = machine.system.locks.in_order()
    for _ in range(1000):
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: "(T" in process_state(pid), 10, "the scanner to stop")
        if not any(lock.holder() == pid for lock in locks):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.001)
    pytest.fail(f"pid {pid} held a lock at each of 1000 stops")


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_scanner_does_not_wait_for_a_stopped_or_killed_one_for_good(how: str) -> None:
    keys = keys_for(2, 400, 9)
    with filled(keys, frames=4096, scanners=2, **FAST) as machine:
        machine.wait_full_scans(2, timeout=60)
        victim = machine.scanner_workers()[1]
        if how == "stopped":
            stop_holding_no_lock(machine, victim.pid)
        else:
            os.kill(victim.pid, signal.SIGKILL)
        try:
            time.sleep(0.05)
            before = machine.ksm.per_scanner("full_scans")
            # A stopped scanner is waited for at most about a second a pass; a killed one not at all.
            wait_until(lambda: machine.ksm.per_scanner("full_scans")[0] >= before[0] + 3, 30,
                       "the other scanner to go on")
            assert machine.ksm.per_scanner("full_scans")[1] == before[1]
        finally:
            if how == "stopped":
                os.kill(victim.pid, signal.SIGCONT)
        if how == "killed":
            machine.start_ksmd()
        c = machine.wait_converged(timeout=120)
        assert (c["pages_shared"], c["pages_sharing"]) == ideal([k for ks in keys for k in ks], 256)
        machine.check()


def test_a_scanner_that_starts_shows_its_pid_with_the_pass_the_others_are_in() -> None:
    # Until its pid shows the others do not wait for it, and may run pass after pass
    # ahead of it; each pass it then made to catch up counted as a full scan of the
    # machine in which they looked at nothing (the counters settled early).
    with shmksm.Machine(frames=256, ksmd=False, scanners=2) as m:
        first = ScannerWords(m.system, 0)
        first.set("scanner_pid", os.getpid())
        first.set("full_scans", 41)
        second = Scanner(m.system, 1, pid=os.getpid())
        words = ScannerWords(m.system, 1)
        assert (words.get("scanner_pid"), words.get("full_scans"), second.full_scans) == (os.getpid(), 41, 41)
        assert Scanner(m.system, 1).words.get("scanner_pid") == 0  # a test's scanner runs in no process of its own
