"""Scripted phases: writes by several processes, then full scans, then the counters.

A scenario is a list of phases.  In a phase, processes write new contents
into their mergeable memory (while ksmd is stopped), then ksmd runs a given
number of full scans and is stopped again (or ``run=2`` unmerges
everything), and the counters are read: ``pages_shared``, ``pages_sharing``,
``pages_unshared``, ``pages_volatile``, ``pages_skipped`` and ``full_scans``
(the last two counted from the scenario's start; ``run=2`` sets full_scans
back to 0, as the kernel's unmerge_and_remove_all_rmap_items does).

The same driver runs on shmksm (:class:`ShmksmSide`) and, in the benchmark
``bench/compare_phases.py``, on the kernel's KSM, so both go through exactly
the same steps.  ksmd runs with ``pages_to_scan`` above the pages there are
and a long ``sleep_millisecs``: a batch ends at the end of a full scan (in
the kernel as here), so each batch is one whole full scan and ksmd is
stopped while it sleeps — every phase starts with the scan at its head, and
the outcome does not depend on when the stop came.  With a smaller
``pages_to_scan`` ksmd is stopped wherever its scan stands when the N-th
full scan has been seen, as a user stopping it would: the outcome then
varies from run to run, in the kernel as here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np

from .._ksm.scanner import Scanner
from .._mm.frames import PAGE_SIZE
from ..guest import MADV_MERGEABLE
from ..machine import Machine

PHASE_COUNTERS: Final = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                         "pages_skipped", "full_scans")
PAGES_TO_SCAN: Final = 100_000  # more than any scenario has: one batch is one full scan
SLEEP_MILLISECS: Final = 200  # ksmd is stopped while it sleeps after a full scan


@dataclass(frozen=True)
class Write:
    """Process ``proc`` (-1: every process) writes contents of ``kind`` and ``version``.

    kind ``same``: page i holds content (version, i), the same in every
    process; ``own``: content (version, process, i), unique; ``half``: even
    pages ``same``, odd pages ``own``.  ``pages`` limits the write to the
    first pages.
    """

    proc: int
    kind: str
    version: int
    pages: int | None = None


@dataclass(frozen=True)
class Phase:
    """Writes, then ``scans`` full scans and ``batches`` batches more (or ``run=2`` with ``unmerge``)."""

    writes: tuple[Write, ...] = ()
    scans: int = 3
    batches: int = 0
    unmerge: bool = False


@dataclass(frozen=True)
class Scenario:
    """Phases, and the ``pages_to_scan`` ksmd runs them with (default: one batch is a full scan)."""

    phases: tuple[Phase, ...]
    pages_to_scan: int = 0


def _same(version: int, pages: int) -> bytes:
    return np.random.default_rng([version, 1 << 30]).integers(0, 256, (pages, PAGE_SIZE), np.uint8).tobytes()


def _own(version: int, proc: int, pages: int) -> bytes:
    return np.random.default_rng([version, proc, 1 << 29]).integers(0, 256, (pages, PAGE_SIZE), np.uint8).tobytes()


def contents(write: Write, proc: int, pages: int) -> bytes:
    """The bytes ``write`` puts at the start of process ``proc``'s memory."""
    n = pages if write.pages is None else min(write.pages, pages)
    if write.kind == "same":
        return _same(write.version, n)
    if write.kind == "own":
        return _own(write.version, proc, n)
    if write.kind == "half":
        same = np.frombuffer(_same(write.version, n), np.uint8).reshape(n, PAGE_SIZE).copy()
        own = np.frombuffer(_own(write.version, proc, n), np.uint8).reshape(n, PAGE_SIZE)
        same[1::2] = own[1::2]
        return same.tobytes()
    raise ValueError(f"unknown kind of contents {write.kind!r}")


_ALL: Final = -1

_CHANGE = tuple(Phase((Write(_ALL, "same", v),)) for v in range(1, 6))

