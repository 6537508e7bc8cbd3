"""Helpers for tests of code built on shmksm: a machine with shadowed guests, checked when it closes.

    from shmksm.testing import shadowed_machine

    def test_my_secondary_mmu_sees_merges() -> None:
        with shadowed_machine(guests=2, pages=8) as (machine, guests, shadows):
            ...  # write into the guests, merge, read through shadows[0]

The machine runs without ksmd unless ``ksmd=True``; at a normal exit
``machine.check()`` runs before the machine closes, so a test that broke an
invariant fails there, and nothing is left in /dev/shm either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from ._kvm.secondary import ShadowMMU
from .machine import Guest, Machine


class Shadowed(NamedTuple):
    """What :func:`shadowed_machine` yields."""

    machine: Machine
    guests: list[Guest]
    shadows: list[ShadowMMU]


@contextmanager
def shadowed_machine(guests: int = 1, pages: int = 8, *, shadows: int = 1, frames: int | None = None,
                     ksmd: bool = False, shadow_options: dict[str, Any] | None = None,
                     **machine_options: Any) -> Iterator[Shadowed]:
    """A machine of ``guests`` guests of ``pages`` pages, each mirrored by every one of ``shadows`` shadow MMUs.

    ``frames`` defaults to room for every page of every guest twice over;
    ``shadow_options`` go to each ``machine.add_shadow`` (``change_pte``,
    ``mode``), ``machine_options`` to :class:`Machine` (knobs, ``notifier_era``).
    """
    with Machine(frames=frames or 2 * guests * pages + 64, ksmd=ksmd, **machine_options) as machine:
        handles = [machine.add_guest(pages=pages) for _ in range(guests)]
        mmus = [machine.add_shadow(handles, **(shadow_options or {})) for _ in range(shadows)]
        yield Shadowed(machine, handles, mmus)
        machine.check()
