"""The deduplication side channel: the mitigation knob, security domains, VUsion, and the attack itself.

The attack tests compare distributions and success against chance with wide
margins: the machine may be loaded, but noise slows merged and unmerged
writes alike (they are timed interleaved, in a random order), while the
signal without a mitigation is several times the median write.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import pfn_of, pte_of

import shmksm
from shmksm._ksm import ksm
from shmksm._mm.pagetable import KSM, PRESENT, WRITE
from shmksm.cli import main
from shmksm.tool.sidechannel import PolicyResult, run_policy

FAST = {"pages_to_scan": 1000, "sleep_millisecs": 0}
PAGE = 4096


def unique_pages(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n * PAGE, dtype=np.uint8).tobytes()


# -- the knob ---------------------------------------------------------------------------------------


def test_mitigation_is_none_by_default_and_not_a_sysfs_file(machine: shmksm.Machine) -> None:
    assert machine.ksm.mitigation == "none"
    assert machine.ksm.knobs()["mitigation"] == "none"
    assert not any("mitigation" in line for line in machine.ksm.sysfs_lines())


@pytest.mark.parametrize("value", ["none", "vusion", "domains", " vusion\n", "[domains]"])
def test_mitigation_takes_its_names(machine: shmksm.Machine, value: str) -> None:
    machine.ksm.mitigation = value
    assert machine.ksm.mitigation == value.strip().strip("[]")


@pytest.mark.parametrize("value", ["VUsion", "off", "", 3, -1, None, 1.0])
def test_mitigation_refuses_what_it_does_not_know_as_einval(machine: shmksm.Machine, value: object) -> None:
    with pytest.raises(shmksm.KnobError, match=r"mitigation.*EINVAL"):
        machine.ksm.mitigation = value
    assert machine.ksm.mitigation == "none"


def test_machine_takes_mitigation_as_a_keyword() -> None:
    with shmksm.Machine(frames=64, ksmd=False, mitigation="vusion") as m:
        assert m.ksm.mitigation == "vusion"
    with pytest.raises(ValueError, match="mitigation must be one of"):
        shmksm.Machine(frames=64, ksmd=False, mitigation="all")


def test_mitigation_cannot_change_while_pages_are_shared(machine: shmksm.Machine) -> None:
    a, b = machine.add_guest(pages=1), machine.add_guest(pages=1)
    for g in (a, b):
        g.view().write(0, b"same" * 1024)
    machine.system.set("pages_shared", 1)  # what ksmd publishes once they merged
    with pytest.raises(shmksm.KnobBusyError) as info:
        machine.ksm.mitigation = "domains"
    assert info.value.errno == errno.EBUSY
    assert machine.ksm.mitigation == "none"
    machine.ksm.mitigation = "none"  # writing the same value is no change
    machine.system.set("pages_shared", 0)
    machine.ksm.mitigation = "domains"
    assert machine.ksm.mitigation == "domains"


# -- domains ----------------------------------------------------------------------------------------


def test_add_guest_takes_a_domain(machine: shmksm.Machine) -> None:
    assert machine.add_guest(pages=1).domain == 0
    assert machine.add_guest(pages=1, domain=7).domain == 7
    for bad in (-1, 1 << 31, "1", True, 1.5):
        with pytest.raises(shmksm.UsageError, match="domain"):
            machine.add_guest(pages=1, domain=bad)  # type: ignore[arg-type]


def _fill(view: shmksm.GuestView, content: bytes) -> None:
    view.write(0, content)
    view.madvise(0, view.size, shmksm.MADV_MERGEABLE)


@pytest.mark.parametrize("mitigation", ["none", "domains"])
def test_domains_merge_within_a_domain_and_only_empty_pages_across(mitigation: str) -> None:
    shared = unique_pages(4, seed=1)
    content = shared + bytes(4 * PAGE)  # 4 pages every guest holds, and 4 empty ones
    with shmksm.Machine(frames=256, mitigation=mitigation, **FAST) as m:
        guests = [m.add_guest(pages=8, domain=d) for d in (1, 1, 2)]
        for g in guests:
            m.spawn(_fill, g, content).join()
        m.ksm.run = 1
        m.wait_converged()
        merged = [[bool(pte_of(m, g, p) & KSM) for p in range(8)] for g in guests]
        assert merged[0] == merged[1] == [True] * 8
        crossed = mitigation == "none"
        assert merged[2] == [crossed] * 4 + [True] * 4, "across domains, only the empty pages merge"
        c = m.ksm.counters()
        if crossed:  # 4 contents and the empty page, 3 copies of each content, 12 of the empty page
            assert (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"]) == (5, 4 * 2 + 11, 0)
        else:  # within domain 1 only; every empty page goes to the zero page, shared by all
            assert (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"]) == (4, 4, 12)
        for g in guests:
            assert g.view().read(0, 8 * PAGE) == content
        m.check()


# -- VUsion -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mitigation", ["none", "vusion"])
def test_a_write_protected_private_page_is_copied_under_vusion_only(machine: shmksm.Machine,
                                                                   mitigation: str) -> None:
    machine.ksm.mitigation = mitigation
    g = machine.add_guest(pages=4)
    view = g.view()
    content = unique_pages(4, seed=2)
    view.write(0, content)
    before = [pfn_of(machine, g, p) for p in range(4)]
    assert ksm.write_protect_pages(machine.system.table(g.id), np.arange(4)) == 4
    assert not any(pte_of(machine, g, p) & WRITE for p in range(4))
    view.write(PAGE + 5, b"x")  # one page: handle_write_fault
    view.write(2 * PAGE + 7, b"y" * PAGE)  # two pages at once: handle_write_faults
    vusion = mitigation == "vusion"
    assert [pfn_of(machine, g, p) != before[p] for p in range(4)] == [False, vusion, vusion, vusion]
    assert machine.system.get("cow_faults") == (3 if vusion else 0)
    assert all(pte_of(machine, g, p) & WRITE for p in (1, 2, 3))
    expected = bytearray(content)
    expected[PAGE + 5] = ord("x")
    expected[2 * PAGE + 7:3 * PAGE + 7] = b"y" * PAGE
    assert view.read(0, 4 * PAGE) == expected


def test_vusion_write_protects_and_moves_every_page_ksmd_considers() -> None:
    content = unique_pages(16, seed=3)
    with shmksm.Machine(frames=1024, mitigation="vusion", **FAST) as m:
        g = m.add_guest(pages=16)
        m.spawn(_fill, g, content).join()
        assert all(pte_of(m, g, p) & WRITE for p in range(16))
        before = {pfn_of(m, g, p) for p in range(16)}
        m.ksm.run = 1
        m.wait_full_scans(1)
        ptes = [pte_of(m, g, p) for p in range(16)]
        assert all(pte & PRESENT and not pte & WRITE and not pte & KSM for pte in ptes), "unmerged, yet read-only"
        after = {pfn_of(m, g, p) for p in range(16)}
        assert len(after) == 16 and not after & before, "each page moved to a frame of its own"
        assert sorted(after) != list(range(min(after), min(after) + 16)), "placed at random, not in a row"
        m.ksm.run = 0
        view = g.view()
        assert view.read(0, 16 * PAGE) == content
        for p in range(16):
            view.write(p * PAGE, b"\xff")  # each faults and copies; none is lost
        assert m.system.get("cow_faults") >= 16
        assert [view.read(p * PAGE, 1) for p in range(16)] == [b"\xff"] * 16
        m.check()


def test_vusion_merges_into_a_frame_neither_page_had() -> None:
    content = unique_pages(8, seed=6)
    with shmksm.Machine(frames=1024, mitigation="vusion", **FAST) as m:
        a, b = m.add_guest(pages=8), m.add_guest(pages=8)
        for g in (a, b):
            m.spawn(_fill, g, content).join()
        planted = {pfn_of(m, g, p) for g in (a, b) for p in range(8)}
        m.ksm.run = 1
        m.wait_converged()
        assert m.ksm.pages_shared == 8 and m.ksm.pages_sharing == 8
        kpfns = {pfn_of(m, a, p) for p in range(8)}
        assert kpfns == {pfn_of(m, b, p) for p in range(8)}
        assert not kpfns & planted
        for g in (a, b):
            assert g.view().read(0, 8 * PAGE) == content
        m.check()


@pytest.mark.parametrize("era", ["2009", "2024"])
def test_vusion_keeps_a_shadow_mmu_coherent(era: str) -> None:
    content = unique_pages(16, seed=4)
    with shmksm.Machine(frames=256, mitigation="vusion", notifier_era=era, **FAST) as m:
        g = m.add_guest(pages=16)
        m.spawn(_fill, g, content).join()
        shadow = m.add_shadow([g])
        shadow.round()
        m.ksm.run = 1
        m.wait_full_scans(2)  # every page write-protected, none merged
        m.ksm.run = 0
        shadow.round()
        view = g.view()
        for p in range(16):
            view.write(p * PAGE, b"\xff")
        shadow.round()
        shadow.sync()
        assert shadow.stop()["stale_reads"] == 0
        m.check()


# -- the attack --------------------------------------------------------------------------------------

TRIALS, CANDIDATES = 40, 8


@pytest.fixture(scope="module")
def attacks() -> Iterator[dict[str, PolicyResult]]:
    """The experiment under each mitigation, run once for the module."""
    yield {name: run_policy(name, TRIALS, CANDIDATES, seed=5) for name in ("none", "vusion", "domains")}


def test_without_a_mitigation_the_attack_finds_the_secrets(attacks: dict[str, PolicyResult]) -> None:
    r = attacks["none"]
    assert r.ksm_pages_timed == TRIALS, "every secret page was merged before the timing"
    assert r.faults == TRIALS, "only the merged pages faulted"
    assert r.merged.median_us > 2 * r.unmerged.median_us
    assert r.ks_pvalue < 1e-6
    assert r.success_rate >= 0.6, f"{r.hits}/{r.trials} found, chance {r.chance}"
    assert r.success_pvalue < 1e-6


def test_vusion_makes_merged_and_unmerged_writes_alike(attacks: dict[str, PolicyResult]) -> None:
    r = attacks["vusion"]
    assert r.ksm_pages_timed == TRIALS, "VUsion still merges"
    assert r.faults == TRIALS * CANDIDATES, "every timed write faulted and copied"
    assert 0.8 < r.merged.median_us / r.unmerged.median_us < 1.25
    assert r.ks_pvalue > 1e-3
    assert r.success_pvalue > 1e-3, f"{r.hits}/{r.trials} found: better than chance ({r.chance})"
    assert r.hits <= TRIALS // 3


def test_domains_keep_the_tenants_apart(attacks: dict[str, PolicyResult]) -> None:
    r = attacks["domains"]
    assert r.ksm_pages_timed == 0
    assert r.faults == 0
    assert r.success_pvalue > 1e-3
    assert r.pages_saved > 0, "empty pages still merge across domains"
    assert r.pages_saved < attacks["none"].pages_saved


@pytest.mark.parametrize("name", ["none", "vusion", "domains"])
def test_every_policy_loses_no_write(attacks: dict[str, PolicyResult], name: str) -> None:
    # machine.check() ran at the end of each run: it raises on any broken invariant.
    assert attacks[name].lost_writes == 0


def test_the_command_reports_each_mitigation() -> None:
    result = CliRunner().invoke(main, ["experiment", "sidechannel", "--trials", "6", "--candidates", "4",
                                       "--seed", "2", "--mitigation", "none", "--mitigation", "vusion",
                                       "--json", "-"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["trials"], out["candidates"], out["seed"]) == (6, 4, 2)
    assert list(out["policies"]) == ["none", "vusion"]
    for r in out["policies"].values():
        assert {"merged", "unmerged", "ks_pvalue", "success_rate", "chance", "faults", "ksmd_cpu_seconds",
                "pages_saved", "extra_faults", "lost_writes"} <= set(r)
        assert r["merged"]["n"] == 6 and r["unmerged"]["n"] == 18
        assert r["lost_writes"] == 0
    assert out["policies"]["vusion"]["extra_faults"] == 24 - 6


@pytest.mark.parametrize(("args", "message"), [
    (["--candidates", "1"], "--candidates"),
    (["--trials", "0"], "--trials"),
    (["--mitigation", "all"], "--mitigation"),
    (["--seed", "-1"], "--seed"),
])
def test_the_command_refuses_bad_options(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["experiment", "sidechannel", *args])
    assert result.exit_code == 2
    assert message in result.output
