"""The host: one :class:`Machine` creates every segment, spawns and reaps every process.

::

    with shmksm.Machine(frames=65536) as machine:
        guest = machine.add_guest(pages=1024)
        proc = machine.spawn(workload, guest, seed)
        proc.join()
        machine.check()

On leaving the ``with`` block — normally, by an exception or by Ctrl-C —
every worker is stopped and every segment is unlinked.  A watcher thread in
the host reaps workers as they exit; a guest process killed by a signal has
its address space torn down and the machine's accounting rebuilt (the
kernel's exit_mmap), and the death is reported by ``machine.deaths``.

No host call waits without bound: one that needs a lock a stopped process
holds raises LockTimeout after ``lock_timeout`` seconds.  ``machine.inject``
arms the named fault-injection points (:mod:`shmksm._mm.faults`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import faulthandler
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any

from ._ksm import explain as explaining
from ._ksm.scanner import MAX_GUEST_PAGES
from ._ksm.sysfs import Ksm, guest_ksm_stat
from ._kvm.secondary import ShadowMMU, clear_flush_young
from ._mistakes import (
    REIMPORTED_MAIN_EXIT,
    check_host_memory,
    check_spawnable,
    host_memory_message,
    refuse_in_reimported_main,
    refuse_unguarded_main,
    reimported_main_message,
)
from ._mm import check as checker
from ._mm import control, faults, mmu_notifier, segments
from ._mm.frames import PAGE_SIZE
from ._mm.locks import LockTable, default_context
from ._mm.system import System, SystemSpec
from ._mm.waiting import poll_until
from .errors import HostMemoryError, LockTimeout, ProcessDied, UsageError
from .guest import GuestView

DEFAULT_FRAMES = 65536
DEFAULT_LOCK_TIMEOUT = 10.0
_STATUS_WAIT_SECONDS = 5.0  # how long an ended worker's exit status may lag its pipe's end
_RECOVERY_ATTEMPT_SECONDS = 1.0  # the reaper's bound per recovery attempt; it retries


@dataclass(frozen=True)
class Death:
    """A worker that died by a signal, and what the host did about it."""

    name: str
    pid: int
    signal: int
    guest: int | None
    frames_reclaimed: int


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when its parent dies (Linux prctl PR_SET_PDEATHSIG).

    A worker's parent is the forkserver, which exits when the host dies —
    unless a worker still holds the forkserver's "alive" pipe, inherited at
    fork: the worker lets it go, so a killed host takes its workers along.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


def worker_main(spec: SystemSpec, gid: int | None, fn: Callable[..., Any], args: tuple[Any, ...],
                result: Connection, stack_dir: str | None = None) -> None:
    """Entry point of every worker process: attach, run ``fn``, send its result, detach.

    With ``stack_dir``, SIGUSR1 makes the worker write every thread's Python
    stack to ``stack_dir/PID.txt`` (faulthandler), for a watchdog's report.
    """
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if stack_dir is not None:
        stacks = open(os.path.join(stack_dir, f"{os.getpid()}.txt"), "w")  # noqa: SIM115 - lives as long as the process
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    system = spec.attach()
    try:
        target: Any = GuestView(system, gid) if gid is not None else system
        value = fn(target, *args)
        result.send(("ok", value))
    except BaseException as exc:  # reported to the host, which raises ProcessDied
        result.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        result.close()
        system.close()


class Worker:
    """A worker process of the machine: a guest's process, or a service like ksmd."""

    def __init__(self, process: Any, result: Connection, gid: int | None) -> None:
        self.process = process
        self.gid = gid
        self._result = result
        self._outcome: tuple[Any, ...] | None = None
        self.reaped = False
        self.sent_signal = 0
        self._collect_lock = threading.Lock()

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return int(self.process.pid)

    @property
    def name(self) -> str:
        """The name given at spawn (``name=``), or the process's default name."""
        return str(self.process.name)

    def is_alive(self) -> bool:
        """Whether the worker process still runs."""
        return bool(self.process.is_alive())

    def _collect(self) -> tuple[Any, ...]:
        """The worker's outcome, read once from its result pipe (the reaper thread and a join may race)."""
        with self._collect_lock:
            return self._collect_locked()

    def _collect_locked(self) -> tuple[Any, ...]:
        if self._outcome is None:
            try:
                self._outcome = self._result.recv() if self._result.poll() else None
            except (EOFError, OSError):
                self._outcome = None
            if self._outcome is None:
                # No result: it died.  Its exit status may lag its pipe's end
                # (the forkserver reports it); wait for it before saying how.
                self.process.join(_STATUS_WAIT_SECONDS)
                code = self.process.exitcode
                if code is None:
                    return ("died", f"worker {self.name} (pid {self.pid}) ended without its exit status")
                if code < 0:
                    how = f"was killed by signal {-code}"
                elif code == REIMPORTED_MAIN_EXIT:
                    how = f"exited at start: {reimported_main_message('the main script')}"
                elif self.sent_signal:
                    # The forkserver reports 255 when it lost the child's status.
                    how = f"was killed by signal {self.sent_signal} (exit status {code} as reported)"
                else:
                    how = f"exited with code {code}"
                self._outcome = ("died", f"worker {self.name} (pid {self.pid}) {how}")
        return self._outcome

    def outcome(self) -> str:
        """How the worker ended, in a line: its error, its death, or that it returned."""
        self.process.join(0)
        outcome = self._collect()
        return {"ok": "it returned", "error": str(outcome[1])}.get(outcome[0], str(outcome[-1]))

    @property
    def died(self) -> bool:
        """Did the worker end without reporting a result (killed, or lost by its parent)?"""
        code = self.process.exitcode
        return code is not None and (code < 0 or self._collect()[0] == "died")

    def join(self, timeout: float | None = None) -> Any:
        """Wait for the worker; return ``fn``'s result or raise ProcessDied with its error."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise ProcessDied(f"worker {self.name} (pid {self.pid}) still runs after {timeout} s")
        outcome = self._collect()
        if outcome[0] == "ok":
            return outcome[1]
        if outcome[0] == "error":
            raise ProcessDied(f"worker {self.name} failed: {outcome[1]}\n{outcome[2]}")
        raise ProcessDied(outcome[1])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default) to the worker; the machine recovers from its death."""
        self.sent_signal = int(sig)
        if self.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)