SCENARIOS: Final[dict[str, Scenario]] = {
    # Identical pages in every process: merged on the second full scan.
    "merges": Scenario((Phase((Write(_ALL, "half", 1),), scans=1), Phase(scans=1), Phase(scans=2))),
    # Merged, then every process writes into every page (copy-on-write), each its own contents.
    "cow-every-process": Scenario((Phase((Write(_ALL, "same", 1),)), Phase((Write(_ALL, "own", 2),)), Phase())),
    # Merged, then every page of every process changes once, to contents identical again.
    "change-once": Scenario((*_CHANGE[:2], Phase())),
    # The contents change in every phase.
    "change-repeatedly": Scenario(_CHANGE),
    # The same, each phase stopping the scan in the middle of the second process (two batches of 100
    # pages after the third full scan): the phase's writes come before and after the scan's cursor.
    "change-midscan": Scenario(tuple(Phase(p.writes, batches=2) for p in _CHANGE), pages_to_scan=100),
    # One process keeps changing half of its pages while the others hold still.
    "one-changes": Scenario((Phase((Write(_ALL, "same", 1),)),
                             *(Phase((Write(0, "own", v, pages=64),)) for v in range(2, 6)), Phase(scans=4))),
    # Unique contents (never merged: they age), then contents identical in every process.
    "unique-then-same": Scenario((Phase((Write(_ALL, "own", 1),)), Phase((Write(_ALL, "own", 2),)),
                                  Phase((Write(_ALL, "same", 3),)), Phase(), Phase())),
    # Process 0's pages change in every phase, the others' stay; then all write the same contents.
    "histories": Scenario((Phase((Write(_ALL, "own", 1),)), Phase((Write(0, "own", 2),)),
                           Phase((Write(0, "own", 3),)), Phase((Write(_ALL, "same", 4),)), Phase(), Phase())),
    # The same, stopped in the middle of the second process at every phase.
    "histories-midscan": Scenario((Phase((Write(_ALL, "own", 1),), batches=2),
                                   Phase((Write(0, "own", 2),), batches=2), Phase((Write(0, "own", 3),), batches=2),
                                   Phase((Write(_ALL, "same", 4),), batches=2), Phase(batches=2), Phase(batches=2)),
                                  pages_to_scan=100),
    # Merged, unmerged with run=2, scanned again.
    "unmerge": Scenario((Phase((Write(_ALL, "half", 1),)), Phase(unmerge=True), Phase(scans=1), Phase(scans=2))),
}


class Side(Protocol):
    """What the driver needs of a KSM: processes' memory, the counters, and ksmd run by phase."""

    def write(self, proc: int, offset: int, data: bytes) -> None: ...

    def get(self, name: str) -> int: ...

    def scan(self, scans: int, batches: int, timeout: float) -> None: ...

    def unmerge(self, timeout: float) -> None: ...


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.002)


def drive(side: Side, phases: tuple[Phase, ...], processes: int, pages: int, timeout: float = 120.0,
          counters: tuple[str, ...] = PHASE_COUNTERS) -> list[dict[str, int]]:
    """Run ``phases`` on ``side``; return ``counters`` after each.  ksmd is stopped (run=0) on entry."""
    base_skipped = side.get("pages_skipped")
    base_scans = side.get("full_scans")
    out = []
    for phase in phases:
        for w in phase.writes:
            for proc in range(processes) if w.proc == _ALL else [w.proc]:
                side.write(proc, 0, contents(w, proc, pages))
        if phase.unmerge:
            side.unmerge(timeout)
            base_scans = 0
        elif phase.scans or phase.batches:
            side.scan(phase.scans, phase.batches, timeout)
        row = {name: side.get(name) for name in counters}
        row["pages_skipped"] -= base_skipped
        row["full_scans"] -= base_scans
        out.append(row)
    return out


