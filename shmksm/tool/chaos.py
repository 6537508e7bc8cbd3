"""The fault-injection campaign: SIGKILL every role at random moments and prove nothing is lost.

The workload: ``guests`` guests write and verify content shared across them
(:mod:`shmksm.workers.guest_chaos`), ksmd merges with ``sleep_millisecs`` 0,
a shadow MMU reads two guests continuously.  Every 0.05 to 0.4 s one process of
a chosen role is SIGKILLed — a guest, ksmd, the notifier broker or the shadow —
its death is reaped, it is restarted (a new guest in place of a killed one),
and ``machine.check()`` runs.  At the end every guest's address space gets a
known content (16 patterns), which is read back, and ksmd must converge to
that content's ideal counters.

A watchdog turns a hang into a failure: when one step of the campaign (a
kill, a restart, a check) or a guest's heartbeat makes no progress for
``hang_seconds``, every worker's Python stack (faulthandler, on SIGUSR1) and
the host's go into the report, and the campaign stops.

The report: kills per role, hangs, failed checks, bytes lost (bytes a guest
read back that differed from what it wrote, plus the final content's),
segments left in /dev/shm, and what the shadow saw (stale reads must be 0).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import numpy as np

from .._mm import control, segments
from ..errors import CheckError, LockTimeout, ProcessDied, ShmksmError, UsageError
from ..machine import Guest, Machine, Worker
from ..workers import guest_chaos
from ..workers.guest_random import pattern

ROLES: Final = ("guest", "ksmd", "broker", "shadow")
FINAL_PATTERNS: Final = 16


@dataclass(frozen=True)
class ChaosConfig:
    """What the campaign does; every field has the command line's option of the same name."""

    kills: int = 50
    seconds: float = 60.0
    seed: int = 0
    roles: tuple[str, ...] = ROLES
    guests: int = 4
    pages: int = 64
    hang_seconds: float = 30.0
    scanners: int = 1
    min_interval: float = 0.05
    max_interval: float = 0.4

    def __post_init__(self) -> None:
        bad = [r for r in self.roles if r not in ROLES]
        if bad or not self.roles:
            raise UsageError(f"unknown role {bad[0]!r}; roles: {', '.join(ROLES)}" if bad else "no role to kill")
        if self.kills < 0 or self.seconds <= 0 or self.hang_seconds <= 0:
            raise UsageError("kills must be >= 0, seconds and hang_seconds > 0")
        if not 2 <= self.guests <= 16:
            raise UsageError(f"the campaign runs 2 to 16 guests, not {self.guests}")
        if not 16 <= self.pages <= 4096:
            raise UsageError(f"the campaign's guests have 16 to 4096 pages, not {self.pages}")
        if not 1 <= self.scanners <= control.MAX_SCANNERS:
            raise UsageError(f"the campaign runs 1 to {control.MAX_SCANNERS} scanners, not {self.scanners}")


@dataclass
class ChaosReport:
    """What the campaign found.  ``ok`` when hangs, failed checks, bytes lost and segments left are all 0."""

    kills: dict[str, int]
    hangs: int = 0
    failed_checks: int = 0
    bytes_lost: int = 0
    segments_left: int = 0
    checks: int = 0
    verified_bytes: int = 0
    guest_ops: int = 0
    converged: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    ideal: dict[str, int] = field(default_factory=dict)
    stale_reads: int = 0
    unexpected_exits: int = 0
    locks_from_dead_holders: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    stacks: str = ""

    def failures(self) -> list[str]:
        """What went wrong, one phrase each; empty when the campaign passed."""
        found = [f"{getattr(self, name)} {name.replace('_', ' ')}" for name in
                 ("hangs", "failed_checks", "bytes_lost", "segments_left", "stale_reads", "unexpected_exits")
                 if getattr(self, name)]
        if not self.converged:
            found.append("ksmd did not converge to the ideal counters")
        return found

    @property
    def ok(self) -> bool:
        return not self.failures()

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def table(self) -> str:
        """The report as a few lines of text."""
        lines = [f"{'role':<8} {'kills':>6}"]
        lines += [f"{role:<8} {n:>6}" for role, n in self.kills.items()]
        lines.append(f"{'total':<8} {sum(self.kills.values()):>6}")
        lines.append("")
        for name in ("hangs", "failed_checks", "bytes_lost", "segments_left", "stale_reads", "unexpected_exits"):
            lines.append(f"{name:<24} {getattr(self, name)}")
        lines.append(f"{'checks':<24} {self.checks}")
        lines.append(f"{'verified_bytes':<24} {self.verified_bytes}")
        lines.append(f"{'locks_from_dead_holders':<24} {self.locks_from_dead_holders}")
        want = ", ".join(f"{k} {v}" for k, v in self.ideal.items())
        got = ", ".join(f"{k} {self.counters.get(k)}" for k in self.ideal)
        lines.append(f"{'converged':<24} {self.converged} ({got}; ideal {want})")
        lines.append(f"{'seconds':<24} {self.seconds:.1f}")
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


