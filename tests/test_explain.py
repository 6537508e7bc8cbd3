"""Why pages do not merge: each reason shown by a guest built to show it, every page under exactly one.

The reasons are checked against a scanner run in the test's own process (its
passes counted exactly), then end to end: machine.explain() asking a real
ksmd, and ``shmksm explain`` attached from another process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST, assert_one_line_error, fill, full_scans, run_cli, wait_until

import shmksm
from shmksm import MADV_MERGEABLE, PAGE_SIZE
from shmksm._ksm import explain
from shmksm._ksm.checksum import checksum
from shmksm._ksm.explain import REASONS, classify
from shmksm._ksm.scanner import Scanner


def page(key: int) -> bytes:
    return np.random.default_rng([11, key]).integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()


def write_pages(guest: shmksm.Guest, keys: list[int], first: int = 0, mergeable: bool = True) -> None:
    view = guest.view()
    for i, key in enumerate(keys):
        view.write((first + i) * PAGE_SIZE, page(key))
    if mergeable:
        view.madvise(first * PAGE_SIZE, len(keys) * PAGE_SIZE, MADV_MERGEABLE)


def reasons(machine: shmksm.Machine, scanner: Scanner, guest: shmksm.Guest) -> dict[str, int]:
    table = machine.system.table(guest.id)
    row = classify(table.ptes, table.header, scanner.item_states(guest.id))
    assert sum(row.values()) == guest.pages  # every page under exactly one reason
    assert list(row) == list(REASONS)
    return row


def only(row: dict[str, int], **want: int) -> None:
    """``row`` has these counts and every other reason 0."""
    assert row == {reason: want.get(reason, 0) for reason in REASONS}


@pytest.fixture
def machine() -> Iterator[shmksm.Machine]:
    with shmksm.Machine(frames=2048, ksmd=False, smart_scan=0) as m:
        yield m
        m.check()


def test_merged_pages_and_not_present_ones(machine: shmksm.Machine) -> None:
    a, b = machine.add_guest(pages=16), machine.add_guest(pages=16)
    for g in (a, b):
        write_pages(g, list(range(1, 9)))
    scanner = Scanner(machine.system)
    full_scans(scanner, 2)
    for g in (a, b):
        only(reasons(machine, scanner, g), merged=8, not_present=8)


def test_zero_page_and_not_mergeable(machine: shmksm.Machine) -> None:
    g = machine.add_guest(pages=16)
    write_pages(g, [1, 1, 2, 2], mergeable=False)  # duplicates, but nobody said MADV_MERGEABLE
    for page in range(4, 8):  # read before written: the zero page (a read across pages maps none)
        g.view().read(page * PAGE_SIZE, 1)
    scanner = Scanner(machine.system)
    full_scans(scanner, 3)
    only(reasons(machine, scanner, g), not_mergeable=4, zero_page=4, not_present=8)


def test_a_new_page_waits_for_its_second_scan_then_is_unique_so_far(machine: shmksm.Machine) -> None:
    g = machine.add_guest(pages=8)
    write_pages(g, [1, 2, 3, 4, 5, 6, 7, 8])
    scanner = Scanner(machine.system)
    only(reasons(machine, scanner, g), waiting_second_scan=8)  # not scanned yet
    full_scans(scanner, 1)
    only(reasons(machine, scanner, g), waiting_second_scan=8)  # one checksum taken
    full_scans(scanner, 1)
    only(reasons(machine, scanner, g), unique_so_far=8)  # on the unstable tree, no copy anywhere


def test_a_page_written_between_scans_is_volatile(machine: shmksm.Machine) -> None:
    g = machine.add_guest(pages=8)
    write_pages(g, [1, 2, 3, 4, 5, 6, 7, 8])
    scanner = Scanner(machine.system)
    full_scans(scanner, 2)
    write_pages(g, [20, 21, 22], first=2)  # three pages change
    full_scans(scanner, 1)
    only(reasons(machine, scanner, g), volatile=3, unique_so_far=5)
    assert machine.ksm.counters()["pages_volatile"] == 3  # the kernel's count says the same
    full_scans(scanner, 1)
    only(reasons(machine, scanner, g), unique_so_far=8)  # steady again


def test_a_merged_page_written_since_is_volatile(machine: shmksm.Machine) -> None:
    a, b = machine.add_guest(pages=4), machine.add_guest(pages=4)
    for g in (a, b):
        write_pages(g, [1, 2, 3, 4])
    scanner = Scanner(machine.system)
    full_scans(scanner, 2)
    a.view().write(0, b"changed")  # copy-on-write: a private copy, the item still on its node
    only(reasons(machine, scanner, a), merged=3, volatile=1)


def test_a_copy_over_max_page_sharing_waits_for_a_new_dup(machine: shmksm.Machine) -> None:
    machine.ksm.max_page_sharing = 2
    g = machine.add_guest(pages=8)
    write_pages(g, [1, 1, 1, 1, 1, 9, 10, 11])  # five copies: two KSM pages of two, one copy left over
    scanner = Scanner(machine.system)
    full_scans(scanner, 4)
    only(reasons(machine, scanner, g), merged=4, over_max_page_sharing=1, unique_so_far=3)
    counters = machine.ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"], counters["stable_node_dups"]) == (2, 2, 2)


def test_smart_scan_skips_pages_that_keep_failing(machine: shmksm.Machine) -> None:
    machine.ksm.smart_scan = 1
    g = machine.add_guest(pages=8)
    write_pages(g, [1, 2, 3, 4, 5, 6, 7, 8])
    scanner = Scanner(machine.system)
    full_scans(scanner, 5)  # from the fourth visit on, a page that never merged is skipped every other time
    row = reasons(machine, scanner, g)
    assert row["smart_scan_skipped"] == 8 or (row["smart_scan_skipped"] == 0 and row["unique_so_far"] == 8)
    full_scans(scanner, 1)
    row2 = reasons(machine, scanner, g)
    assert {row["smart_scan_skipped"], row2["smart_scan_skipped"]} == {0, 8}
    assert scanner.pages_skipped == 8


def answered(machine: shmksm.Machine, scanners: list[Scanner], guest: shmksm.Guest) -> dict[str, int]:
    """The reasons ``scanners`` give, answering one request in this order, as their processes would."""
    prefix, pages = machine.system.spec.prefix, {guest.id: guest.pages}
    with explain._answer_segment(prefix, pages, len(scanners)) as buf:
        for scanner in scanners:
            explain.answer(scanner, prefix, os.getpid() << 20)
        states = explain._read_states(buf, pages)
    table = machine.system.table(guest.id)
    return classify(table.ptes, table.header, states[guest.id])


def test_two_scanners_explain_a_page_that_changed_owner_by_its_owner() -> None:
    """A page written to a content of the other scanner's: the scanner that saw the change keeps its
    item (volatile) until its next visit; the new owner's item, once it has one, is the answer."""
    with shmksm.Machine(frames=256, ksmd=False, smart_scan=0, scanners=2) as machine:
        g = machine.add_guest(pages=8)
        write_pages(g, [1, 2, 3, 4, 5, 6, 7, 8])
        scanners = [Scanner(machine.system, 0), Scanner(machine.system, 1)]
        for _ in range(2):  # their passes interleaved, as two processes' are
            for s in scanners:
                full_scans(s, 1)
        for order in (scanners, scanners[::-1]):
            only(answered(machine, order, g), unique_so_far=8)
        five = np.array([5])
        was = next(s for s in scanners if s.owns(g.id, five)[0])
        other = next(s for s in scanners if s is not was)
        for key in range(100, 200):  # a content the other scanner owns
            if other.claims is not None:  # first touch: the scanner that claimed a content owns it
                other.claims.claim(np.array([checksum(page(key)) & 0xFFFFFFFF], np.uint32), 2, other.index)
            write_pages(g, [key], first=5)
            full_scans(was, 1)
            if not was.owns(g.id, five)[0]:
                break
        now = next(s for s in scanners if s is not was)
        assert now.owns(g.id, five)[0]
        for order in (scanners, scanners[::-1]):  # as one scanner would say: the change seen
            only(answered(machine, order, g), volatile=1, unique_so_far=7)
        full_scans(now, 1)  # the new owner's visit: steady since, on its unstable tree
        for order in (scanners, scanners[::-1]):  # the old owner's item, not freed yet, says volatile
            only(answered(machine, order, g), unique_so_far=8)
        machine.check()