class KnobDriven:
    """ksmd driven through its ``run`` knob, as a user drives the kernel's: ``get`` and ``set`` by sysfs name.

    ``scan``: run=1 until ``scans`` full scans and ``batches`` batches more
    have ended, then run=0.  A batch shows as a change of pages_scanned or
    full_scans (published when it ends); ksmd then sleeps
    ``sleep_millisecs``, in which run=0 is written, so it stops after exactly
    that batch.  ``unmerge``: run=2 until nothing is merged or listed, then run=0.
    """

    def get(self, name: str) -> int:
        raise NotImplementedError

    def set(self, name: str, value: int) -> None:
        raise NotImplementedError

    def scan(self, scans: int, batches: int, timeout: float) -> None:
        target = self.get("full_scans") + scans
        self.set("run", 1)
        _wait(lambda: self.get("full_scans") >= target, timeout, f"{scans} full scans")
        for _ in range(batches):
            last = (self.get("pages_scanned"), self.get("full_scans"))
            _wait(lambda last=last: (self.get("pages_scanned"), self.get("full_scans")) != last, timeout, "a batch")
        self.set("run", 0)

    def unmerge(self, timeout: float) -> None:
        self.set("run", 2)
        _wait(lambda: not any(self.get(c) for c in PHASE_COUNTERS[:4]), timeout, "run=2")
        self.set("run", 0)


class ShmksmSide(KnobDriven):
    """The driver's side on a shmksm machine and its ksmd process: one guest per process, written by the host."""

    def __init__(self, machine: Machine, processes: int, pages: int) -> None:
        self.machine = machine
        self.guests = [machine.add_guest(pages=pages) for _ in range(processes)]
        self.views = [g.view() for g in self.guests]
        for view in self.views:
            view.write(0, b"\1" * (pages * PAGE_SIZE))  # every page present, as the kernel side's
            view.madvise(0, pages * PAGE_SIZE, MADV_MERGEABLE)

    def write(self, proc: int, offset: int, data: bytes) -> None:
        self.views[proc].write(offset, data)

    def get(self, name: str) -> int:
        return int(self.machine.ksm.counters()[name])

    def set(self, name: str, value: int) -> None:
        setattr(self.machine.ksm, name, value)


class ScannerSide(ShmksmSide):
    """The same on a machine without a ksmd process: the scanner runs in this one, batch by batch.

    Exactly the batches the knob-driven sides run, without their timing: for tests.
    """

    def __init__(self, machine: Machine, processes: int, pages: int) -> None:
        super().__init__(machine, processes, pages)
        self.scanner = Scanner(machine.system)

    def scan(self, scans: int, batches: int, timeout: float) -> None:
        budget = self.machine.ksm.pages_to_scan
        target = self.scanner.full_scans + scans
        while self.scanner.full_scans < target:
            self.scanner.do_scan(budget)
        for _ in range(batches):
            self.scanner.do_scan(budget)

    def unmerge(self, timeout: float) -> None:
        self.scanner.unmerge_all()


def run_shmksm(scenario: str, smart_scan: int, processes: int = 3, pages: int = 128, pages_to_scan: int = 0,
               sleep_millisecs: int = SLEEP_MILLISECS, in_process: bool = False) -> list[dict[str, int]]:
    """The counters after each phase of ``scenario`` on shmksm (``pages_to_scan`` 0: the scenario's).

    ``in_process``: the scanner runs in this process (:class:`ScannerSide`),
    else a ksmd process driven by its knobs.
    """
    plan = SCENARIOS[scenario]
    with Machine(frames=processes * pages * 2 + 64, ksmd=not in_process,
                 pages_to_scan=pages_to_scan or plan.pages_to_scan or PAGES_TO_SCAN,
                 sleep_millisecs=sleep_millisecs, smart_scan=smart_scan) as machine:
        side = (ScannerSide if in_process else ShmksmSide)(machine, processes, pages)
        return drive(side, plan.phases, processes, pages)
