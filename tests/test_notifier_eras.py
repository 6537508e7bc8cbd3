"""The change_pte experiment: shadow faults per notifier era, from the Python API and from the command line.

The seed (2009) pointed the shadow entry at the merged page with change_pte
and took no fault for a merge — but KVM's handler dropped the entry when the
new PTE was writable, so a copy-on-write faulted as in every era; 2012
wrapped change_pte in invalidate_range_start/end, so
the entry was gone before change_pte came and the shadow faulted as if
change_pte did not exist, which 2024 made official by removing it; the
interval notifier invalidates as well.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from shmksm._mm import mmu_notifier as mn
from shmksm.cli import main
from shmksm.tool.experiments import notifier_era_run

GUESTS, PAGES = 2, 256
DUPLICATES = GUESTS * PAGES // 2  # the odd pages: merged, then written into


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    """The experiment's workload once under each era, one shadow worker."""
    return {era: notifier_era_run(era, guests=GUESTS, pages=PAGES, shadows=1) for era in mn.ERAS}


@pytest.mark.parametrize("era", mn.ERAS)
def test_every_era_runs_the_same_workload(results: dict[str, dict[str, Any]], era: str) -> None:
    r = results[era]
    assert r["warmup_faults"] == GUESTS * PAGES, "the warm-up round faults every entry in"
    assert r["pages_sharing"] > 0, "ksmd merged nothing"
    assert r["cow_ksm"] == DUPLICATES, "every write into a merged page copies"
    assert r["shadow_faults"] == r["merge_faults"] + r["cow_faults"]
    assert r["messages"] > 0


@pytest.mark.parametrize("era", [
    # Not strict: it fails only when the shadow reads before the broker delivered (a loaded machine).
    "2009", "2012", "2024", "interval",
])
def test_no_stale_reads(results: dict[str, dict[str, Any]], era: str) -> None:
    assert results[era]["stale_reads"] == 0


def test_2009_change_pte_saves_the_merges_faults(results: dict[str, dict[str, Any]]) -> None:
    r = results["2009"]
    assert r["merge_faults"] == 0, "change_pte should have repointed every merged page's entry: no fault"
    # Every merge repointed an entry (write_protect_page's change_pte repoints more).
    assert r["updated_in_place"] >= DUPLICATES


def test_2009_change_pte_never_saved_a_cow_fault(results: dict[str, dict[str, Any]]) -> None:
    """A copy-on-write maps a writable PTE: kvm_set_pte_rmapp drops the entry."""
    r = results["2009"]
    assert r["cow_faults"] == DUPLICATES
    assert r["cow_faults"] == results["2024"]["cow_faults"]


def test_2012_change_pte_finds_nothing_to_update(results: dict[str, dict[str, Any]]) -> None:
    r = results["2012"]
    assert r["updated_in_place"] == 0, "invalidate_range_start dropped the entry before change_pte"
    assert r["shadow_faults"] == results["2024"]["shadow_faults"], "2012 is no better than no change_pte at all"
    assert r["messages"] > results["2024"]["messages"], "and it sends change_pte for nothing"


@pytest.mark.parametrize("era", ["2024", "interval"])
def test_invalidate_only_eras_fault(results: dict[str, dict[str, Any]], era: str) -> None:
    r = results[era]
    assert r["updated_in_place"] == 0
    assert r["shadow_faults"] > 0
    # Every duplicate page was merged and then written into: two invalidations, two faults.
    assert r["cow_faults"] == DUPLICATES
    assert r["shadow_faults"] <= 2 * DUPLICATES


def test_cli_experiment_notifier_json() -> None:
    result = CliRunner().invoke(main, ["experiment", "notifier", "--pages", "128", "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["eras"]) == {"2009", "2012", "2024", "interval"}
    keys = {"shadow_faults", "messages", "faults_avoided", "lag_p99_us", "lag_max_us", "broker_messages_per_s"}
    for era, r in report["eras"].items():
        assert keys <= set(r), f"era {era} lacks {keys - set(r)}"
    eras = report["eras"]
    assert eras["2009"]["merge_faults"] == 0
    assert eras["2024"]["faults_avoided"] == 0
    assert eras["2009"]["merge_faults_avoided"] == eras["2024"]["merge_faults"] > 0
    assert eras["2009"]["cow_faults_avoided"] == 0
    assert eras["2009"]["cow_faults"] == eras["2024"]["cow_faults"] == 128 * 2, "each duplicate, in each shadow"
    assert eras["2012"]["shadow_faults"] == eras["2024"]["shadow_faults"]
    assert report["workload"] == {"guests": 2, "pages": 128, "shadows": 2, "duplicate_pages": 128}
    for era, r in eras.items():
        # The same workload with synchronous shadows: the same faults, and what it cost.
        y = r["sync"]
        assert y["shadow_faults"] == r["shadow_faults"], f"era {era}: sync changed the faults"
        assert y["stale_reads"] == 0
        assert y["cow_break_us"] > 0 and r["cow_break_us"] > 0
        assert y["merges_per_s"] and r["merges_per_s"]
