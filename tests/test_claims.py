"""Content claims: which parallel scanner owns a content (first touch), and how they are balanced.

Unit tests of the shared claim table (compare-and-swap, stale entries,
handing over), including two processes claiming the same buckets at once;
then two scanners in this process, driven batch by batch: a content met
first in a scanner's own page-table runs stays with it, a scanner that met
every content first hands half of them over, and without claims (no
extension) the scanners route by a hash of the checksum and reach the same
counters.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import fill, ideal

import shmksm
from shmksm._ksm import claims as claims_mod
from shmksm._ksm.claims import Claims
from shmksm._ksm.scanner import _FIRST_VISIT_SHIFT, _OWNER_MULT, _OWNER_SHIFT, Scanner, _water_fill
from shmksm._mm import segments

pytestmark = pytest.mark.skipif(not claims_mod.AVAILABLE, reason="the C extension's claim() is not built")


def table(size: int = 1 << 12) -> Claims:
    return Claims(np.zeros(size, np.uint16))


def test_a_claim_goes_to_the_first_claimer_and_stays() -> None:
    c = table()
    sums = np.array([7, 8, 7], np.uint32)
    assert c.owners(sums, 2).tolist() == [-1, -1, -1]
    assert c.claim(sums, 2, 1).tolist() == [1, 1, 1]
    assert c.claimed == 2  # 7 once, and 8
    assert c.claim(np.array([7, 9], np.uint32), 2, 0).tolist() == [1, 0]
    assert c.claimed == 1
    assert c.owners(np.array([7, 8, 9, 10], np.uint32), 2).tolist() == [1, 1, 0, -1]


def test_claims_made_for_another_number_of_scanners_are_stale() -> None:
    c = table()
    c.claim(np.array([5], np.uint32), 2, 1)
    assert c.owners(np.array([5], np.uint32), 3).tolist() == [-1]
    assert c.claim(np.array([5], np.uint32), 3, 2).tolist() == [2]
    assert c.owners(np.array([5], np.uint32), 3).tolist() == [2]


def test_page_owners_reads_the_claims_and_sends_unhashed_pages_by_their_run() -> None:
    c = table()
    rng = np.random.default_rng(7)
    checksums = rng.integers(1, 1 << 32, 20000, dtype=np.uint64).astype(np.uint32)
    checksums[::5] = 0  # never hashed
    c.claim(checksums[1::3][checksums[1::3] != 0], 3, 2)
    c.claim(checksums[2::3][checksums[2::3] != 0], 3, 0)
    pages = rng.permutation(len(checksums))[:15000]
    got = c.page_owners(checksums, pages, 3)
    runs = (pages >> _FIRST_VISIT_SHIFT).astype(np.uint64)
    by_run = ((runs * _OWNER_MULT) >> _OWNER_SHIFT) % np.uint64(3)
    want = np.where(checksums[pages] == 0, by_run.astype(np.int64), c.owners(checksums[pages], 3))
    assert got.tolist() == want.tolist()
    assert set(got.tolist()) == {-1, 0, 1, 2}  # every case met: unclaimed, claimed by two, by run
    with pytest.raises(ValueError, match="not in the guest"):
        c.page_owners(checksums, np.array([len(checksums)]), 3)


def test_only_the_owner_gives_a_content_away() -> None:
    c = table()
    sums = np.array([1, 2, 3], np.uint32)
    c.claim(sums[:2], 2, 0)
    c.claim(sums[2:], 2, 1)
    assert c.give(c.buckets(sums), 2, 0, 1) == 2
    assert c.owners(sums, 2).tolist() == [1, 1, 1]
    assert c.give(c.buckets(sums), 2, 0, 1) == 0


def test_the_table_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        Claims(np.zeros(1000, np.uint16))


def _claim_all(name: str, who: int, sums: np.ndarray, start: object, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Claim every checksum of ``sums`` for ``who``, in chunks, scanner 1 from the end."""
    segment = segments.attach(name)
    try:
        c = Claims(np.ndarray(1 << 16, np.uint16, segment.buf))
        chunks = np.array_split(np.arange(len(sums)), 200)
        owners = np.empty(len(sums), np.int64)
        start.wait()  # type: ignore[attr-defined]
        for at in chunks if who == 0 else chunks[::-1]:
            owners[at] = c.claim(sums[at], 2, who)
        out.put(owners.tolist())
        del c
    finally:
        segment.close()


