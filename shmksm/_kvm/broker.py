"""The notifier broker: fanning events out to shadow workers, in order.

The broker drains the main notifier ring in order and copies each batch, in
order, to the ring of every shadow registered for the events' guests — with
numpy slices, so a batch costs a few microseconds whatever its size.  It
handles the control records at their place in the order:

* ``REGISTER(gid, shadow)``: events of ``gid`` after this one go to ``shadow``;
* ``UNREGISTER(gid, shadow)``: ``shadow`` gets ``release`` for ``gid`` unless it
  had it already, then nothing more of ``gid``;
* ``RELEASE(gid)`` (the guest exits): every shadow registered for ``gid`` gets
  ``release``, exactly once, and the registrations end.

A shadow registered without ``change_pte`` receives ``invalidate_page``
instead of a bare change_pte (the 2009 ``__mmu_notifier_change_pte``), and
nothing instead of one bracketed by invalidate_range_start/end (from 2012,
commit 6bdb913f0a70 deleted that fallback: the range calls cover it).  For every shadow the broker publishes how far
the main ring has been delivered (or filtered out): the shadow acknowledges
up to there once its own ring is empty, which lets reclamation go on.  The
broker is the only one that lowers the per-guest registration counts that
producers check, so they never undercount.

Waiting: with the ring empty, the broker polls it for ``_SPIN_NS`` and only
then sleeps on its doorbell; a producer that finds ``H_SLEEPING`` set rings
it.  Events that follow each other closely are so taken without a wake-up
(tens of microseconds, and milliseconds on a busy machine), and an idle
broker costs nothing.  The poll does not call sched_yield(): under EEVDF a
yield pushes the caller's deadline a slice further each time, so a yielding
poller starves behind a CPU-bound process (measured: 20 ms and more).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from .._mm import control, faults
from .._mm import mmu_notifier as mn
from .._mm.system import System

_BATCH = 8192
_MASK64 = (1 << 64) - 1
_SPIN_NS = 100_000  # poll an empty ring this long before sleeping on the doorbell


class Fanout:
    """Who gets which guest's events, as delivered so far, with the slots' word offsets."""

    def __init__(self, area: mn.NotifyArea, bells: list[Any]) -> None:
        self.area = area
        self.v = area.v
        self.bells = bells
        self.bases = [area.slot_base(slot) for slot in range(mn.MAX_SHADOWS)]
        self.masks = [0] * mn.MAX_SHADOWS  # registrations, as delivered so far
        # wants[slot][gid]: does ``slot`` get ``gid``'s events (the gid field has 8 bits)
        self.wants = np.zeros((mn.MAX_SHADOWS, 256), np.bool_)
        self.targets: list[int] = []  # slots with a registration
        # The sequence number of the last record written to each shadow's ring:
        # a broker restarted after a death mid-batch copies that batch again,
        # and must not give a shadow a record twice (an unbalanced
        # invalidate_range_start would make it retry its faults for ever).
        self.last_seq = [-1] * mn.MAX_SHADOWS
        # A restarted broker takes the registrations its predecessor published.
        for slot in range(mn.MAX_SHADOWS):
            b = self.bases[slot]
            if self.v[b + mn.S_STATE] != mn.SLOT_FREE:
                self.set_mask(slot, int(self.v[b + mn.S_GUESTS]) & _MASK64)
                head = self.v[b + mn.S_HEAD]
                if head:
                    self.last_seq[slot] = int(area.shadow_rings[slot][(head - 1) % mn.SHADOW_N][0]) >> 24

    def set_mask(self, slot: int, mask: int) -> None:
        self.masks[slot] = mask
        self.v[self.bases[slot] + mn.S_GUESTS] = mask - (1 << 64) if mask >> 63 else mask  # as an int64 word
        self.wants[slot, :64] = [(mask >> g) & 1 for g in range(64)]
        self.targets = [s for s in range(mn.MAX_SHADOWS) if self.masks[s]]

    def live(self, slot: int) -> bool:
        return bool(self.v[self.bases[slot] + mn.S_STATE] == mn.SLOT_LIVE)

    def ring(self, slot: int) -> None:
        """Wake shadow ``slot`` if it sleeps."""
        i = self.bases[slot] + mn.S_SLEEPING
        if self.v[i]:
            self.v[i] = 0
            self.bells[slot].release()


def broker(system: System) -> dict[str, int]:
    """The broker's main loop; returns its totals when the host stops it."""
    area = system.notify_area
    v, cv = area.v, system.frames.cv
    epoch = control.INDEX["epoch"]
    bell = system.locks.broker_bell
    notify_lock = system.locks.notify
    v[mn.H_BROKER_PID] = os.getpid()
    fan = Fanout(area, system.locks.shadow_bells)
    host = os.getppid()
    delivered = 0
    while not v[mn.H_STOP]:
        head, tail = cv[epoch], v[mn.H_TAIL]
        if head == tail:
            _publish_through(fan, tail)
            if _spin(v, cv, epoch, tail):
                continue
            v[mn.H_SLEEPING] = 1
            if cv[epoch] == tail:
                bell.acquire(timeout=0.05)
            v[mn.H_SLEEPING] = 0
            _reap_dead(fan, notify_lock)
            if os.getppid() != host:
                break
            continue
        t0 = time.perf_counter_ns()
        first = tail % mn.MAIN_N
        n = min(head - tail, _BATCH, mn.MAIN_N - first)
        recs = area.ring[first:first + n].copy()
        control_at = np.flatnonzero((recs[:, 0] & 0xFF) >= mn.RELEASE)
        if not len(control_at):
            delivered += _deliver(fan, recs)
        else:
            start = 0
            for at in [*control_at.tolist(), n]:
                if at > start:
                    delivered += _deliver(fan, recs[start:at])
                if at < n:
                    delivered += _control(fan, recs[at], notify_lock)
                    v[mn.H_TAIL] = tail + at + 1  # a control record is never handled twice
                start = at + 1
        if cv[faults.ARMED]:
            faults.hit(cv, faults.BROKER_AFTER_COPY)
        v[mn.H_TAIL] = tail + n
        _reap_dead(fan, notify_lock)
        _publish_through(fan, tail + n)
        v[mn.H_DELIVERED] = delivered
        v[mn.H_BUSY_NS] += time.perf_counter_ns() - t0
        v[mn.H_BATCHES] += 1
    return {"delivered": delivered}


