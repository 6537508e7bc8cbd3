"""Why pages do not merge, as the command shows it: a table of reasons by guest.

:func:`explain_machine` explains a machine run by another process (attached
by its segment prefix, as ``shmksm stats`` does); ``Machine.explain()`` does
it for the caller's own.  The reasons and how pages are sorted into them are
those of :mod:`shmksm._ksm.explain`.
"""

from __future__ import annotations

from typing import Any

from .._ksm.explain import DESCRIPTIONS, REASONS, Explanation, attached_guests, explain
from .._ksm.sysfs import AttachedKsm


def explain_machine(prefix: str) -> Explanation:
    """The explanation of the running machine whose segments are named ``prefix``."""
    with AttachedKsm(prefix) as ksm, attached_guests(prefix, ksm.ctl) as tables:
        return explain(prefix, tables, ksm.ctl, ksm.counters)


def explanation_lines(explained: dict[str, Any]) -> list[str]:
    """An Explanation's as_dict() as a table: a row per reason, a column per guest, the total, the meaning."""
    guests = explained["guests"]
    head = f"{'reason':<24}" + "".join(f"{'guest' + g:>9}" for g in guests) + f"{'total':>10}  meaning"
    lines = [head]
    for reason in REASONS:
        lines.append(f"{reason:<24}" + "".join(f"{row[reason]:>9}" for row in guests.values())
                     + f"{explained['total'][reason]:>10}  {DESCRIPTIONS[reason]}")
    lines.append(f"{'pages':<24}" + "".join(f"{sum(row.values()):>9}" for row in guests.values())
                 + f"{sum(explained['total'].values()):>10}")
    return lines
