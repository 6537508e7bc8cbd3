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

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .._mm import mmu_notifier as mn
from .._mm.pagetable import YOUNG
from ..errors import ProcessDied, UsageError

if TYPE_CHECKING:
    from ..machine import Guest, Machine, Worker


def _wait(cond: Any, timeout: float, what: str, alive: Any = None) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while not cond():
        if alive is not None and not alive():
            raise ProcessDied(f"{what}: the shadow worker died")
        if time.monotonic() > deadline:
            raise ProcessDied(f"{what}: no answer in {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


class ShadowMMU:
    """The host's handle of one shadow worker (one notifier slot)."""

    def __init__(self, machine: Machine, slot: int, change_pte: bool) -> None:
        self.machine = machine
        self.slot = slot
        self.change_pte = change_pte
        self.worker: Worker | None = None
        self.registered: set[int] = set()
        self._row = machine.system.notify_area.slots[slot]

    def __repr__(self) -> str:
        return f"<ShadowMMU slot={self.slot} guests={sorted(self.registered)}>"

    @property
    def alive(self) -> bool:
        return self.worker is not None and self.worker.is_alive() and self._row[mn.S_STATE] == mn.SLOT_LIVE

    def register(self, guest: Guest) -> None:
        """mmu_notifier_register: callbacks for ``guest`` from now on.  Safe while callbacks run."""
        self.machine._require_live(guest)
        if guest.id in self.registered:
            raise UsageError(f"shadow {self.slot} is already registered for guest {guest.id}")
        notifier = self.machine.system.notifier
        with self.machine.system.locks.notify:
            notifier.nreg[guest.id] += 1
            notifier.emit_locked(mn.REGISTER, guest.id, 0, 0, shadow=self.slot)
        self.registered.add(guest.id)

    def unregister(self, guest: Guest, timeout: float = 10.0) -> None:
        """mmu_notifier_unregister: release if it has not run; return when no callback can run."""
        if guest.id not in self.registered:
            raise UsageError(f"shadow {self.slot} is not registered for guest {guest.id}")
        self.registered.discard(guest.id)
        if not guest.alive:
            return  # the guest exited: its release ran, and nothing of it can run any more
        seq = self.machine.system.notifier.emit(mn.UNREGISTER, guest.id, 0, 0, shadow=self.slot)
        if self.alive:
            _wait(lambda: self._row[mn.S_ACKED] > seq or not self.alive, timeout, "unregister")

    def request_round(self) -> None:
        """Ask the worker (mode ``rounds``) to read every mirrored page once more; do not wait."""
        self._row[mn.S_ROUND_REQ] += 1
        self.machine.system.locks.shadow_bells[self.slot].release()

    def round(self, timeout: float = 60.0) -> dict[str, int]:
        """Read every mirrored page once; return the counters after the round."""
        before = self.stats()
        self._row[mn.S_ROUND_REQ] += 1
        req = int(self._row[mn.S_ROUND_REQ])
        self.machine.system.locks.shadow_bells[self.slot].release()
        _wait(lambda: self._row[mn.S_ROUND_DONE] >= req, timeout, "shadow round", lambda: self.alive)
        after = self.stats()
        return {k: after[k] - before[k] for k in after}

    def sync(self, timeout: float = 10.0) -> None:
        """Wait until this shadow has run every callback produced so far."""
        head = self.machine.system.get("epoch")
        self.machine.system.locks.broker_bell.release()
        self.machine.system.locks.shadow_bells[self.slot].release()
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
            guest = self.machine._guests.get(gid)
            if guest is None:
                self.registered.discard(gid)  # the guest exited: its release ran already
            else:
                self.unregister(guest, timeout)
        summary: dict[str, Any] = {}
        if self.worker is not None and self.worker.is_alive():
            self.sync(timeout)  # every callback produced so far runs first (a release among them)
            self._row[mn.S_STOP] = 1
            self.machine.system.locks.shadow_bells[self.slot].release()
            summary = self.worker.join(timeout)
        self.machine._shadow_gone(self)
        return summary


def clear_flush_young(machine: Machine, guest: Guest, clear: bool = True,
                      timeout: float = 10.0) -> npt.NDArray[np.bool_]:
    """Which pages of ``guest`` were accessed since the last pass, by the guest or any shadow.

    Clears the primary YOUNG bits (under each run's page-table lock) and asks
    every registered shadow (clear_flush_young; test_young with
    ``clear=False``), in chunks of mn.YOUNG_PAGES pages.
    """
    system = machine.system
    table = system.table(guest.id)
    young = np.zeros(table.pages, np.bool_)
    young_bit = np.uint64(YOUNG)
    for start in range(0, table.pages, 512):
        end = min(start + 512, table.pages)
        lock = table.ptl(start)
        with lock:  # type: ignore[attr-defined]
            ptes = table.ptes[start:end]
            young[start:end] = (ptes & young_bit) != 0
            if clear:
                ptes &= ~young_bit
    shadows = [s for s in machine.shadows() if guest.id in s.registered and s.alive]
    if not shadows:
        return young
    area = system.notify_area
    kind = mn.CLEAR_YOUNG if clear else mn.TEST_YOUNG
    for start in range(0, table.pages, mn.YOUNG_PAGES):
        end = min(start + mn.YOUNG_PAGES, table.pages)
        seq = system.notifier.emit(kind, guest.id, start, end)
        for s in shadows:
            system.locks.broker_bell.release()
            _wait(lambda s=s, seq=seq: s._row[mn.S_ACKED] > seq or not s.alive, timeout, "clear_flush_young")
            if s.alive:
                young[start:end] |= area.young[s.slot, :end - start] != 0
    return young