def test_explain_with_a_killed_scanner_counts_its_pages_as_not_scanned() -> None:
    with shmksm.Machine(frames=1024, scanners=2, smart_scan=0, **FAST) as machine:
        guests = [machine.add_guest(pages=64) for _ in range(2)]
        for g in guests:
            machine.spawn(fill, g, [1 + p % 16 for p in range(64)]).join(30)
        machine.ksm.run = 1
        c = machine.wait_converged(timeout=120)
        assert c["pages_shared"] + c["pages_sharing"] == 128
        assert machine.explain().total["merged"] == 128
        machine.ksm.run = 0  # the scanner left answers, and visits nothing more
        batches = machine.ksm.per_scanner("scanner_batches")
        wait_until(lambda: idle(machine, batches), 30, "the scanners to stop scanning")
        victim = machine.scanner_workers()[1]
        victim.kill()
        wait_until(lambda: any(d.pid == victim.pid and d.signal == signal.SIGKILL for d in machine.deaths), 30,
                   "the host to record the death")
        for g in guests:  # copy-on-write breaks of pages of all 16 contents: both scanners owned some
            for p in range(16):
                g.view().write(p * PAGE_SIZE, b"changed")
        got = machine.explain()  # answered by the scanner left, not ProcessDied
        assert sum(got.total.values()) == 128 and got.total["merged"] == 128 - 32
        # the live scanner's items say the change (volatile); the dead one's pages wait for their scans
        assert got.total["volatile"] + got.total["waiting_second_scan"] == 32
        assert got.total["volatile"] and got.total["waiting_second_scan"], got.total


