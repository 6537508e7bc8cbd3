"""Emulated NUMA nodes and merge_across_nodes: one stable and one unstable tree per node.

With ``merge_across_nodes=1`` (the default) the guests of every node share
one pair of trees, as before; with 0 each node has its own, so identical
pages of guests on different nodes stay apart and the counters are the
brute-force ideal of each node, summed.  The knob refuses a change while KSM
pages exist (EBUSY), as sysfs does.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from helpers import FAST, fill, selftest_expectation

import shmksm
from shmksm._ksm.scanner import ALL_NODES, partition_of


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
        assert {partition_of(m.system, g.id) for g in guests} == {(ALL_NODES,)}
        m.ksm.merge_across_nodes = 0
        assert [partition_of(m.system, g.id) for g in guests] == [(0,), (1,), (2,), (0,)]


@pytest.mark.parametrize("bad", [0, -1, 17, "2", True])
def test_bad_node_counts_are_refused(bad: object) -> None:
    with pytest.raises(shmksm.UsageError, match="NUMA nodes"):
        shmksm.Machine(frames=64, nodes=bad, ksmd=False)  # type: ignore[arg-type]


def test_a_guest_on_a_node_the_machine_lacks_is_refused() -> None:
    with shmksm.Machine(frames=64, nodes=2, ksmd=False) as m, pytest.raises(shmksm.UsageError, match="node"):
        m.add_guest(pages=4, node=2)
