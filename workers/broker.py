"""Broker entry point: the notifier broker, fanning events out to shadow workers.

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
instead (the seed's fallback).  For every shadow the broker publishes how far
the main ring has been delivered (or filtered out): the shadow acknowledges
up to there once its own ring is empty, which lets reclamation go on.  The
broker is the only one that lowers the per-guest registration counts that
producers check, so they never undercount.
"""

from __future__ import annotations

import os
import time

import numpy as np

from shmksm import control, mmu_notifier as mn
from shmksm.system import System

_BATCH = 8192


def broker(system: System) -> dict[str, int]:
    """The broker's main loop; returns its totals when the host stops it."""
    area = system.notify_area
    v, cv = area.v, system.frames.cv
    epoch = control.INDEX["epoch"]
    bell = system.locks.broker_bell
    bells = system.locks.shadow_bells
    notify_lock = system.locks.notify
    v[mn.H_BROKER_PID] = os.getpid()
    masks = [0] * mn.MAX_SHADOWS  # registrations, as delivered so far
    host = os.getppid()
    delivered = 0
    while not v[mn.H_STOP]:
        head, tail = cv[epoch], v[mn.H_TAIL]
        if head == tail:
            _publish_through(area, masks, tail, bells)
            v[mn.H_SLEEPING] = 1
            if cv[epoch] == tail:
                bell.acquire(timeout=0.05)
            v[mn.H_SLEEPING] = 0
            _reap_dead(area, masks, notify_lock)
            if os.getppid() != host:
                break
            continue
        t0 = time.perf_counter_ns()
        first = tail % mn.MAIN_N
        n = min(head - tail, _BATCH, mn.MAIN_N - first)
        recs = area.ring[first:first + n].copy()
        kinds = recs[:, 0] & 0xFF
        control_at = np.flatnonzero(kinds >= mn.RELEASE).tolist()
        start = 0
        for at in [*control_at, n]:
            if at > start:
                delivered += _deliver(area, masks, recs[start:at], bells)
            if at < n:
                delivered += _control(area, masks, recs[at], notify_lock, bells)
            start = at + 1
        v[mn.H_TAIL] = tail + n
        _publish_through(area, masks, tail + n, bells)
        v[mn.H_DELIVERED] = delivered
        v[mn.H_BUSY_NS] += time.perf_counter_ns() - t0
        v[mn.H_BATCHES] += 1
    return {"delivered": delivered}


def _live(area: mn.NotifyArea, slot: int) -> bool:
    return bool(area.slots[slot, mn.S_STATE] == mn.SLOT_LIVE)


def _deliver(area: mn.NotifyArea, masks: list[int], recs: np.ndarray, bells: list) -> int:
    """Copy the records each live shadow registered for into its ring; return records written."""
    gids = (recs[:, 0] >> 8) & 0xFF
    written = 0
    for slot, mask in enumerate(masks):
        if not mask or not _live(area, slot):
            continue
        sel = ((np.uint64(mask) >> gids.astype(np.uint64)) & np.uint64(1)).astype(np.bool_)
        if not sel.any():
            continue
        out = recs[sel]
        if not area.slots[slot, mn.S_CHANGE_PTE]:
            fallback = (out[:, 0] & 0xFF) == mn.CHANGE_PTE
            out[fallback, 0] += mn.INVALIDATE_PAGE - mn.CHANGE_PTE
        written += _write(area, slot, out, bells)
    return written


def _write(area: mn.NotifyArea, slot: int, out: np.ndarray, bells: list) -> int:
    """Append ``out`` to shadow ``slot``'s ring, waiting for room; 0 if the shadow died."""
    row = area.slots[slot]
    done = 0
    while done < len(out):
        head, tail = int(row[mn.S_HEAD]), int(row[mn.S_TAIL])
        room = mn.SHADOW_N - (head - tail)
        if room == 0:
            if not _live(area, slot):
                return done
            if row[mn.S_SLEEPING]:
                row[mn.S_SLEEPING] = 0
                bells[slot].release()
            time.sleep(0.0001)
            continue
        first = head % mn.SHADOW_N
        k = min(room, len(out) - done, mn.SHADOW_N - first)
        area.shadow_rings[slot, first:first + k] = out[done:done + k]
        row[mn.S_HEAD] = head + k
        done += k
    if row[mn.S_SLEEPING]:
        row[mn.S_SLEEPING] = 0
        bells[slot].release()
    return done


def _control(area: mn.NotifyArea, masks: list[int], rec: np.ndarray, notify_lock, bells: list) -> int:
    """Handle one control record at its place in the order; return records written."""
    kind, gid, shadow = int(rec[0]) & 0xFF, (int(rec[0]) >> 8) & 0xFF, (int(rec[0]) >> 16) & 0xFF
    bit = 1 << gid
    if kind == mn.REGISTER:
        if _live(area, shadow):
            masks[shadow] |= bit
            area.slots[shadow, mn.S_GUESTS] = masks[shadow]
        else:
            _unregistered(area, gid, notify_lock)
        return 0
    targets = [shadow] if kind == mn.UNREGISTER else [s for s in range(mn.MAX_SHADOWS) if masks[s] & bit]
    written = 0
    for slot in targets:
        if masks[slot] & bit:
            masks[slot] &= ~bit
            area.slots[slot, mn.S_GUESTS] = masks[slot]
            release = rec.copy()
            release[0] = (int(rec[0]) & ~0xFF) | mn.RELEASE
            if _live(area, slot):
                written += _write(area, slot, release[None, :], bells)
            _unregistered(area, gid, notify_lock)
    return written


def _unregistered(area: mn.NotifyArea, gid: int, notify_lock) -> None:
    with notify_lock:
        area.nreg_v[gid] -= 1


def _publish_through(area: mn.NotifyArea, masks: list[int], upto: int, bells: list) -> None:
    """Every shadow has been given everything before ``upto`` that was meant for it."""
    for slot in range(mn.MAX_SHADOWS):
        row = area.slots[slot]
        if row[mn.S_STATE] == mn.SLOT_LIVE and row[mn.S_THROUGH] != upto:
            row[mn.S_THROUGH] = upto
            if row[mn.S_SLEEPING]:
                row[mn.S_SLEEPING] = 0
                bells[slot].release()


def _reap_dead(area: mn.NotifyArea, masks: list[int], notify_lock) -> None:
    """A shadow the host marked dead keeps no registration: lower the counts producers check."""
    for slot in range(mn.MAX_SHADOWS):
        if masks[slot] and area.slots[slot, mn.S_STATE] == mn.SLOT_DEAD:
            for gid in range(64):
                if masks[slot] >> gid & 1:
                    _unregistered(area, gid, notify_lock)
            masks[slot] = 0
            area.slots[slot, mn.S_GUESTS] = 0