def idle(machine: shmksm.Machine, batches: list[int]) -> bool:
    """Have the scanners run no batch since ``batches`` (updated in place) for a tenth of a second?"""
    time.sleep(0.1)
    now = machine.ksm.per_scanner("scanner_batches")
    same = now == batches
    batches[:] = now
    return same


@pytest.mark.parametrize("scanners", [1, 2])
def test_machine_explain_asks_the_running_ksmd(scanners: int) -> None:
    """With parallel scanners each answers for the pages it owns: the same reasons."""
    with shmksm.Machine(frames=2048, pages_to_scan=10_000, sleep_millisecs=5, smart_scan=0,
                        max_page_sharing=2, scanners=scanners) as m:
        a, b, c = (m.add_guest(pages=16) for _ in range(3))
        write_pages(a, [1, 2, 3, 4])
        write_pages(b, [1, 2, 3, 4, 5, 5, 5])
        write_pages(c, [7, 8], mergeable=False)
        c.view().read(8 * PAGE_SIZE, PAGE_SIZE)
        before = m.explain()
        assert before.total["waiting_second_scan"] == 11
        m.ksm.run = 1
        m.wait_converged(stable_scans=2, timeout=60)
        got = m.explain()
        only(got.guests[a.id], merged=4, not_present=12)
        only(got.guests[b.id], merged=6, over_max_page_sharing=1, not_present=9)
        only(got.guests[c.id], not_mergeable=2, zero_page=1, not_present=13)
        assert got.total == {r: sum(row[r] for row in got.guests.values()) for r in REASONS}
        assert sum(got.total.values()) == 48
        assert got.counters["pages_sharing"] + got.counters["pages_shared"] == got.total["merged"]
        as_json = json.loads(json.dumps(got.as_dict()))
        assert as_json["total"] == got.total and set(as_json["reasons"]) == set(REASONS)
        m.ksm.run = 0
        m.check()


HOST = """
import sys, time
import shmksm
from shmksm import MADV_MERGEABLE

def fill(view, byte):
    view.write(0, bytes([byte]) * 8 * 4096)
    view.madvise(0, 8 * 4096, MADV_MERGEABLE)

if __name__ == "__main__":
    with shmksm.Machine(frames=256, pages_to_scan=1000, sleep_millisecs=5) as m:
        guests = [m.add_guest(pages=8) for _ in range(2)]
        for g in guests:
            m.spawn(fill, g, 1).join()
        m.ksm.run = 1
        m.wait_converged(stable_scans=2, timeout=60)
        print(m.system.spec.prefix, flush=True)
        sys.stdin.read()
"""


def test_the_explain_command_attaches_to_a_running_machine(tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(HOST)
    host = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        prefix = host.stdout.readline().strip()
        assert prefix, "the host did not start"
        got = json.loads(run_cli("explain", "--machine", prefix, "--json", "-").stdout)
        assert got["total"]["merged"] == 16 and sum(got["total"].values()) == 16
        text = run_cli("explain", "--machine", prefix)
        assert text.returncode == 0, text.stderr
        assert "merged" in text.stdout and "guest" in text.stdout
    finally:
        host.communicate(timeout=60)  # stdin closed: the host closes its machine and exits
    assert host.returncode == 0
    assert_one_line_error(run_cli("explain", "--machine", prefix), 2, "no running shmksm machine")


def test_run_explain_adds_the_reasons_to_the_report() -> None:
    proc = run_cli("run", "--scenario", "mostly-unique", "--guests", 2, "--pages-to-scan", 5000,
                   "--sleep-millisecs", 0, "--explain", "--json", "-", "--timeout", 90, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    explained = report["explain"]
    assert sum(explained["total"].values()) == report["pages"]
    assert explained["total"]["merged"] == report["ksm"]["pages_shared"] + report["ksm"]["pages_sharing"]
    assert len(explained["guests"]) == 2
