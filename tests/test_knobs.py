"""/sys/kernel/mm/ksm knobs: defaults, the kernel's EINVAL and EBUSY, and their effect on a running ksmd."""

from __future__ import annotations

import errno
import time
from typing import Any

import pytest
from helpers import FAST, fill, merged_machine, wait_until

import shmksm
from shmksm._mm import control

KERNEL_KNOBS = {
    "run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "max_page_sharing": 256, "use_zero_pages": 0,
    "merge_across_nodes": 1, "smart_scan": 1, "stable_node_chains_prune_millisecs": 2000,
    "advisor_mode": "none", "advisor_target_scan_time": 200, "advisor_max_cpu": 70,
    "advisor_min_pages_to_scan": 500, "advisor_max_pages_to_scan": 30000,
}
# shmksm's own: read and written like the kernel's, not shown as sysfs files
OWN_KNOBS = {"scanners": 1, "mitigation": "none"}
KERNEL_COUNTERS = (
    "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned", "pages_skipped",
    "full_scans", "stable_node_chains", "stable_node_dups", "ksm_zero_pages", "general_profit",
)


def test_every_knob_and_counter_is_readable(machine: shmksm.Machine) -> None:
    ksm = machine.ksm
    assert ksm.knobs() == {**KERNEL_KNOBS, **OWN_KNOBS}
    for name, value in {**KERNEL_KNOBS, **OWN_KNOBS}.items():
        assert getattr(ksm, name) == value
    counters = ksm.counters()
    assert set(counters) == set(KERNEL_COUNTERS)
    for name in KERNEL_COUNTERS:
        assert getattr(ksm, name) == counters[name] == 0
    lines = ksm.sysfs_lines()
    assert "/sys/kernel/mm/ksm/advisor_mode:[none] scan-time" in lines
    assert "/sys/kernel/mm/ksm/pages_to_scan:100" in lines
    assert len(lines) == len(KERNEL_KNOBS) + len(KERNEL_COUNTERS)
    with pytest.raises(AttributeError):
        _ = ksm.no_such_knob


@pytest.mark.parametrize(("name", "value", "read_back"), [
    ("pages_to_scan", 5000, 5000),
    ("pages_to_scan", "64\n", 64),  # as written by echo into sysfs
    ("sleep_millisecs", 0, 0),
    ("max_page_sharing", 2, 2),
    ("use_zero_pages", 1, 1),
    ("smart_scan", 0, 0),
    ("merge_across_nodes", 0, 0),
    ("run", 1, 1),
    ("advisor_mode", "scan-time", "scan-time"),
    ("advisor_mode", "none", "none"),
    ("advisor_max_cpu", 100, 100),
    ("stable_node_chains_prune_millisecs", 500, 500),
])
def test_valid_values_are_taken(machine: shmksm.Machine, name: str, value: Any, read_back: Any) -> None:
    machine.ksm.set(name, value)
    assert getattr(machine.ksm, name) == read_back