def _spin(v: memoryview, cv: memoryview, epoch: int, tail: int) -> bool:
    """Poll the empty ring for ``_SPIN_NS``; True as soon as an event (or a stop) comes."""
    deadline = time.monotonic_ns() + _SPIN_NS
    while time.monotonic_ns() < deadline:
        if cv[epoch] != tail or v[mn.H_STOP]:
            return True
    return False


def _deliver(fan: Fanout, recs: npt.NDArray[np.int64]) -> int:
    """Copy the records each live shadow registered for into its ring; return records written."""
    if not fan.targets:
        return 0
    gids = (recs[:, 0] >> 8) & 0xFF
    written = 0
    for slot in fan.targets:
        if not fan.live(slot):
            continue
        sel = fan.wants[slot][gids]
        if recs[0, 0] >> 24 <= fan.last_seq[slot]:
            sel &= (recs[:, 0] >> 24) > fan.last_seq[slot]
        count = int(np.count_nonzero(sel))
        if not count:
            continue
        out = recs if count == len(recs) else recs[sel]
        if not fan.v[fan.bases[slot] + mn.S_CHANGE_PTE]:
            out = _without_change_pte(out, recs)
        written += _write(fan, slot, out)
    return written


def _without_change_pte(out: npt.NDArray[np.int64], recs: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """What a notifier without change_pte gets of ``out``: invalidate_page for a bare
    change_pte, nothing for one inside invalidate_range_start/end."""
    change = (out[:, 0] & 0xFF) == mn.CHANGE_PTE
    if not change.any():
        return out
    bracketed = change & ((out[:, 0] & mn.BRACKETED) != 0)
    if bracketed.any():
        out = out[~bracketed]
        change = change[~bracketed]
    elif out is recs:
        out = out.copy()  # recs goes on to other shadows unchanged
    out[change, 0] += mn.INVALIDATE_PAGE - mn.CHANGE_PTE
    return out


def _write(fan: Fanout, slot: int, out: npt.NDArray[np.int64]) -> int:
    """Append ``out`` to shadow ``slot``'s ring, waiting for room; 0 if the shadow died."""
    v, b = fan.v, fan.bases[slot]
    ring = fan.area.shadow_rings[slot]
    done = 0
    while done < len(out):
        head, tail = v[b + mn.S_HEAD], v[b + mn.S_TAIL]
        room = mn.SHADOW_N - (head - tail)
        if room == 0:
            if not fan.live(slot):
                return done
            fan.ring(slot)
            time.sleep(0.0001)
            continue
        first = head % mn.SHADOW_N
        k = min(room, len(out) - done, mn.SHADOW_N - first)
        ring[first:first + k] = out[done:done + k]
        v[b + mn.S_HEAD] = head + k
        done += k
        fan.last_seq[slot] = int(out[done - 1, 0]) >> 24
    fan.ring(slot)
    return done


def _control(fan: Fanout, rec: npt.NDArray[np.int64], notify_lock: Any) -> int:
    """Handle one control record at its place in the order; return records written."""
    word = int(rec[0])
    kind, gid, shadow = word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF
    bit = 1 << gid
    if kind == mn.REGISTER:
        # A registration of a shadow that died meanwhile is kept in its mask
        # too: the slot's reaping (_reap_dead) lowers the count for it, once.
        # (A slot is freed only once every record before its death was read.)
        fan.set_mask(shadow, fan.masks[shadow] | bit)
        if fan.live(shadow) and int(rec[0]) >> 24 > fan.last_seq[shadow]:
            # The shadow learns of it in order too: a guest it had released is mirrored again.
            return _write(fan, shadow, rec[None, :])
        return 0
    targets = [shadow] if kind == mn.UNREGISTER else [s for s in range(mn.MAX_SHADOWS) if fan.masks[s] & bit]
    written = 0
    for slot in targets:
        if fan.masks[slot] & bit:
            release = rec.copy()
            release[0] = (word & ~0xFF) | mn.RELEASE
            if fan.live(slot) and word >> 24 > fan.last_seq[slot]:
                written += _write(fan, slot, release[None, :])
            # After the write: a broker that dies here leaves the mask set, and
            # its successor (which skips the written release) lowers the count.
            fan.set_mask(slot, fan.masks[slot] & ~bit)
            _unregistered(fan.area, gid, notify_lock)
    return written


def _unregistered(area: mn.NotifyArea, gid: int, notify_lock: Any) -> None:
    with notify_lock:
        area.nreg_v[gid] -= 1


def _publish_through(fan: Fanout, upto: int) -> None:
    """Every shadow has been given everything before ``upto`` that was meant for it."""
    v = fan.v
    for slot, b in enumerate(fan.bases):
        if v[b + mn.S_STATE] == mn.SLOT_LIVE and v[b + mn.S_THROUGH] != upto:
            v[b + mn.S_THROUGH] = upto
            fan.ring(slot)


def _reap_dead(fan: Fanout, notify_lock: Any) -> None:
    """A shadow the host marked dead keeps no registration: lower the counts producers check, free the slot.

    Registrations are dropped one by one, each before its count is lowered:
    a broker that dies in the middle leaves its successor only what is left.
    """
    v = fan.v
    for slot in range(mn.MAX_SHADOWS):
        b = fan.bases[slot]
        if v[b + mn.S_STATE] != mn.SLOT_DEAD or v[mn.H_TAIL] < v[b + mn.S_DEAD_AT]:
            continue  # alive, free, or records produced before its death (its registrations) still to read
        for gid in range(64):
            if fan.masks[slot] >> gid & 1:
                fan.set_mask(slot, fan.masks[slot] & ~(1 << gid))
                _unregistered(fan.area, gid, notify_lock)
        fan.last_seq[slot] = -1
        v[b + mn.S_STATE] = mn.SLOT_FREE
