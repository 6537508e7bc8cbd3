"""Named fault-injection points inside critical sections, like the kernel's fault-injection framework.

The kernel can make its page allocator fail (``fail_page_alloc``) and slab
allocations fail (``failslab``) on purpose, to prove that every caller copes.
shmksm has the same for its own critical sections, and one action more:
a process that kills itself (SIGKILL) right there, holding whatever locks it
holds, to prove that every role's death at the worst moment is recovered.

=================================  =========================================================
point                              where
=================================  =========================================================
``frames.alloc``                   in Frames.alloc, the allocator lock held (and the caller's
                                   page-table lock); ``fail``: out of frames
``ksm.merge.after_write_protect``  a merge between write_protect_page and replace_page: the
                                   PTE write-protected, the page-table lock held
``broker.after_copy``              the broker between copying a batch to the shadows' rings
                                   and acknowledging it on the main ring
``shadow.mid_batch``               a shadow between applying the first half of a batch of
                                   callbacks and the rest
``check.recover``                  the host's recovery, between tearing down dead address
                                   spaces and rebuilding the frame metadata, every lock held
=================================  =========================================================

Actions: ``kill`` (SIGKILL; in the host, whose death would end the machine,
the recovering thread unwinds from the point instead, raising
:class:`InjectedDeath`, and recovery is retried), ``stop`` (SIGSTOP: a holder
that does not go on), ``fail`` (the point's failure: ``frames.alloc`` raises
OutOfFrames).  Set from the host with ``machine.inject(point, action,
times=1)``; each hit of an armed point by a process it targets uses one of
``times``.

Disabled, a point costs one load of the control word ``faults_armed`` and a
test: ``if cv[ARMED] and faults.hit(cv, POINT) ...``.

The control segment holds, per point (``control.FAULT_WORDS`` words from
``control.FAULT_BASE``): action, hits left, target pid (0: any process but
the host), hits that fired, the host's pid.
"""

from __future__ import annotations

import os
import signal
from typing import Final

from . import control

POINTS: Final = ("frames.alloc", "ksm.merge.after_write_protect", "broker.after_copy", "shadow.mid_batch",
                 "check.recover")
FRAMES_ALLOC: Final = 0
KSM_AFTER_WRITE_PROTECT: Final = 1
BROKER_AFTER_COPY: Final = 2
SHADOW_MID_BATCH: Final = 3
CHECK_RECOVER: Final = 4
HOST_POINTS: Final = frozenset((CHECK_RECOVER,))  # points that only the host reaches

ACTIONS: Final = ("kill", "stop", "fail")
KILL: Final = 1
STOP: Final = 2
FAIL: Final = 3

ARMED: Final = control.INDEX["faults_armed"]
F_ACTION: Final = 0
F_LEFT: Final = 1
F_PID: Final = 2
F_FIRED: Final = 3
F_HOST: Final = 4
assert len(POINTS) <= control.FAULT_SLOTS and F_HOST < control.FAULT_WORDS


class InjectedDeath(BaseException):
    """A ``kill`` injected in the host: the thread unwinds from the point (nothing may catch it but recovery)."""


def _base(index: int) -> int:
    return control.FAULT_BASE + control.FAULT_WORDS * index


def arm(cv: memoryview, index: int, action: int, times: int, pid: int, host: int) -> None:
    """Arm point ``index``: ``action`` for the next ``times`` hits by ``pid`` (0: any worker)."""
    base = _base(index)
    was_armed = cv[base + F_LEFT] > 0
    cv[base + F_ACTION] = action
    cv[base + F_PID] = pid
    cv[base + F_HOST] = host
    cv[base + F_FIRED] = 0
    cv[base + F_LEFT] = times
    cv[ARMED] += int(times > 0) - int(was_armed)


def disarm_all(cv: memoryview) -> None:
    for index in range(len(POINTS)):
        cv[_base(index) + F_LEFT] = 0
    cv[ARMED] = 0


def fired(cv: memoryview, index: int) -> int:
    """How many hits of point ``index`` fired since it was armed."""
    return int(cv[_base(index) + F_FIRED])


def hit(cv: memoryview, index: int) -> int:
    """Point ``index`` is reached (some point is armed): fire it if armed for this process.

    ``kill`` and ``stop`` happen here; returns FAIL for the caller to fail,
    0 otherwise.
    """
    base = _base(index)
    if cv[base + F_LEFT] <= 0:
        return 0
    me = os.getpid()
    host = cv[base + F_HOST]
    target = cv[base + F_PID]
    if (target and target != me) or (not target and me == host and index not in HOST_POINTS):
        return 0
    left = cv[base + F_LEFT] - 1
    cv[base + F_LEFT] = left
    if left <= 0:
        cv[ARMED] -= 1
    cv[base + F_FIRED] += 1
    action = cv[base + F_ACTION]
    if action == KILL:
        if me == host:
            raise InjectedDeath(POINTS[index])
        os.kill(me, signal.SIGKILL)
        signal.pause()
    if action == STOP:
        os.kill(me, signal.SIGSTOP)
    return FAIL if action == FAIL else 0