def test_two_processes_claiming_at_once_agree_on_every_owner() -> None:
    name = f"{segments.PREFIX}{os.getpid()}_claimtest"
    segment = segments.create(name, 2 << 16)
    try:
        sums = np.random.default_rng(5).integers(1, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
        ctx = multiprocessing.get_context("spawn")
        out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
        start = ctx.Barrier(2)
        procs = [ctx.Process(target=_claim_all, args=(name, who, sums, start, out)) for who in (0, 1)]
        for p in procs:
            p.start()
        seen = [out.get(timeout=60), out.get(timeout=60)]
        for p in procs:
            p.join(60)
        assert seen[0] == seen[1]
        assert set(seen[0]) <= {0, 1}
        c = Claims(np.ndarray(1 << 16, np.uint16, segment.buf))
        assert c.owners(sums, 2).tolist() == seen[0]
        del c
    finally:
        segments.unlink(segment)


def test_water_fill_levels_the_loads() -> None:
    assert _water_fill(np.array([100.0, 0.0, 50.0]), np.array([30, 30, 30, 30, 30])).tolist() == [1, 1, 1, 2, 2]
    assert _water_fill(np.array([0.0, 0.0]), np.ones(6, np.int64)).tolist() == [0, 0, 0, 1, 1, 1]
    assert _water_fill(np.array([0.0, np.inf]), np.array([4, 4])).tolist() == [0, 0]


@contextlib.contextmanager
def two_scanners(keys: list[list[int]], use_claims: bool = True) -> Iterator[tuple[shmksm.Machine, list[Scanner]]]:
    """Guests holding ``keys``, and scanners 0 and 1 of 2 in this process, run=1."""
    with shmksm.Machine(frames=sum(map(len, keys)) + 1024, ksmd=False, scanners=2) as machine:
        for k in keys:
            machine.spawn(fill, machine.add_guest(pages=len(k)), k).join(60)
        machine.ksm.run = 1
        scanners = [Scanner(machine.system, i) for i in (0, 1)]
        for s in scanners:
            s.words.set("scanner_pid", os.getpid())  # running, for each other
            if not use_claims:
                s.claims = None
        yield machine, scanners


def drive(scanners: list[Scanner], full_scans: int, batch: int = 700) -> None:
    """Batches of each scanner in turn until both have done ``full_scans`` passes."""
    for _ in range(100_000):
        if min(s.full_scans for s in scanners) >= full_scans:
            return
        for s in scanners:
            if s.full_scans < full_scans:
                s.do_scan(batch)
    raise AssertionError("the scanners did not finish their passes")


def run_owner(pages: np.ndarray) -> np.ndarray:
    runs = (pages >> _FIRST_VISIT_SHIFT).astype(np.uint64)
    return ((runs * _OWNER_MULT) >> _OWNER_SHIFT) % np.uint64(2)


def test_a_content_met_in_a_scanners_own_runs_stays_with_it() -> None:
    # Every content at the same page in each guest (and in runs of both scanners).
    pages = 2048
    keys = [list(range(1, pages + 1)) for _ in range(3)]
    with two_scanners(keys) as (machine, scanners):
        drive(scanners, 1)
        local = total = 0
        for g in machine.guests():
            slots = [s.by_gid[g.id] for s in scanners]
            index = np.arange(pages)
            mine = [s._owns(slot, index) for s, slot in zip(scanners, slots, strict=True)]
            assert (mine[0] ^ mine[1]).all()  # exactly one owner each
            owner = np.where(mine[0], 0, 1)
            local += int((owner == run_owner(index)).sum())
            total += pages
        assert local / total > 0.9, local / total
        drive(scanners, 3)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == ideal([k for ks in keys for k in ks], 256)


def test_a_scanner_that_met_every_content_first_hands_half_over() -> None:
    keys = [[1 + i % 40 for i in range(1000)] for _ in range(2)]
    with two_scanners(keys) as (machine, scanners):
        # Scanner 0 does its whole first pass (and claims every content it meets) first.
        for _ in range(1000):
            if scanners[0].full_scans:
                break
            scanners[0].do_scan(100_000)
        drive(scanners, 4)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == ideal([k for ks in keys for k in ks], 256)
        shares = [s.pages_sharing for s in scanners]
        assert min(shares) > sum(shares) // 4, shares


def test_a_loaded_scanner_gives_contents_met_several_times_most_pages_first_and_keeps_the_rest() -> None:
    with two_scanners([[1] * 16]) as (_machine, scanners):
        s = scanners[0]
        s.count = 2
        # Scanner 1 met L pages' worth of scanner 0's contents: 0's load is L, 1's -L.
        budget = 375
        s.loads[:] = 0
        s.loads[1, 0] = budget
        singles = np.arange(1000, 1050, dtype=np.uint32)
        threes = np.arange(2000, 2010, dtype=np.uint32)
        nines = np.arange(3000, 3010, dtype=np.uint32)
        s._claim(np.concatenate([singles, np.repeat(threes, 3), np.repeat(nines, 9)]))
        owners = [s.claims.owners(sums, 2).tolist() for sums in (singles, threes, nines)]
        # Half the gap (375) at 1 + 4 a further page: the ten of 9 pages (33 each), then
        # five of 3 (9 each); a content met once stays, whatever room is left.
        assert owners == [[0] * 50, [1] * 5 + [0] * 5, [1] * 10]
        assert s.loads[0, :2].tolist() == [50 + 5 * 9, 10 * 33 + 5 * 9]


def test_without_claims_the_scanners_route_by_a_hash_and_reach_the_same_counters() -> None:
    rng = np.random.default_rng(3)
    keys = [[int(k) for k in rng.integers(1, 300, 1500)] for _ in range(3)]
    counters = []
    for use_claims in (True, False):
        with two_scanners(keys, use_claims) as (machine, scanners):
            drive(scanners, 4)
            c = machine.ksm.counters()
            counters.append({k: c[k] for k in ("pages_shared", "pages_sharing", "stable_node_chains",
                                               "stable_node_dups")})
            assert min(s.pages_sharing for s in scanners) > 0
            assert bool(machine.system.frames.claims.any()) == use_claims
    assert counters[0] == counters[1]
    assert (counters[0]["pages_shared"], counters[0]["pages_sharing"]) == ideal([k for ks in keys for k in ks], 256)
