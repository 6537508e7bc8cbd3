"""/sys/kernel/mm/ksm and /proc/PID/ksm_stat: knobs and counters by their kernel names.

``machine.ksm.pages_to_scan = 1000`` writes a knob, validated as the kernel's
store functions validate it (``-EINVAL`` → :class:`KnobError`, ``-EBUSY`` →
:class:`KnobBusyError`); ``machine.ksm.counters()`` reads every counter.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from . import control
from .errors import KnobBusyError, KnobError
from .scanner import RMAP_ITEM_BYTES
from .pagetable import H_MERGE_ANY, H_MERGING, H_RMAP_ITEMS, KSM, PRESENT, ZERO
from .system import System


_BOOL_KNOBS: Final = ("use_zero_pages", "merge_across_nodes", "smart_scan")
_BUSY_KNOBS: Final = ("max_page_sharing", "merge_across_nodes")


def ksm_zero_pages_of(system: System, gid: int) -> int:
    """PTEs of guest ``gid`` that KSM pointed at the zero page."""
    ptes = system.table(gid).ptes
    want = np.uint64(PRESENT | ZERO | KSM)
    return int(np.count_nonzero((ptes & want) == want))


def counters(system: System) -> dict[str, int]:
    """Every counter of /sys/kernel/mm/ksm, by name."""
    out = {name: system.get(name) for name in control.COUNTERS}
    out["ksm_zero_pages"] = sum(ksm_zero_pages_of(system, g) for g in system.live_guests())
    items = system.get("rmap_items")
    out["pages_volatile"] = max(0, items - out["pages_shared"] - out["pages_sharing"] - out["pages_unshared"])
    out["general_profit"] = (out["pages_sharing"] + out["ksm_zero_pages"]) * 4096 - items * RMAP_ITEM_BYTES
    return out


def guest_ksm_stat(system: System, gid: int) -> dict[str, int]:
    """/proc/PID/ksm_stat of guest ``gid``."""
    table = system.table(gid)
    items = int(table.header[H_RMAP_ITEMS])
    merging = int(table.header[H_MERGING])
    zero = ksm_zero_pages_of(system, gid)
    return {
        "ksm_rmap_items": items,
        "ksm_zero_pages": zero,
        "ksm_merging_pages": merging,
        "ksm_process_profit": (merging + zero) * 4096 - items * RMAP_ITEM_BYTES,
        "ksm_merge_any": int(table.header[H_MERGE_ANY]),
        "ksm_mergeable": int(bool(table.header[H_MERGE_ANY] or table.stored_ranges())),
    }


def parse_knob(name: str, value: Any) -> int:
    """A knob value as the kernel parses it; KnobError (EINVAL) if it cannot be one."""
    if name not in control.KNOB_DEFAULTS:
        if name in control.COUNTERS:
            raise KnobError(f"{name} is a counter, not a knob: it is read-only")
        raise KnobError(f"no knob named {name!r}; knobs: {', '.join(control.KNOB_DEFAULTS)}")
    if name == "advisor_mode":
        if isinstance(value, str):
            text = value.strip().strip("[]")
            if text not in control.ADVISOR_MODES:
                raise KnobError(f"advisor_mode must be one of {', '.join(control.ADVISOR_MODES)}, not {value!r}")
            return control.ADVISOR_MODES.index(text)
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise KnobError(f"{name}: {value!r} is not an integer (EINVAL)") from None
    if not isinstance(value, (int, np.integer)):
        raise KnobError(f"{name}: {value!r} is not an integer (EINVAL)")
    value = int(value)
    if value < 0 or value >= 1 << 32:
        raise KnobError(f"{name}: {value} is out of range (EINVAL)")
    if name == "run" and value > 2:
        raise KnobError(f"run: {value} is not 0 (stop), 1 (run) or 2 (unmerge) (EINVAL)")
    if name in _BOOL_KNOBS and value > 1:
        raise KnobError(f"{name}: {value} is not 0 or 1 (EINVAL)")
    if name == "max_page_sharing" and value < 2:
        raise KnobError(f"max_page_sharing: {value} is below 2 (EINVAL)")
    if name == "advisor_mode" and value >= len(control.ADVISOR_MODES):
        raise KnobError(f"advisor_mode: {value} is not a mode (EINVAL)")
    if name == "advisor_max_cpu" and not 1 <= value <= 100:
        raise KnobError(f"advisor_max_cpu: {value} is not a percentage in 1..100 (EINVAL)")
    if name in ("advisor_target_scan_time", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan") and value < 1:
        raise KnobError(f"{name}: {value} must be at least 1 (EINVAL)")
    return value


class Ksm:
    """The knobs and counters of one machine: ``machine.ksm``."""

    def __init__(self, system: System) -> None:
        object.__setattr__(self, "_system", system)

    def __getattr__(self, name: str) -> Any:
        system = object.__getattribute__(self, "_system")
        if name == "advisor_mode":
            return control.ADVISOR_MODES[system.get(name)]
        if name in control.KNOB_DEFAULTS:
            return system.get(name)
        if name in control.COUNTERS:
            return counters(system)[name]
        raise AttributeError(f"no knob or counter named {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self.set(name, value)

    def set(self, name: str, value: Any) -> None:
        """Write knob ``name``; KnobError (EINVAL) or KnobBusyError (EBUSY) as the kernel."""
        system: System = object.__getattribute__(self, "_system")
        parsed = parse_knob(name, value)
        with system.locks.stat:
            if name == "pages_to_scan" and system.get("advisor_mode"):
                raise KnobError("pages_to_scan cannot be set while advisor_mode is scan-time (EINVAL)")
            if name in _BUSY_KNOBS and parsed != system.get(name):
                if system.get("pages_shared") or system.get("pages_sharing"):
                    raise KnobBusyError(f"{name} cannot change while pages are shared (EBUSY); write 2 to run first")
            if name == "run" and parsed == 2:
                system.set("full_scans", 0)
            if name == "advisor_mode" and parsed:
                system.set("pages_to_scan", system.get("advisor_min_pages_to_scan"))
            system.set(name, parsed)

    def knobs(self) -> dict[str, Any]:
        """Every knob, by name."""
        return {name: getattr(self, name) for name in control.KNOB_DEFAULTS}

    def counters(self) -> dict[str, int]:
        return counters(object.__getattribute__(self, "_system"))

    def sysfs_lines(self) -> list[str]:
        """``grep . /sys/kernel/mm/ksm/*``, line by line."""
        values: dict[str, Any] = {**self.knobs(), **self.counters()}
        if values["advisor_mode"] == "none":
            values["advisor_mode"] = "[none] scan-time"
        else:
            values["advisor_mode"] = "none [scan-time]"
        return [f"/sys/kernel/mm/ksm/{name}:{values[name]}" for name in sorted(values)]
