"""The deduplication side channel: the mitigation knob, security domains, VUsion, and the attack itself.

The attack tests compare distributions and success against chance with wide
margins: the machine may be loaded, but noise slows merged and unmerged
writes alike (they are timed interleaved, in a random order), while the
signal without a mitigation is several times the median write.
"""

from __future__ import annotations

import errno
import json
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import merge_pages, pfn_of, pte_of, wait_until

import shmksm
from shmksm._ksm import ksm
from shmksm._mm import control
from shmksm._mm.frames import INUSE
from shmksm._mm.frames import KSM as FRAME_KSM
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
    frames = machine.system.frames
    # Under vusion the old frames' puts wait, out of the faults: the frames
    # are still in use, the copies not yet counted, and the machine checks clean.
    assert sorted(frames.deferred().tolist()) == (before[1:] if vusion else [])
    assert all(frames.mapcount[before[p]] == 1 for p in range(4))
    machine.check()
    assert frames.drain_deferred() == (3 if vusion else 0)
    assert machine.system.get("cow_faults") == (3 if vusion else 0)
    assert [frames.mapcount[before[p]] == 1 for p in range(4)] == [True, not vusion, not vusion, not vusion]
    machine.check()
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
        m.reclaim()  # does the puts the faults deferred, which count their copies
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


def test_vusion_faults_on_a_ksm_page_and_a_private_page_alike_and_defer_what_differs(
        machine: shmksm.Machine) -> None:
    machine.ksm.mitigation = "vusion"
    a, b = machine.add_guest(pages=2), machine.add_guest(pages=1)
    content = unique_pages(2, seed=7)
    a.view().write(0, content)
    b.view().write(0, content[:PAGE])
    kpfn, _ = merge_pages(machine, a, 0, b, 0)
    assert kpfn > 0
    assert ksm.write_protect_pages(machine.system.table(a.id), np.arange(2)) == 1
    private = pfn_of(machine, a, 1)
    frames = machine.system.frames
    machine.reclaim()
    free = machine.free_frames()
    a.view().write(0, b"\x01")  # into the KSM page
    a.view().write(PAGE, b"\x02")  # into the private page
    # Each took a new frame and queued its old one; neither old frame changed yet.
    assert machine.free_frames() == free - 2
    assert frames.deferred().tolist() == [kpfn, private]
    assert (frames.mapcount[kpfn], frames.mapcount[private]) == (2, 1)
    assert machine.system.get("cow_ksm") == machine.system.get("cow_faults") == 0
    machine.check()
    # The deferred puts: the KSM page keeps b's mapping, the private frame goes.
    assert machine.vmstat()["cow_ksm"] == 1
    assert machine.system.get("cow_faults") == 1
    assert len(frames.deferred()) == 0
    assert frames.mapcount[kpfn] == 1 and frames.flags[kpfn] & FRAME_KSM
    assert not frames.flags[private] & INUSE, "freed"
    machine.check()
    machine.reclaim()
    assert machine.free_frames() == free - 1, "the private frame came back"
    assert a.view().read(0, 1) + a.view().read(PAGE, 1) == b"\x01\x02"
    assert b.view().read(0, PAGE) == content[:PAGE]


def _write_protected(machine: shmksm.Machine, pages: int) -> shmksm.Guest:
    """A guest of ``pages`` unique pages, every one write-protected as vusion's ksmd leaves them."""
    g = machine.add_guest(pages=pages)
    g.view().write(0, unique_pages(pages, seed=8))
    assert ksm.write_protect_pages(machine.system.table(g.id), np.arange(pages)) == pages
    return g


def _write_each_page(view: shmksm.GuestView, pages: int) -> None:
    for p in range(pages):
        view.write(p * PAGE, b"\xee")


@pytest.mark.parametrize("short_of", ["frames", "ring"])
def test_vusion_faults_do_the_deferred_puts_when_frames_or_the_ring_run_out(short_of: str) -> None:
    pages = control.DEFERRED_SLOTS + 100
    spare = 200 if short_of == "frames" else pages + 200
    with shmksm.Machine(frames=pages + spare, ksmd=False, mitigation="vusion") as m:
        g = _write_protected(m, pages)
        # More faults than free frames (an allocation finds none), or than
        # the ring holds (a fault finds it full): the faults themselves do
        # the puts queued, and no write fails for want of a frame.
        m.spawn(_write_each_page, g, pages).join(60)
        if short_of == "ring":
            assert len(m.system.frames.deferred()) == pages - control.DEFERRED_SLOTS
        assert len(m.system.frames.deferred()) <= control.DEFERRED_SLOTS
        m.check()
        assert m.reclaim() >= 0 and len(m.system.frames.deferred()) == 0
        assert m.system.get("cow_faults") == pages
        assert m.free_frames() == m.frames - 1 - pages, "every old frame came back"
        view = g.view()
        assert all(view.read(p * PAGE, 1) == b"\xee" for p in range(pages))
        m.check()


def _write_then_sleep(view: shmksm.GuestView, pages: int) -> None:
    _write_each_page(view, pages)
    time.sleep(600)


def test_a_guest_killed_with_deferred_puts_pending_leaks_no_frame() -> None:
    with shmksm.Machine(frames=256, ksmd=False, mitigation="vusion") as m:
        g = _write_protected(m, 64)
        frames = m.system.frames
        writer = m.spawn(_write_then_sleep, g, 64)
        wait_until(lambda: len(frames.deferred()) == 64, 10.0, "the writer's faults to queue their puts")
        writer.kill(signal.SIGKILL)
        wait_until(lambda: any(d.pid == writer.pid for d in m.deaths), 10.0, "the host to reap the writer")
        # The guest went with its one process; the recovery counted the copies
        # behind the queued puts and emptied the ring.
        assert not g.alive
        assert len(frames.deferred()) == 0
        assert m.system.get("cow_faults") == 64
        m.check()
        m.reclaim()
        assert m.free_frames() == m.frames - 1, "no frame leaked"


def test_ksmd_does_the_deferred_puts_while_it_idles() -> None:
    with shmksm.Machine(frames=256, mitigation="vusion", **FAST) as m:
        g = _write_protected(m, 32)
        m.spawn(_write_each_page, g, 32).join()
        wait_until(lambda: len(m.system.frames.deferred()) == 0, 10.0, "ksmd (run = 0) to do the puts")
        assert m.system.get("cow_faults") == 32
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

TRIALS, CANDIDATES = 100, 16  # the command's defaults


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
    assert r.hits <= TRIALS // 5


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