class Guest:
    """A guest address space: the host's handle."""

    def __init__(self, machine: Machine, gid: int, pages: int, domain: int = 0) -> None:
        self.machine = machine
        self.id = gid
        self.pages = pages
        self.domain = domain  # its security domain: with mitigation "domains", KSM merges only within one

    def __repr__(self) -> str:
        return f"<Guest {self.id} pages={self.pages} domain={self.domain}>"

    def view(self) -> GuestView:
        """A view of this guest for the host process itself."""
        self.machine._require_live(self)
        return GuestView(self.machine.system, self.id)

    def ksm_stat(self) -> dict[str, int]:
        """This guest's /proc/PID/ksm_stat."""
        return guest_ksm_stat(self.machine.system, self.id)

    @property
    def system(self) -> System:
        """The shared state of the machine this guest belongs to."""
        return self.machine.system

    @property
    def alive(self) -> bool:
        """Whether the guest's address space exists (not removed, its last process not gone)."""
        return self.machine._guests.get(self.id) is self and not self.machine._dying(self.id)


def _closer(ref: weakref.ref[Machine]) -> Callable[[], None]:
    """Close the machine behind ``ref`` if it is still there (an exit handler that keeps nobody alive)."""

    def close() -> None:
        machine = ref()
        if machine is not None:
            machine.close()

    return close