INVALID = [
    ("max_page_sharing", 1),
    ("max_page_sharing", 0),
    ("run", 3),
    ("run", 4),
    ("use_zero_pages", 2),
    ("smart_scan", 2),
    ("merge_across_nodes", 2),
    ("pages_to_scan", -1),
    ("sleep_millisecs", -1),
    ("max_page_sharing", -5),
    ("pages_to_scan", 1 << 32),
    ("pages_to_scan", 1.5),
    ("pages_to_scan", "ten"),
    ("pages_to_scan", "10 pages"),
    ("pages_to_scan", ""),
    ("pages_to_scan", None),
    ("sleep_millisecs", [20]),
    ("advisor_mode", "fastest"),
    ("advisor_mode", 2),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_values_are_refused_like_the_kernel(machine: shmksm.Machine, name: str, value: Any) -> None:
    before = machine.ksm.knobs()
    with pytest.raises(shmksm.KnobError) as info:
        machine.ksm.set(name, value)
    assert isinstance(info.value, ValueError), "EINVAL is a ValueError"
    assert str(info.value)
    assert machine.ksm.knobs() == before, "a refused write changes nothing"


def test_attribute_writes_are_validated_too(machine: shmksm.Machine) -> None:
    with pytest.raises(shmksm.KnobError):
        machine.ksm.max_page_sharing = 1
    with pytest.raises(shmksm.KnobError):
        machine.ksm.run = 3
    assert (machine.ksm.max_page_sharing, machine.ksm.run) == (256, 0)


@pytest.mark.parametrize("name", ["no_such_knob", "pages_shared", "full_scans", "general_profit", "ksm_zero_pages"])
def test_unknown_names_and_counters_cannot_be_written(machine: shmksm.Machine, name: str) -> None:
    with pytest.raises(shmksm.KnobError):
        machine.ksm.set(name, 1)
    with pytest.raises(shmksm.KnobError):
        setattr(machine.ksm, name, 1)
    assert machine.ksm.counters()["pages_shared"] == 0


def test_bad_knobs_are_refused_when_the_machine_is_made() -> None:
    with pytest.raises(shmksm.KnobError):
        shmksm.Machine(frames=16, ksmd=False, max_page_sharing=1)
    with pytest.raises(shmksm.KnobError):
        shmksm.Machine(frames=16, ksmd=False, no_such_knob=1)


def test_pages_to_scan_is_refused_while_the_advisor_runs(machine: shmksm.Machine) -> None:
    machine.ksm.advisor_min_pages_to_scan = 300
    machine.ksm.advisor_mode = "scan-time"
    assert machine.ksm.pages_to_scan == 300, "the advisor starts from advisor_min_pages_to_scan"
    with pytest.raises(shmksm.KnobError):
        machine.ksm.pages_to_scan = 1000
    assert machine.ksm.pages_to_scan == 300
    machine.ksm.advisor_mode = "none"
    machine.ksm.pages_to_scan = 1000
    assert machine.ksm.pages_to_scan == 1000


def test_leaving_the_advisor_restores_the_default_pages_to_scan(machine: shmksm.Machine) -> None:
    machine.ksm.advisor_mode = "scan-time"
    assert machine.ksm.pages_to_scan == 500
    machine.ksm.advisor_mode = "none"
    assert machine.ksm.pages_to_scan == 100


def test_max_page_sharing_is_busy_while_pages_are_shared() -> None:
    machine, _ = merged_machine([[1] * 8])
    with machine:
        assert machine.ksm.pages_shared == 1
        with pytest.raises(shmksm.KnobBusyError) as info:
            machine.ksm.max_page_sharing = 3
        assert isinstance(info.value, OSError) and info.value.errno == errno.EBUSY
        with pytest.raises(shmksm.KnobBusyError):
            machine.ksm.merge_across_nodes = 0
        machine.ksm.max_page_sharing = 256  # the value it has: not a change, not busy
        assert machine.ksm.max_page_sharing == 256

        # After run=2 nothing is shared: the knob can change, and ksmd merges with the new cap.
        machine.ksm.run = 2
        wait_until(lambda: machine.ksm.pages_shared == 0 and machine.ksm.pages_sharing == 0, 10, "run=2")
        machine.ksm.max_page_sharing = 3
        machine.ksm.run = 1
        machine.wait_full_scans(2)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"]) == (3, 5)
        machine.check()


def test_run2_has_unmerged_everything_when_the_write_returns() -> None:
    machine, _ = merged_machine([[1] * 8])
    with machine:
        machine.ksm.run = 2
        machine.ksm.max_page_sharing = 3
        assert machine.ksm.pages_shared == 0


# -- knobs take effect while ksmd runs -------------------------------------------------------------


def test_run_0_stops_and_run_1_resumes_the_scanner() -> None:
    machine, _ = merged_machine([[1] * 64])
    with machine:
        # run=0 written while ksmd sleeps after a full scan: it must not start another.
        # A wake-up that began before the new sleep was written may end a full scan and
        # go on without sleeping; the one after it sleeps 200 ms after its full scan.
        machine.ksm.sleep_millisecs = 200
        machine.wait_full_scans(2)
        machine.ksm.run = 0
        stopped = machine.ksm.full_scans
        time.sleep(0.5)
        assert machine.ksm.full_scans == stopped
        machine.ksm.sleep_millisecs = 0
        machine.ksm.run = 1
        machine.wait_full_scans(3)
        assert machine.ksm.full_scans >= stopped + 3


def scanning_rate(machine: shmksm.Machine, seconds: float) -> tuple[float, int]:
    """(pages per batch, full scans) over ``seconds`` of a running ksmd."""
    s = machine.system
    pages, batches, scans = s.get("pages_scanned"), s.get("scanner_batches"), s.get("full_scans")
    time.sleep(seconds)
    dp, db = s.get("pages_scanned") - pages, s.get("scanner_batches") - batches
    return dp / max(db, 1), s.get("full_scans") - scans


def test_pages_to_scan_and_sleep_millisecs_take_effect_while_ksmd_runs() -> None:
    n = 2000
    with shmksm.Machine(frames=n + 16, pages_to_scan=100, sleep_millisecs=0, smart_scan=0) as machine:
        guest = machine.add_guest(pages=n)
        machine.spawn(fill, guest, list(range(1, n + 1))).join(30)
        machine.ksm.run = 1
        machine.wait_full_scans(1)
        per_batch, _ = scanning_rate(machine, 0.3)
        assert 50 < per_batch <= 100
        machine.ksm.pages_to_scan = 1000
        machine.wait_full_scans(1)
        per_batch, _ = scanning_rate(machine, 0.3)
        assert 500 < per_batch <= 1000
        machine.ksm.pages_to_scan = 100_000
        machine.wait_full_scans(1)
        _, fast_scans = scanning_rate(machine, 0.5)
        machine.ksm.sleep_millisecs = 200
        machine.wait_full_scans(1)
        _, slow_scans = scanning_rate(machine, 1.0)
        assert slow_scans <= 6 < fast_scans, (slow_scans, fast_scans)


def test_use_zero_pages_takes_effect_while_ksmd_runs() -> None:
    machine, _ = merged_machine([[0] * 16])
    with machine:
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"]) == (1, 15, 0)
        machine.ksm.run = 2
        wait_until(lambda: machine.ksm.pages_sharing == 0, 10, "run=2")
        machine.ksm.use_zero_pages = 1
        machine.ksm.run = 1
        machine.wait_full_scans(2)
        c = machine.ksm.counters()
        assert (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"]) == (0, 0, 16)
        machine.check()


def test_the_scan_time_advisor_tunes_pages_to_scan() -> None:
    n = 2000
    with shmksm.Machine(frames=n + 16, sleep_millisecs=0) as machine:
        guest = machine.add_guest(pages=n)
        machine.spawn(fill, guest, [1 + i % 50 for i in range(n)]).join(30)
        machine.ksm.advisor_min_pages_to_scan = 100
        machine.ksm.advisor_max_pages_to_scan = 200
        machine.ksm.advisor_mode = "scan-time"
        assert machine.ksm.pages_to_scan == 100
        machine.ksm.run = 1
        machine.wait_full_scans(2)
        assert 100 <= machine.ksm.pages_to_scan <= 200
        # New bounds apply from the next full scan on.
        machine.ksm.advisor_min_pages_to_scan = 300
        machine.ksm.advisor_max_pages_to_scan = 400
        machine.wait_full_scans(2)
        assert 300 <= machine.ksm.pages_to_scan <= 400
        machine.ksm.advisor_max_pages_to_scan = 150
        machine.ksm.advisor_min_pages_to_scan = 120
        machine.wait_full_scans(2)
        assert 120 <= machine.ksm.pages_to_scan <= 150
        assert machine.ksm.pages_shared == 50
        machine.check()


def test_knob_names_are_the_kernels() -> None:
    assert set(control.KNOB_DEFAULTS) - set(control.OWN_KNOBS) == set(KERNEL_KNOBS)
    assert set(control.OWN_KNOBS) == set(OWN_KNOBS)
    assert set(control.COUNTERS) == set(KERNEL_COUNTERS)
    assert set(FAST) <= set(KERNEL_KNOBS)
