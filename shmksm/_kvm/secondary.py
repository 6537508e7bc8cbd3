"""The host's side of the secondary MMUs: registering shadow workers, aging, the broker.

``machine.add_shadow([guest, ...])`` starts a shadow worker (``shmksm._kvm.shadow``)
and registers a notifier for each guest (mmu_notifier_register);
``shadow.unregister(guest)`` returns only once no callback of that
registration can run any more (mmu_notifier_unregister: ``release`` first
if it has not run yet).  ``machine.clear_flush_young(guest)`` is the aging
pass: it clears the primary YOUNG bits and asks every shadow which pages it
accessed, like page reclaim's ``mmu_notifier_clear_flush_young``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .._mm import mmu_notifier as mn
from .._mm.pagetable import YOUNG
from .._mm.system import System
from .._mm.waiting import poll_until
from ..errors import ProcessDied, UsageError


class GuestHandle(Protocol):
    """What a secondary MMU needs of a guest (``shmksm.Guest`` is one)."""

    @property
    def id(self) -> int: ...

    @property
    def alive(self) -> bool: ...

    @property
    def system(self) -> System: ...


class WorkerHandle(Protocol):
    """What the host needs of a shadow's process (``shmksm.Worker`` is one)."""

    @property
    def pid(self) -> int: ...

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> Any: ...


def _wait(cond: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] | None = None) -> None:
    def check() -> None:
        if alive is not None and not alive():
            raise ProcessDied(f"{what}: the shadow worker died")

    poll_until(cond, timeout, lambda: ProcessDied(f"{what}: no answer in {timeout} s"), check=check)


class ShadowMMU:
    """The host's handle of one shadow worker: its notifier slot, registrations and worker.

    It owns its slot's protocol: :meth:`claim` readies a free slot (its row in
    the notify area, and a reclamation participant acknowledged up to now, so
    that no frame dropped from here on is reused before this shadow has seen
    its invalidation); :meth:`release_slot` ends it.  ``on_gone`` tells the
    owner (the machine) that the slot is free again.
    """

    def __init__(self, system: System, slot: int, change_pte: bool,
                 on_gone: Callable[[ShadowMMU], None] = lambda shadow: None, sync: bool = False) -> None:
        self.system = system
        self.slot = slot
        self.change_pte = change_pte
        self.sync_invalidations = sync
        self.worker: WorkerHandle | None = None
        self.registered: set[int] = set()
        self._registered_guests: dict[int, GuestHandle] = {}  # the guest of each registration (ids are reused)
        self._row = system.notify_area.slots[slot]
        self._on_gone = on_gone

    @classmethod
    def claim(cls, system: System, change_pte: bool,
              on_gone: Callable[[ShadowMMU], None] = lambda shadow: None, sync: bool = False) -> ShadowMMU:
        """Take a free notifier slot and make it live; UsageError if all are taken.  Host only.

        ``sync``: producers wait for this shadow's acknowledgement of every
        invalidation's start before they change the PTE.
        """
        area = system.notify_area
        free = [s for s in range(mn.MAX_SHADOWS) if area.slots[s, mn.S_STATE] == mn.SLOT_FREE]
        if not free:
            raise UsageError(f"at most {mn.MAX_SHADOWS} shadow workers per machine")
        slot = free[0]
        row = area.slots[slot]
        row[:] = 0
        row[mn.S_CHANGE_PTE] = int(change_pte)
        part = system.frames.register_participant(os.getpid())
        row[mn.S_PART] = part
        head = system.get("epoch")
        row[mn.S_ACKED] = row[mn.S_THROUGH] = head
        system.frames.acknowledge(part, head)
        row[mn.S_SYNC] = int(sync)
        row[mn.S_STATE] = mn.SLOT_LIVE
        if sync:
            with system.locks.notify:
                area.v[mn.H_SYNC] += 1
        return cls(system, slot, change_pte, on_gone, sync)

    def started(self, worker: WorkerHandle) -> None:
        """The worker process of this slot runs: record it."""
        self.worker = worker
        self._row[mn.S_PID] = worker.pid

    def release_slot(self) -> None:
        """The slot's end (the worker stopped or died): it holds back reclamation, and producers, no more."""
        if self._row[mn.S_SYNC] and self._row[mn.S_STATE] == mn.SLOT_LIVE:
            with self.system.locks.notify:
                self.system.notify_area.v[mn.H_SYNC] -= 1
        # The broker frees the slot once it has read every record before this
        # point (the shadow's registrations among them) and dropped them.
        self._row[mn.S_DEAD_AT] = self.system.get("epoch")
        self._row[mn.S_STATE] = mn.SLOT_DEAD
        self.system.frames.unregister_participant(int(self._row[mn.S_PART]))
        self.system.locks.broker_bell.release()

    def __repr__(self) -> str:
        return f"<ShadowMMU slot={self.slot} guests={sorted(self.registered)}>"

    @property
    def alive(self) -> bool:
        return self.worker is not None and self.worker.is_alive() and self._row[mn.S_STATE] == mn.SLOT_LIVE

    def register(self, guest: GuestHandle) -> None:
        """mmu_notifier_register: callbacks for ``guest`` from now on.  Safe while callbacks run."""
        if not guest.alive or guest.system is not self.system:
            raise UsageError(f"guest {guest.id} is not a live guest of this machine")
        earlier = self._registered_guests.get(guest.id)
        if earlier is not None and not earlier.alive:
            self._unregister(earlier, 10.0)  # torn down, and its slot holds this guest now: its release ran
        if guest.id in self.registered:
            raise UsageError(f"shadow {self.slot} is already registered for guest {guest.id}")
        notifier = self.system.notifier
        with self.system.locks.notify:
            notifier.nreg[guest.id] += 1
            notifier.emit_locked(mn.REGISTER, guest.id, 0, 0, shadow=self.slot)
        self.registered.add(guest.id)
        self._registered_guests[guest.id] = guest

    def unregister(self, guest: GuestHandle, timeout: float = 10.0) -> None:
        """mmu_notifier_unregister: release if it has not run; return when no callback can run."""
        if guest.id not in self.registered or self._registered_guests[guest.id] is not guest:
            raise UsageError(f"shadow {self.slot} is not registered for guest {guest.id}")
        self._unregister(guest, timeout)

    def _unregister(self, guest: GuestHandle, timeout: float) -> None:
        self.registered.discard(guest.id)
        del self._registered_guests[guest.id]
        if not guest.alive:
            # The guest exited: its release was sent; return once the shadow has run it.
            if self.alive:
                self.sync(timeout)
            return
        seq = self.system.notifier.emit(mn.UNREGISTER, guest.id, 0, 0, shadow=self.slot)
        if self.alive:
            self.wait_acked(seq, timeout, "unregister")

    def wait_acked(self, seq: int, timeout: float, what: str) -> None:
        """Wait until the worker acknowledged event ``seq``, or is gone; ProcessDied after ``timeout``."""
        _wait(lambda: self._row[mn.S_ACKED] > seq or not self.alive, timeout, what)

    def request_round(self) -> None:
        """Ask the worker (mode ``rounds``) to read every mirrored page once more; do not wait."""
        self._row[mn.S_ROUND_REQ] += 1
        self.system.locks.shadow_bells[self.slot].release()

    def round(self, timeout: float = 60.0) -> dict[str, int]:
        """Read every mirrored page once; return the counters after the round."""
        before = self.stats()
        self._row[mn.S_ROUND_REQ] += 1
        req = int(self._row[mn.S_ROUND_REQ])
        self.system.locks.shadow_bells[self.slot].release()
        _wait(lambda: self._row[mn.S_ROUND_DONE] >= req, timeout, "shadow round", lambda: self.alive)
        after = self.stats()
        return {k: after[k] - before[k] for k in after}

    def sync(self, timeout: float = 10.0) -> None:
        """Wait until this shadow has run every callback produced so far."""
        head = self.system.get("epoch")
        self.system.locks.broker_bell.release()
        self.system.locks.shadow_bells[self.slot].release()
        _wait(lambda: self._row[mn.S_ACKED] >= head, timeout, "shadow sync", lambda: self.alive)

    def stats(self) -> dict[str, int]:
        row = self._row
        return {"faults": int(row[mn.S_FAULTS]), "reads": int(row[mn.S_READS]),
                "retries": int(row[mn.S_RETRIES]), "messages": int(row[mn.S_MESSAGES]),
                "updated_in_place": int(row[mn.S_UPDATED]), "releases": int(row[mn.S_RELEASES]),
                "stale_reads": int(row[mn.S_STALE_READS]), "after_release": int(row[mn.S_AFTER_RELEASE])}

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """Unregister from every guest, stop the worker, free the slot; return its summary."""
        for gid in sorted(self.registered):
            self._unregister(self._registered_guests[gid], timeout)
        summary: dict[str, Any] = {}
        if self.worker is not None and self.worker.is_alive():
            self.sync(timeout)  # every callback produced so far runs first (a release among them)
            self._row[mn.S_STOP] = 1
            self.system.locks.shadow_bells[self.slot].release()
            summary = self.worker.join(timeout)
        self._on_gone(self)
        return summary