class Machine:
    """An emulated machine: a frame pool, guests, and the processes that use them."""

    def __init__(self, frames: int = DEFAULT_FRAMES, *, nodes: int = 1, overcommit: bool = False, ksmd: bool = True,
                 notifier_era: str = "2024", ctx: BaseContext | None = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, stack_dir: str | None = None, **knobs: Any) -> None:
        """``lock_timeout``: how long a host call waits for a lock before LockTimeout.
        ``stack_dir``: where workers write their Python stacks on SIGUSR1 (:func:`worker_main`)."""
        refuse_in_reimported_main()
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise UsageError(f"a machine needs at least 2 frames (the zero page and one more), not {frames!r}")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout > 0:
            raise UsageError(f"lock_timeout must be a positive number of seconds, not {lock_timeout!r}")
        if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= control.MAX_NODES:
            raise UsageError(f"a machine has 1 to {control.MAX_NODES} NUMA nodes, not {nodes!r}")
        if frames < 2 * nodes:
            raise UsageError(f"{nodes} NUMA nodes need at least {2 * nodes} frames, not {frames}")
        self.ctx = ctx or default_context()
        refuse_unguarded_main(self.ctx.get_start_method())
        check_host_memory(frames)
        segments.cleanup_stale()
        self.overcommit = overcommit
        self._lock = threading.RLock()
        self._stw = threading.Lock()  # one stop-the-world pass (check, recovery) at a time in this host
        self.lock_timeout = float(lock_timeout)
        self.stack_dir = stack_dir
        self._workers: list[Worker] = []
        self._guests: dict[int, Guest] = {}
        # Deaths whose recovery has not run yet (a stopped lock holder made it wait): (worker, signal, gids).
        self._unrecovered: list[tuple[Worker, int, list[int]]] = []
        self.deaths: list[Death] = []
        self._closed = False
        era = mmu_notifier.era_number(notifier_era)
        try:
            self.system = System.create(frames, LockTable(self.ctx, control.MAX_GUESTS, mmu_notifier.MAX_SHADOWS),
                                        nodes)
        except OSError as exc:
            if exc.errno != errno.ENOMEM:
                raise
            raise HostMemoryError(host_memory_message(frames)) from None
        self.system.locks.host_timeout = self.lock_timeout
        self._next_node = 0  # add_guest's round robin
        self.system.set("notifier_era", era)
        self.ksm = Ksm(self.system, on_write=self._knob_written)
        self._scanners: dict[int, Worker] = {}  # ksmd processes by scanner index
        self._ksmd_on = False  # start_ksmd was called, stop_ksmd not since
        self._shadows: dict[int, ShadowMMU] = {}
        self.broker: Worker | None = None
        try:
            for name, value in knobs.items():
                self.ksm.set(name, value)
        except BaseException:
            self.system.close()
            raise
        self._close_at_exit = _closer(weakref.ref(self))  # a machine nobody closed leaves nothing at exit
        atexit.register(self._close_at_exit)
        self._wake_r, self._wake_w = os.pipe()
        self._watcher = threading.Thread(target=self._watch, name="shmksm-reaper", daemon=True)
        self._watcher.start()
        if ksmd:
            self.start_ksmd()

    # -- ksmd ---------------------------------------------------------------------------------------

    @property
    def ksmd(self) -> Worker | None:
        """The scanner process (with several scanners, scanner 0's), None once stopped."""
        return self._scanners.get(0) if self._ksmd_on else None

    def scanner_workers(self) -> list[Worker]:
        """The scanner processes started and not stopped, by index (dead ones too)."""
        return [self._scanners[i] for i in sorted(self._scanners)] if self._ksmd_on else []

    def start_ksmd(self) -> Worker:
        """Start the scanner processes, one per ``scanners`` (again, those that died); they
        scan while ``run`` is 1.  Returns scanner 0's."""
        with self._lock:
            wanted = self.system.get("scanners")
            missing = [i for i in range(wanted) if i not in self._scanners or not self._scanners[i].is_alive()]
            if not missing:
                pids = ", ".join(str(self._scanners[i].pid) for i in range(wanted))
                raise UsageError(f"ksmd already runs (pid {pids})")
            self._ksmd_on = True
            self.system.set("scanner_stop", 0)
            self._start_scanners(missing)
            return self._scanners[0]

    def _start_scanners(self, indices: list[int]) -> None:
        from shmksm.workers.ksmd import ksmd as ksmd_main

        for i in indices:
            self._scanners[i] = self.spawn(ksmd_main, None, time.monotonic_ns(), i,
                                           name="ksmd" if i == 0 else f"ksmd{i}")

    def _knob_written(self, name: str) -> None:
        """After a knob write through ``machine.ksm``: more scanners wanted → start them
        (fewer: the extra ones see it and exit).  The reaper does the same for writes
        from another process (``shmksm knobs``)."""
        if name == "scanners":
            self._sync_scanners()

    def _sync_scanners(self) -> None:
        with self._lock:
            if not self._ksmd_on or self._closed:
                return
            # A scanner that was killed is restarted by start_ksmd only, as a dead ksmd is.
            start = [i for i in range(self.system.get("scanners"))
                     if i not in self._scanners or (not self._scanners[i].is_alive() and not self._scanners[i].died)]
            self._start_scanners(start)

    def stop_ksmd(self, timeout: float = 10.0) -> Any:
        """Ask the scanners to finish their batches and exit; return scanner 0's summary."""
        with self._lock:
            workers, on = self.scanner_workers(), self._ksmd_on
            self._ksmd_on = False
        if not on or not workers:
            return None
        self.system.set("scanner_stop", 1)
        out = [w.join(timeout) if w.process.exitcode is None or w.process.exitcode >= 0 else None for w in workers]
        return out[0]

    def wait_converged(self, stable_scans: int = 3, timeout: float = 120.0) -> dict[str, int]:
        """Wait until pages_shared, pages_sharing and ksm_zero_pages stay the same for ``stable_scans``
        full scans (at least two scans after now: merging needs them); return the counters."""
        deadline = time.monotonic() + timeout
        self.wait_full_scans(2, timeout)
        last, same = None, 0
        while same < stable_scans:
            c = self.ksm.counters()
            key = (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"])
            same = same + 1 if key == last else 0
            last = key
            self.wait_full_scans(1, max(0.001, deadline - time.monotonic()))
        return self.ksm.counters()

    def _scanners_started(self) -> bool:
        """Does every live scanner process show its pid in its entry (it runs its loop)?"""
        with self._lock:
            workers = dict(self._scanners) if self._ksmd_on else {}
        pids = self.ksm.per_scanner("scanner_pid")
        return all(i >= len(pids) or pids[i] == w.pid or not w.is_alive() for i, w in workers.items())

    def wait_full_scans(self, n: int, timeout: float = 60.0) -> int:
        """Wait until ``full_scans`` has grown by ``n``; return the new value.

        Counted from the moment every live scanner process shows its pid in its entry.
        One (re)started just now may still be starting up (importing its modules takes
        seconds on a loaded machine): until it shows, the others neither wait for it nor
        count it, and the full scans that pass meanwhile are scans without its pages.
        """
        deadline = time.monotonic() + timeout
        poll_until(self._scanners_started, timeout,
                   lambda: ProcessDied(f"a scanner did not start in {timeout} s"), first=0.001, most=0.01)
        timeout = max(0.001, deadline - time.monotonic())
        start = self.system.get("full_scans")

        def ksmd_runs() -> None:
            workers = self.scanner_workers()
            if not any(w.is_alive() for w in workers):
                why = f": {workers[0].outcome()}" if workers else ""
                raise ProcessDied(f"ksmd is not running{why}")

        poll_until(lambda: self.system.get("full_scans") >= start + n, timeout,
                   lambda: ProcessDied(f"ksmd made {self.system.get('full_scans') - start} of {n} full scans "
                                       f"in {timeout} s"), check=ksmd_runs, first=0.001, most=0.002)
        return self.system.get("full_scans")

    @property
    def frames(self) -> int:
        """The size of the frame pool, the zero page included."""
        return self.system.frames.nframes

    @property
    def nodes(self) -> int:
        """NUMA nodes the frame pool is split into."""
        return self.system.get("nodes")

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Machine {self.system.spec.prefix} frames={self.frames} guests={len(self._guests)}>"

    # -- MMU notifiers --------------------------------------------------------------------------

    @property
    def notifier_era(self) -> str:
        """Which era's notifier calls the producers make: 2009, 2012, 2024 or interval."""
        return mmu_notifier.ERAS[self.system.get("notifier_era")]

    @notifier_era.setter
    def notifier_era(self, era: str) -> None:
        self.system.set("notifier_era", mmu_notifier.era_number(era))

    def start_broker(self) -> Worker:
        """Start the notifier broker process (add_shadow does it when needed)."""
        if self.broker is not None and self.broker.is_alive():
            return self.broker
        from shmksm.workers.broker import broker as broker_main

        self.system.notify_area.v[mmu_notifier.H_STOP] = 0
        self.broker = self.spawn(broker_main, None, name="broker")
        return self.broker

    def add_shadow(self, guests: list[Guest], *, change_pte: bool = True, mode: str = "rounds",
                   sync: bool = False) -> ShadowMMU:
        """Start a shadow worker mirroring ``guests`` and register a notifier for each.

        ``change_pte=False`` registers a notifier without that callback: it
        gets invalidate_page instead in 2009, nothing from 2012 (the range
        calls cover the change).  ``mode`` is ``rounds`` (read every page
        when asked: ``shadow.round()``) or ``free`` (read continuously).
        Callbacks are delivered asynchronously: just after a PTE change, the
        shadow may still read through its old entry.  ``sync=True`` makes every
        producer wait until this shadow has run the start of an invalidation
        before it changes the PTE, as the kernel's callbacks have run when the
        call returns: the shadow then never reads a page older than the
        guest's last completed write.
        """
        if mode not in ("rounds", "free"):
            raise UsageError(f"shadow mode must be 'rounds' or 'free', not {mode!r}")
        deadline = time.monotonic() + self.lock_timeout
        while True:
            with self._lock:
                self._require_open()
                for g in guests:
                    self._require_live(g)
                if self._free_shadow_slot():
                    self.start_broker()
                    shadow = ShadowMMU.claim(self.system, change_pte, self._shadow_gone, sync=sync)
                    self._shadows[shadow.slot] = shadow
                    for g in guests:
                        shadow.register(g)
                    from shmksm.workers.shadow import shadow as shadow_main

                    shadow.started(self.spawn(shadow_main, None, shadow.slot, [g.id for g in guests], mode,
                                              name=f"shadow{shadow.slot}"))
                    return shadow
            # Only slots of dead shadows: the broker frees each once its registrations are dropped.
            if time.monotonic() > deadline:
                raise LockTimeout(f"no dead shadow's slot was freed by the notifier broker in {self.lock_timeout:g} s")
            self.start_broker()
            self.system.locks.broker_bell.release()
            time.sleep(0.002)

    def _free_shadow_slot(self) -> bool:
        """Is a notifier slot free?  False if only dead shadows' are left; UsageError if none is either."""
        states = self.system.notify_area.slots[:, mmu_notifier.S_STATE]
        if (states == mmu_notifier.SLOT_FREE).any():
            return True
        if not (states == mmu_notifier.SLOT_DEAD).any():
            raise UsageError(f"at most {mmu_notifier.MAX_SHADOWS} shadow workers per machine")
        return False

    def shadows(self) -> list[ShadowMMU]:
        """The shadow MMUs running now."""
        return list(self._shadows.values())

    def _shadow_gone(self, shadow: ShadowMMU) -> None:
        """A shadow stopped or died: free its slot; it holds back reclamation no more."""
        with self._lock:
            if self._shadows.pop(shadow.slot, None) is not None:
                shadow.release_slot()

    # -- fault injection ----------------------------------------------------------------------------

    def inject(self, point: str, action: str = "kill", times: int = 1, process: Worker | int | None = None) -> None:
        """Arm a fault-injection point: ``action`` at its next ``times`` hits.

        ``point`` is one of :data:`shmksm._mm.faults.POINTS` (``frames.alloc``,
        ``ksm.merge.after_write_protect``, ``broker.after_copy``,
        ``shadow.mid_batch``, ``check.recover``); ``action`` is ``kill``,
        ``stop`` or ``fail``; ``process`` (a worker or a pid) limits it to one
        process, by default any worker (``check.recover``: the host).
        ``times=0`` disarms the point.
        """
        if point not in faults.POINTS:
            raise UsageError(f"unknown injection point {point!r}; points: {', '.join(faults.POINTS)}")
        if action not in faults.ACTIONS:
            raise UsageError(f"unknown injection action {action!r}; actions: {', '.join(faults.ACTIONS)}")
        if action == "fail" and point != "frames.alloc":
            raise UsageError(f"only frames.alloc can fail; {point} can kill or stop")
        if isinstance(times, bool) or not isinstance(times, int) or times < 0:
            raise UsageError(f"times must be a non-negative integer, not {times!r}")
        pid = process.pid if isinstance(process, Worker) else int(process or 0)
        faults.arm(self.system.frames.cv, faults.POINTS.index(point), faults.ACTIONS.index(action) + 1, times,
                   pid, os.getpid())

    def injected(self, point: str) -> int:
        """How many hits of ``point`` fired since it was last armed."""
        if point not in faults.POINTS:
            raise UsageError(f"unknown injection point {point!r}; points: {', '.join(faults.POINTS)}")
        return faults.fired(self.system.frames.cv, faults.POINTS.index(point))

    def clear_flush_young(self, guest: Guest, clear: bool = True) -> Any:
        """The aging pass: which pages the guest or any shadow accessed (clearing the bits)."""
        self._require_live(guest)
        return clear_flush_young(self.system, self.shadows(), guest, clear)

    # -- guests ---------------------------------------------------------------------------------

    def add_guest(self, pages: int, node: int | None = None, domain: int = 0) -> Guest:
        """A new address space of ``pages`` untouched pages of 4 KiB, on NUMA ``node``, in security ``domain``.

        Its frames come from that node while it has free ones, then from the
        others (counted as numa_miss / numa_foreign).  ``node`` None: the
        nodes in turn, round robin.  Domains are numbers chosen by the caller
        (tenants, say); they matter under ``mitigation = "domains"``, when KSM
        merges pages only within one domain (across domains, only empty pages).
        """
        if isinstance(pages, bool) or not isinstance(pages, int) or pages <= 0:
            raise UsageError(f"a guest needs a positive number of pages, not {pages!r}")
        if node is not None and (isinstance(node, bool) or not isinstance(node, int)
                                 or not 0 <= node < self.nodes):
            raise UsageError(f"node must be one of 0..{self.nodes - 1}, not {node!r}")
        if isinstance(domain, bool) or not isinstance(domain, int) or not 0 <= domain < 1 << 31:
            raise UsageError(f"a guest's domain is an integer in 0..{(1 << 31) - 1}, not {domain!r}")
        if pages > MAX_GUEST_PAGES:
            raise UsageError(f"a guest has at most {MAX_GUEST_PAGES} pages ({MAX_GUEST_PAGES >> 8} MiB), not {pages}")
        with self._lock:
            self._require_open()
            committed = sum(g.pages for g in self._guests.values()) + pages
            if not self.overcommit and committed > self.frames - 1:
                raise UsageError(
                    f"machine too small: guests would have {committed} pages "
                    f"({committed * PAGE_SIZE >> 20} MiB) but the pool has {self.frames - 1} free frames; "
                    f"give more frames or pass overcommit=True")
            if node is None:
                node, self._next_node = self._next_node, (self._next_node + 1) % self.nodes
            table = self.system.create_guest(pages, node, domain)
            guest = self._guests[table.gid] = Guest(self, table.gid, pages, domain)
            return guest

    def remove_guest(self, guest: Guest) -> None:
        """Tear down a guest's address space (exit_mmap) and free its page table."""
        with self._lock:
            self._require_live(guest)
            for w in self._workers:
                if w.gid == guest.id and w.is_alive():
                    raise UsageError(f"guest {guest.id} still has a running process (pid {w.pid})")
            with self._stop_the_world(self.lock_timeout):
                checker.recover(self.system, [guest.id], self.lock_timeout)
            self._guest_gone(guest.id)

    def _guest_gone(self, gid: int) -> None:
        """Forget a torn-down guest (``_lock`` held): its page table goes; its release ran."""
        del self._guests[gid]
        self.system.forget_guest(gid)

    def guests(self) -> list[Guest]:
        """The live guests."""
        return list(self._guests.values())

    def explain(self) -> explaining.Explanation:
        """Why pages merged or not: every page of every guest under exactly one reason.

        ``result.guests[gid]`` and ``result.total`` map each reason of
        ``shmksm._ksm.explain.REASONS`` to pages (summing to the guests'
        pages).  ksmd publishes its rmap items' states for it between two
        batches; with no ksmd running every mergeable page waits for its scans.
        """
        with self._lock:
            self._require_open()
            tables = {gid: (self.system.table(gid).ptes, self.system.table(gid).header) for gid in self._guests}
        return explaining.explain(self.system.spec.prefix, tables, self.system.ctl, self.ksm.counters)

    def _require_open(self) -> None:
        if self._closed:
            raise UsageError("the machine is closed")

    def _require_live(self, guest: Guest) -> None:
        self._require_open()
        if guest.machine is not self or self._guests.get(guest.id) is not guest or self._dying(guest.id):
            raise UsageError(f"guest {guest.id} is not a live guest of this machine")

    def _dying(self, gid: int) -> bool:
        """Is the guest's address space waiting to be torn down (its last process died)?"""
        return any(gid in gids for _, _, gids in self._unrecovered)

    # -- processes --------------------------------------------------------------------------------

    def spawn(self, fn: Callable[..., Any], guest: Guest | None, *args: Any, name: str | None = None) -> Worker:
        """Run ``fn(view, *args)`` in a new process attached to ``guest``.

        With ``guest`` None, ``fn`` gets the machine's :class:`System` instead
        (for services such as the scanner).  ``fn`` must be a module-level
        function and ``args`` must pickle: the worker is a new process.
        """
        check_spawnable(fn)
        with self._lock:
            if guest is not None:
                self._require_live(guest)
            else:
                self._require_open()
            gid = guest.id if guest is not None else None
            reader, writer = self.ctx.Pipe(duplex=False)
            label = name or (f"guest{gid}" if gid is not None else getattr(fn, "__name__", "worker"))
            process = self.ctx.Process(target=worker_main, name=label, daemon=True,  # type: ignore[attr-defined]
                                       args=(self.system.spec, gid, fn, args, writer, self.stack_dir))
            try:
                process.start()
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                reader.close()
                raise UsageError(f"spawn: the arguments of {label} must pickle (the worker is a new process): "
                                 f"{exc}") from None
            finally:
                writer.close()
            worker = Worker(process, reader, gid)
            self._workers.append(worker)
        os.write(self._wake_w, b"x")
        return worker

    def workers(self) -> list[Worker]:
        """Every worker process spawned so far, running or ended."""
        return list(self._workers)

    def _watch(self) -> None:
        """Reap workers as they exit; recover from those killed by a signal."""
        wake = self._wake_r
        while True:
            with self._lock:
                if self._closed:
                    return
                live = {w.process.sentinel: w for w in self._workers if w.process.exitcode is None}
                pending = bool(self._unrecovered)
            ready = wait([wake, *live], timeout=0.05 if pending else 1.0)
            if wake in ready:
                os.read(wake, 4096)
            self._sync_scanners()
            with self._lock:
                if self._closed:
                    return
                for sentinel in ready:
                    worker = live.get(sentinel)
                    if worker is not None:
                        worker.process.join(0)
                        self._reap(worker)
                # A worker joined by another thread before this one saw it exit.
                for worker in self._workers:
                    if not worker.reaped and worker.process.exitcode is not None:
                        self._reap(worker)
            with contextlib.suppress(LockTimeout):
                self._recover_deaths(_RECOVERY_ATTEMPT_SECONDS)

    def _reap(self, worker: Worker) -> None:
        """A worker exited (``_lock`` held): once per worker; a killed one's recovery is queued."""
        if worker.reaped:
            return
        worker.reaped = True
        for shadow in list(self._shadows.values()):
            if shadow.worker is worker:
                self._shadow_gone(shadow)
        if not worker.died:
            return
        code = worker.process.exitcode
        sig = -code if code is not None and code < 0 else worker.sent_signal or signal.SIGKILL
        # The address space goes with its last process (exit_mmap); a guest
        # with another live process only needs the repair.
        others = [w for w in self._workers if w is not worker and w.gid == worker.gid and w.is_alive()]
        dead = [worker.gid] if worker.gid is not None and worker.gid in self._guests and not others else []
        self._unrecovered.append((worker, sig, dead))

    def _stop_the_world(self, timeout: float) -> Any:
        """This host's one stop-the-world pass at a time, had within ``timeout`` (else LockTimeout)."""
        if not self._stw.acquire(timeout=timeout):
            raise LockTimeout(f"another check or recovery of this machine ran for more than {timeout:g} s")
        stw = self._stw

        @contextlib.contextmanager
        def held() -> Any:
            try:
                yield
            finally:
                stw.release()
        return held()

    def _recover_deaths(self, timeout: float) -> None:
        """Run the recoveries of the deaths reaped so far, in order; LockTimeout if one is not done in time.

        A recovery stops the world: a lock that a dead worker held is had at
        once, but one held by a stopped process is not, and the recovery is
        left for a later call (the reaper retries).
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._unrecovered or self._closed:
                    return
            with self._stop_the_world(max(0.0, deadline - time.monotonic())):
                with self._lock:
                    if not self._unrecovered or self._closed:
                        return  # another thread recovered them meanwhile
                    worker, sig, dead = self._unrecovered[0]
                try:
                    reclaimed = checker.recover(self.system, dead, max(0.0, deadline - time.monotonic()))
                except faults.InjectedDeath:
                    continue  # the recovery itself was "killed" midway: run it again from the start
                with self._lock:
                    self._unrecovered.pop(0)
                    for gid in dead:
                        self._guest_gone(gid)
                    self.deaths.append(Death(worker.name, worker.pid, sig, worker.gid, reclaimed))

    def join_all(self, timeout: float | None = None) -> list[Any]:
        """Join every worker started so far; return their results in order."""
        return [w.join(timeout) for w in list(self._workers)]

    # -- checks and reclamation ------------------------------------------------------------------

    def check(self, timeout: float | None = None) -> None:
        """Raise CheckError naming the first broken accounting invariant.

        Recovers first from any worker that died meanwhile.  Waits at most
        ``timeout`` seconds (default: ``lock_timeout``) for the locks, then
        raises LockTimeout naming the lock and its holder: a stopped process
        may hold one as long as it likes.
        """
        timeout = self.lock_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._lock:
            self._require_open()
            for worker in self._workers:
                if worker.process.exitcode is not None:
                    self._reap(worker)
        self._recover_deaths(timeout)
        left = max(0.0, deadline - time.monotonic())
        with self._stop_the_world(left):
            checker.check(self.system, max(0.0, deadline - time.monotonic()))

    def reclaim(self) -> int:
        """Do the puts that write faults deferred (mitigation "vusion"), then run a
        reclaim pass; return how many waiting frames became free."""
        frames = self.system.frames
        frames.drain_deferred()
        return frames.reclaim()

    def free_frames(self) -> int:
        """Frames on the free list now (not counting those waiting for reclamation)."""
        return self.system.get("free_count")

    def vmstat(self) -> dict[str, int]:
        """The /proc/vmstat counters the emulation keeps, by the kernel's names (``cow_ksm``).

        A copy whose put a write fault deferred (mitigation "vusion") is
        counted once the put is done: those still queued are done first.
        """
        self.system.frames.drain_deferred()
        return {name: self.system.get(name) for name in control.VMSTAT}

    # -- shutdown ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker, then unlink every segment.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._close_at_exit)
        os.write(self._wake_w, b"x")
        self._watcher.join(5)
        scanners = [w for w in self._scanners.values() if w.process.exitcode is None]
        if scanners:
            self.system.set("scanner_stop", 1)
            for w in scanners:
                w.process.join(5)
        area = self.system.notify_area
        for shadow in list(self._shadows.values()):
            area.slots[shadow.slot, mmu_notifier.S_STOP] = 1
            self.system.locks.shadow_bells[shadow.slot].release()
        if self.broker is not None and self.broker.process.exitcode is None:
            area.v[mmu_notifier.H_STOP] = 1
            self.system.locks.broker_bell.release()
            self.broker.process.join(5)
        for worker in self._workers:
            if worker.process.exitcode is None:
                worker.process.terminate()
        for worker in self._workers:
            worker.process.join(2)
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join(2)
            worker._result.close()
        self.system.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
