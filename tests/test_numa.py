"""Emulated NUMA nodes and merge_across_nodes: one stable and one unstable tree per node.

With ``merge_across_nodes=1`` (the default) the guests of every node share
one pair of trees, as before; with 0 each node has its own, so identical
pages of guests on different nodes stay apart and the counters are the
brute-force ideal of each node, summed.  The knob refuses a change while KSM
pages exist (EBUSY), as sysfs does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from helpers import FAST, fill, selftest_expectation

import shmksm
from shmksm._ksm.scanner import ALL_NODES, partition_of
from shmksm._ksm.sysfs import AttachedKsm
from shmksm._mm.frames import node_of
from shmksm._mm.pagetable import KSM, PFN_MASK, PRESENT, ZERO


def ideal_by_node(layout: Sequence[tuple[int, Sequence[int]]], per_node: bool,
                  max_page_sharing: int = 256) -> tuple[int, int]:
    """(pages_shared, pages_sharing) of merging guests (node, page keys) by brute force,
    within each node (``per_node``) or across all of them."""
    groups: dict[tuple[int, int], int] = {}
    for node, keys in layout:
        for key in keys:
            where = (node if per_node else 0, key)
            groups[where] = groups.get(where, 0) + 1
    shared = sharing = 0
    for count in groups.values():
        s, g = selftest_expectation(count, max_page_sharing)
        shared += s
        sharing += g
    return shared, sharing


def run_layout(layout: Sequence[tuple[int, Sequence[int]]], nodes: int, **knobs: int) -> dict[str, int]:
    """Guests (node, keys) filled and merged to convergence; the counters."""
    pages = sum(len(keys) for _, keys in layout)
    with shmksm.Machine(frames=pages + 256, nodes=nodes, **{**FAST, **knobs}) as machine:
        guests = [machine.add_guest(pages=len(keys), node=node) for node, keys in layout]
        for g, (_, keys) in zip(guests, layout, strict=True):
            machine.spawn(fill, g, list(keys)).join(60)
        machine.ksm.run = 1
        counters = machine.wait_converged(timeout=120)
        machine.check()
        return counters


# Two guests on each of two nodes; every guest holds contents 1..8, and the
# node-1 guests also 9..12 twice.
LAYOUT = [(0, list(range(1, 9))), (0, list(range(1, 9))),
          (1, list(range(1, 9)) + [9, 10, 11, 12] * 2), (1, list(range(1, 9)))]


@pytest.mark.parametrize("merge_across_nodes", [1, 0])
def test_merged_counts_equal_the_ideal_per_node_or_across(merge_across_nodes: int) -> None:
    c = run_layout(LAYOUT, nodes=2, merge_across_nodes=merge_across_nodes)
    want = ideal_by_node(LAYOUT, per_node=not merge_across_nodes)
    assert (c["pages_shared"], c["pages_sharing"]) == want


def test_same_content_on_different_nodes_merges_only_across() -> None:
    layout = [(0, list(range(1, 17))), (1, list(range(1, 17)))]
    across = run_layout(layout, nodes=2)
    assert (across["pages_shared"], across["pages_sharing"]) == (16, 16)
    apart = run_layout(layout, nodes=2, merge_across_nodes=0, smart_scan=0)
    assert (apart["pages_shared"], apart["pages_sharing"]) == (0, 0)
    assert apart["pages_unshared"] == 32  # each on its node's unstable tree


def test_merge_across_nodes_is_busy_while_ksm_pages_exist() -> None:
    with shmksm.Machine(frames=256, nodes=2, **FAST) as machine:
        guests = [machine.add_guest(pages=4, node=n) for n in (0, 1)]
        for g in guests:
            machine.spawn(fill, g, [1, 2, 3, 4]).join(60)
        machine.ksm.run = 1
        machine.wait_converged(timeout=60)
        assert machine.ksm.pages_shared == 4
        with pytest.raises(shmksm.KnobBusyError, match="EBUSY"):
            machine.ksm.merge_across_nodes = 0
        assert machine.ksm.merge_across_nodes == 1
        machine.ksm.merge_across_nodes = 1  # the value it has: no change, no error
        machine.ksm.run = 2
        machine.ksm.merge_across_nodes = 0
        machine.ksm.run = 1
        c = machine.wait_converged(timeout=60)
        assert (c["pages_shared"], c["pages_sharing"]) == (0, 0)
        machine.check()


def test_partition_of_is_the_node_only_without_merging_across(machine: shmksm.Machine) -> None:
    with shmksm.Machine(frames=64, nodes=3, ksmd=False) as m:
        guests = [m.add_guest(pages=4) for _ in range(4)]
        assert [m.system.table(g.id).node for g in guests] == [0, 1, 2, 0]  # round robin
        assert {partition_of(m.system, g.id)[0] for g in guests} == {ALL_NODES}  # component 0: the node
        m.ksm.merge_across_nodes = 0
        assert [partition_of(m.system, g.id)[0] for g in guests] == [0, 1, 2, 0]
        assert len({partition_of(m.system, g.id) for g in guests}) == 3


@pytest.mark.parametrize("bad", [0, -1, 17, "2", True])
def test_bad_node_counts_are_refused(bad: object) -> None:
    with pytest.raises(shmksm.UsageError, match="NUMA nodes"):
        shmksm.Machine(frames=64, nodes=bad, ksmd=False)  # type: ignore[arg-type]


def test_a_guest_on_a_node_the_machine_lacks_is_refused() -> None:
    with shmksm.Machine(frames=64, nodes=2, ksmd=False) as m, pytest.raises(shmksm.UsageError, match="node"):
        m.add_guest(pages=4, node=2)


def _nodes_of_guest(machine: shmksm.Machine, guest: shmksm.Guest) -> list[int]:
    """The node of every frame that a present page of ``guest`` maps (the zero page left out)."""
    ptes = machine.system.table(guest.id).ptes.copy()
    present = (ptes & np.uint64(PRESENT | ZERO)) == np.uint64(PRESENT)
    pfns = (ptes[present] & np.uint64(PFN_MASK)).astype(np.int64)
    return node_of(pfns, machine.frames, machine.nodes).tolist()  # type: ignore[no-any-return]


def test_frames_come_from_the_guests_node_then_from_the_others() -> None:
    with shmksm.Machine(frames=64, nodes=2, ksmd=False) as m:
        # frames 0..31 are node 0's (frame 0 is the zero page), 32..63 node 1's
        a = m.add_guest(pages=20, node=0)
        b = m.add_guest(pages=40, node=1)
        m.spawn(fill, a, list(range(1, 21))).join(60)
        assert set(_nodes_of_guest(m, a)) == {0}
        stat = m.ksm.numastat()
        assert (stat[0]["numa_hit"], stat[0]["numa_miss"], stat[0]["numa_foreign"]) == (20, 0, 0)
        assert stat[0]["nr_free_pages"] == 31 - 20 and stat[1]["nr_free_pages"] == 32
        m.spawn(fill, b, list(range(1, 41))).join(60)
        assert sorted(_nodes_of_guest(m, b)) == [0] * 8 + [1] * 32  # node 1 ran out: 8 from node 0
        c = m.ksm.counters()
        assert (c["node1_numa_hit"], c["node1_numa_foreign"], c["node0_numa_miss"]) == (32, 8, 8)
        assert (c["numa_hit"], c["numa_miss"], c["numa_foreign"]) == (52, 8, 8)
        assert (c["numa_local"], c["numa_other"]) == (52, 8)
        assert m.ksm.numa_miss == 8
        m.check()


def test_one_node_counts_no_numa_figures_among_the_ksm_counters(machine: shmksm.Machine) -> None:
    assert not [name for name in machine.ksm.counters() if "numa" in name]
    assert len(machine.ksm.numastat()) == 1


def test_a_ksm_page_is_on_the_node_of_its_pages_without_merging_across() -> None:
    layout = [(0, list(range(1, 9))), (1, list(range(1, 9))), (0, list(range(1, 9))), (1, list(range(1, 9)))]
    with shmksm.Machine(frames=256, nodes=2, merge_across_nodes=0, **FAST) as m:
        guests = [m.add_guest(pages=8, node=node) for node, _ in layout]
        for g, (_, keys) in zip(guests, layout, strict=True):
            m.spawn(fill, g, keys).join(60)
        m.ksm.run = 1
        c = m.wait_converged(timeout=60)
        assert (c["pages_shared"], c["pages_sharing"]) == (16, 16)
        for g, (node, _) in zip(guests, layout, strict=True):
            ptes = m.system.table(g.id).ptes.copy()
            assert ((ptes & np.uint64(KSM)) != 0).all()
            assert set(_nodes_of_guest(m, g)) == {node}
        m.check()


def test_the_frame_lists_are_rebuilt_per_node_after_a_guest_is_killed() -> None:
    with shmksm.Machine(frames=128, nodes=2, ksmd=False) as m:
        a = m.add_guest(pages=16, node=1)
        m.spawn(fill, a, list(range(1, 17))).join(60)
        free = [node["nr_free_pages"] for node in m.ksm.numastat()]
        m.remove_guest(a)
        m.reclaim()
        assert [node["nr_free_pages"] for node in m.ksm.numastat()] == [free[0], free[1] + 16]
        m.check()


def test_stats_shows_each_nodes_numastat() -> None:
    with shmksm.Machine(frames=64, nodes=2, ksmd=False) as m:
        m.spawn(fill, m.add_guest(pages=4, node=1), [1, 2, 3, 4]).join(60)
        with AttachedKsm(m.system.spec.prefix) as ksm:
            lines = ksm.sysfs_lines()
        assert "/sys/devices/system/node/node1/numastat:numa_hit 4" in lines
        assert "/sys/devices/system/node/node0/numastat:numa_hit 0" in lines
        assert not [line for line in lines if "scanners" in line]