def clear_flush_young(system: System, shadows: list[ShadowMMU], guest: GuestHandle, clear: bool = True,
                      timeout: float = 10.0) -> npt.NDArray[np.bool_]:
    """Which pages of ``guest`` were accessed since the last pass, by the guest or any shadow.

    Clears the primary YOUNG bits (under each run's page-table lock) and asks
    every shadow of ``shadows`` registered for the guest (clear_flush_young; test_young with
    ``clear=False``), in chunks of mn.YOUNG_PAGES pages.  test_young came in
    2011 (Linux 2.6.38, for transparent huge pages): the 2009 era refuses it.
    """
    if not clear and system.get("notifier_era") == mn.era_number("2009"):
        raise UsageError("test_young came with Linux 2.6.38 (2011): the 2009 notifier has clear_flush_young only")
    table = system.table(guest.id)
    young = np.zeros(table.pages, np.bool_)
    young_bit = np.uint64(YOUNG)
    for start in range(0, table.pages, 512):
        end = min(start + 512, table.pages)
        lock = table.ptl(start)
        with lock:
            ptes = table.ptes[start:end]
            young[start:end] = (ptes & young_bit) != 0
            if clear:
                ptes &= ~young_bit
    shadows = [s for s in shadows if guest.id in s.registered and s.alive]
    if not shadows:
        return young
    area = system.notify_area
    kind = mn.CLEAR_YOUNG if clear else mn.TEST_YOUNG
    for start in range(0, table.pages, mn.YOUNG_PAGES):
        end = min(start + mn.YOUNG_PAGES, table.pages)
        seq = system.notifier.emit(kind, guest.id, start, end)
        for s in shadows:
            system.locks.broker_bell.release()
            s.wait_acked(seq, timeout, "clear_flush_young")
            if s.alive:
                young[start:end] |= area.young[s.slot, :end - start] != 0
    return young