class Hang(ShmksmError):
    """A step of the campaign made no progress within the watchdog's bound."""


class _Watchdog:
    """Times each step of the campaign; on a hang, collects every process's Python stack once."""

    def __init__(self, machine: Machine, stack_dir: str, bound: float) -> None:
        self.machine = machine
        self.stack_dir = stack_dir
        self.bound = bound
        self.step = "start"
        self.since = time.monotonic()
        self.fired: str | None = None
        self.stacks = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmksm-chaos-watchdog", daemon=True)
        self._thread.start()

    def begin(self, step: str) -> None:
        if self.fired:
            raise Hang(self.fired)
        self.step, self.since = step, time.monotonic()

    def _run(self) -> None:
        while not self._done.wait(0.2):
            if self.fired is None and time.monotonic() - self.since > self.bound:
                self.fired = f"no progress for {self.bound:g} s in step: {self.step}"
                self.stacks = collect_stacks(self.machine, self.stack_dir)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)


def collect_stacks(machine: Machine, stack_dir: str) -> str:
    """Every live worker's Python stack (SIGUSR1 → faulthandler) and the host's threads, as text."""
    live = [w for w in machine.workers() if w.is_alive()]
    for w in live:
        try:
            os.kill(w.pid, signal.SIGCONT)
            os.kill(w.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    out = io.StringIO()
    for w in live:
        out.write(f"--- {w.name} (pid {w.pid})\n")
        try:
            with open(os.path.join(stack_dir, f"{w.pid}.txt")) as f:
                out.write(f.read() or "(no stack written)\n")
        except OSError:
            out.write("(no stack written)\n")
    out.write(f"--- host (pid {os.getpid()})\n")
    for ident, frame in sys._current_frames().items():
        out.write(f"thread {ident}:\n{''.join(traceback.format_stack(frame))}")
    return out.getvalue()


def ideal_counters(guests: int, pages: int, max_page_sharing: int) -> dict[str, int]:
    """pages_shared and pages_sharing once ksmd merged the final content (:func:`final_page`)."""
    total = guests * pages
    shared = sharing = 0
    for k in range(FINAL_PATTERNS):
        n = len(range(k, total, FINAL_PATTERNS))
        if n >= 2:
            ksm_pages = -(-n // max_page_sharing)
            shared += ksm_pages
            sharing += n - ksm_pages
    return {"pages_shared": shared, "pages_sharing": sharing}


def final_page(guest_index: int, page: int, pages: int) -> bytes:
    """The known content of a page at the end: one of FINAL_PATTERNS, spread over every guest."""
    return bytes(pattern(100 + (guest_index * pages + page) % FINAL_PATTERNS))


class _Campaign:
    def __init__(self, cfg: ChaosConfig, machine: Machine, stack_dir: str, report: ChaosReport) -> None:
        self.cfg = cfg
        self.machine = machine
        self.report = report
        self.rng = random.Random(cfg.seed)
        self.ctx = machine.ctx
        self.shared: Any = multiprocessing.get_context(machine.ctx.get_start_method()).RawArray(
            "q", guest_chaos.ROW * (cfg.guests + 1))
        self.words = np.frombuffer(self.shared, np.int64)
        self.guests: list[Guest] = []
        self.workers: list[Worker] = []
        self.shadow: Any = None
        self.generation = 0
        # When each guest row's heartbeat last moved (or its process was started).
        self.moved_at = np.full(cfg.guests, time.monotonic())
        self.watchdog = _Watchdog(machine, stack_dir, cfg.hang_seconds)

    # -- starting and restarting each role --------------------------------------------------------

    def start_guest(self, index: int) -> None:
        guest = self.machine.add_guest(pages=self.cfg.pages)
        self.generation += 1
        worker = self.machine.spawn(guest_chaos.chaos_guest, guest, index, self.cfg.seed * 1000 + self.generation,
                                    self.shared, name=f"guest{index}")
        self.moved_at[index] = time.monotonic()
        if index < len(self.guests):
            self.guests[index], self.workers[index] = guest, worker
        else:
            self.guests.append(guest)
            self.workers.append(worker)

    def start_shadow(self) -> None:
        live = [g for g in self.guests if g.alive][:2]
        self.shadow = self.machine.add_shadow(live, mode="free")

    def victim(self, role: str) -> Worker | None:
        m = self.machine
        if role == "guest":
            return self.rng.choice(self.workers)
        if role == "ksmd":
            if self.cfg.scanners == 1:
                return m.ksmd
            alive = [w for w in m.scanner_workers() if w.is_alive()]
            return self.rng.choice(alive) if alive else m.ksmd
        if role == "broker":
            return m.broker
        return self.shadow.worker if self.shadow is not None else None

    def restart(self, role: str, worker: Worker) -> None:
        m = self.machine
        if role == "guest":
            index = self.workers.index(worker)
            guest = self.guests[index]
            if worker.process.exitcode is not None and not worker.died and guest.alive:
                # It ended by itself (it sent a result or an error): no death, so no
                # exit_mmap by the reaper; its address space goes here.
                self.machine.remove_guest(guest)
            deadline = time.monotonic() + self.cfg.hang_seconds
            while guest.alive:  # the reaper tears the address space down
                if time.monotonic() > deadline:
                    raise Hang(f"guest {guest.id}'s address space was not torn down in {self.cfg.hang_seconds:g} s "
                               f"(its process {worker.pid}: exit status {worker.process.exitcode}, "
                               f"{worker.outcome()}, reaped {worker.reaped}; deaths waiting for recovery: "
                               f"{[(w.name, sig, gids) for w, sig, gids in self.machine._unrecovered]})")
                time.sleep(0.005)
            self.start_guest(index)
        elif role == "ksmd":
            m.start_ksmd()
        elif role == "broker":
            m.start_broker()
        else:
            self.record_shadow()
            self.start_shadow()

    def record_shadow(self) -> None:
        if self.shadow is not None:
            self.report.stale_reads += self.shadow.stats()["stale_reads"]

    # -- the campaign ----------------------------------------------------------------------------

    def run(self) -> None:
        cfg, m, report, dog = self.cfg, self.machine, self.report, self.watchdog
        for i in range(cfg.guests):
            self.start_guest(i)
        self.start_shadow()
        m.ksm.run = 1
        deadline = time.monotonic() + cfg.seconds
        beats = self.heartbeats()
        while sum(report.kills.values()) < cfg.kills and time.monotonic() < deadline:
            dog.begin("running the workload")
            time.sleep(self.rng.uniform(cfg.min_interval, cfg.max_interval))
            self.restart_the_fallen()
            role = self.rng.choice(cfg.roles)
            worker = self.victim(role)
            if worker is None or not worker.is_alive():
                continue
            dog.begin(f"killing {worker.name} (pid {worker.pid})")
            worker.kill(signal.SIGKILL)
            worker.process.join(cfg.hang_seconds)
            report.kills[role] += 1
            if worker.process.exitcode is not None and not worker.died:
                report.unexpected_exits += 1
                report.errors.append(f"{role} {worker.name} (pid {worker.pid}) ended by itself as it was killed: "
                                     f"{worker.outcome()}")
            dog.begin(f"restarting {role} after killing pid {worker.pid}")
            self.restart(role, worker)
            self.check(f"after killing {role} pid {worker.pid}")
            # A guest's heartbeat (its operations) must move between two kills a bound apart.
            now, now_beats = time.monotonic(), self.heartbeats()
            self.moved_at[now_beats != beats] = now
            beats = now_beats
            if (now - self.moved_at > cfg.hang_seconds).any():
                stuck = np.flatnonzero(now - self.moved_at > cfg.hang_seconds).tolist()
                raise Hang(f"guest(s) {stuck} made no progress for {cfg.hang_seconds:g} s")
        self.finish()

    def restart_the_fallen(self) -> None:
        """A process that ended without being killed is a failure of the campaign: count it, restart it."""
        for role in ROLES:
            if role == "guest":
                fallen = [w for w in self.workers if w.process.exitcode is not None]
            elif role == "ksmd":
                fallen = [w for w in self.machine.scanner_workers() if w.process.exitcode is not None]
            else:
                w = self.victim(role)
                fallen = [w] if w is not None and w.process.exitcode is not None else []
            for w in fallen:
                try:
                    outcome = f"returned {w.join(0)!r}"
                except ProcessDied as exc:
                    outcome = str(exc).splitlines()[0]
                self.report.unexpected_exits += 1
                self.report.errors.append(f"{role} {w.name} (pid {w.pid}) ended by itself: {outcome}")
                self.restart(role, w)

    def heartbeats(self) -> Any:
        rows = self.words[guest_chaos.ROW:].reshape(-1, guest_chaos.ROW)
        return rows[:, guest_chaos.OPS].copy()

    def check(self, when: str) -> None:
        self.watchdog.begin(f"machine.check() {when}")
        self.report.checks += 1
        try:
            self.machine.check()
        except CheckError as exc:
            self.report.failed_checks += 1
            self.report.errors.append(f"check {when}: {exc}")

    def finish(self) -> None:
        """Stop the guests; give every address space the known content; read it back; wait for ksmd."""
        cfg, m, report, dog = self.cfg, self.machine, self.report, self.watchdog
        dog.begin("stopping the guests")
        self.words[guest_chaos.STOP] = 1
        for w in self.workers:
            try:
                w.join(cfg.hang_seconds)
            except ProcessDied as exc:
                report.errors.append(str(exc).splitlines()[0])
        self.check("after the guests stopped")
        dog.begin("writing the final content")
        for i, g in enumerate(self.guests):
            view = g.view()
            content = b"".join(final_page(i, p, cfg.pages) for p in range(cfg.pages))
            view.write(0, content)
            got = np.frombuffer(view.read(0, view.size), np.uint8)
            report.bytes_lost += int(np.count_nonzero(got != np.frombuffer(content, np.uint8)))
            report.verified_bytes += view.size
        report.ideal = ideal_counters(cfg.guests, cfg.pages, m.ksm.max_page_sharing)
        dog.begin("waiting for ksmd to converge on the final content")
        # smart_scan skips a page that kept failing to merge (as the writers'
        # pages did) for up to 8 scans at a time: counters that stay the same
        # for a few scans would not mean that every page was looked at.
        m.ksm.smart_scan = 0
        if not m.scanner_workers() or not all(w.is_alive() for w in m.scanner_workers()):
            m.start_ksmd()
        c = m.wait_converged(timeout=cfg.hang_seconds * 2)
        report.counters = {k: c[k] for k in ("pages_shared", "pages_sharing", "pages_unshared", "full_scans")}
        report.converged = all(c[k] == v for k, v in report.ideal.items())
        self.check("at the end")
        self.record_shadow()


def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    """Run the campaign; return its report (``report.ok`` says whether it passed)."""
    report = ChaosReport(kills=dict.fromkeys(cfg.roles, 0))
    stack_dir = tempfile.mkdtemp(prefix="shmksm-chaos-")
    t0 = time.monotonic()
    prefix = ""
    frames = cfg.guests * cfg.pages * 4 + 256
    try:
        with Machine(frames=frames, sleep_millisecs=0, pages_to_scan=cfg.guests * cfg.pages // 4 + 16,
                     scanners=cfg.scanners, lock_timeout=cfg.hang_seconds, stack_dir=stack_dir) as machine:
            prefix = machine.system.spec.prefix
            campaign = _Campaign(cfg, machine, stack_dir, report)
            try:
                campaign.run()
            except (Hang, LockTimeout, ProcessDied, ShmksmError) as exc:
                if isinstance(exc, (Hang, LockTimeout)):
                    report.hangs += 1
                    report.stacks = campaign.watchdog.stacks or collect_stacks(machine, stack_dir)
                report.errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            finally:
                campaign.watchdog.stop()
                if campaign.watchdog.fired and not report.stacks:
                    report.hangs += 1
                    report.stacks = campaign.watchdog.stacks
                    report.errors.append(campaign.watchdog.fired)
                rows = campaign.words[guest_chaos.ROW:].reshape(-1, guest_chaos.ROW)
                report.bytes_lost += int(rows[:, guest_chaos.LOST].sum())
                report.verified_bytes += int(rows[:, guest_chaos.VERIFIED].sum())
                report.guest_ops = int(rows[:, guest_chaos.OPS].sum())
                report.locks_from_dead_holders = machine.system.locks.owner_deaths()
    finally:
        shutil.rmtree(stack_dir, ignore_errors=True)
        report.seconds = round(time.monotonic() - t0, 2)
    report.segments_left = len([n for n in os.listdir(segments.SHM_DIR) if prefix and n.startswith(prefix)])
    return report


def roles_option(text: str) -> tuple[str, ...]:
    """``guest,ksmd`` → ('guest', 'ksmd'); ``all`` → every role."""
    if text.strip() == "all":
        return ROLES
    return tuple(r.strip() for r in text.split(",") if r.strip())


__all__: Sequence[str] = ("ROLES", "ChaosConfig", "ChaosReport", "ideal_counters", "roles_option", "run_chaos")
