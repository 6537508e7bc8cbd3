"""/sys/kernel/mm/ksm and /proc/PID/ksm_stat: knobs and counters by their kernel names.

``machine.ksm.pages_to_scan = 1000`` writes a knob, validated as the kernel's
store functions validate it (``-EINVAL`` → :class:`KnobError`, ``-EBUSY`` →
:class:`KnobBusyError`); ``machine.ksm.counters()`` reads every counter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Final

import numpy as np

from .._mm import control, pagetable, segments
from .._mm.pagetable import H_KSM_STAT, H_MERGE_ANY, KSM, PRESENT, ZERO
from .._mm.system import System
from .._mm.waiting import poll_until
from ..errors import KnobBusyError, KnobError
from .ksm import RMAP_ITEM_BYTES, unmerge_range

_BOOL_KNOBS: Final = ("use_zero_pages", "merge_across_nodes", "smart_scan")
# Knobs refused (EBUSY) while KSM pages are shared: what was merged under the
# old value would stay merged against the new one.  mitigation is one of them:
# pages merged across domains, or without VUsion's write protection of the
# pages beside them, would go on leaking; write 2 to run first.
_BUSY_KNOBS: Final = ("max_page_sharing", "merge_across_nodes", "mitigation")
# /proc/vmstat's machine-wide totals of the numastat counters.
_VMSTAT_NUMA: Final = {"numa_hit": "numa_hit", "numa_miss": "numa_miss", "numa_foreign": "numa_foreign",
                       "numa_local": "local_node", "numa_other": "other_node"}


def ksm_zero_pages_of(system: System, gid: int) -> int:
    """PTEs of guest ``gid`` that KSM pointed at the zero page (none before KSM first did so
    anywhere: then no PTE is read)."""
    if not system.get("ksm_zero_used"):
        return 0
    ptes = system.table(gid).ptes
    want = np.uint64(PRESENT | ZERO | KSM)
    return int(np.count_nonzero((ptes & want) == want))


def counters(system: System) -> dict[str, int]:
    """Every counter of /sys/kernel/mm/ksm, by name."""
    return Ksm(system).counters()


def _counters(get: Callable[[str], int], ksm_zero_pages: int) -> dict[str, int]:
    """The counters from the control words, with the derived ones (pages_volatile, general_profit)."""
    out = {name: get(name) for name in control.COUNTERS}
    out["ksm_zero_pages"] = ksm_zero_pages
    items = get("rmap_items")
    out["pages_volatile"] = max(0, items - out["pages_shared"] - out["pages_sharing"] - out["pages_unshared"])
    out["general_profit"] = (out["pages_sharing"] + ksm_zero_pages) * 4096 - items * RMAP_ITEM_BYTES
    return out


def write_knob(name: str, value: Any, get: Callable[[str], int], put: Callable[[str, int], None]) -> None:
    """A sysfs write: parse, refuse as the kernel refuses (EINVAL, EBUSY), store."""
    parsed = parse_knob(name, value)
    if name == "pages_to_scan" and get("advisor_mode"):
        raise KnobError("pages_to_scan cannot be set while advisor_mode is scan-time (EINVAL)")
    if name in _BUSY_KNOBS and parsed != get(name) and (get("pages_shared") or get("pages_sharing")):
        raise KnobBusyError(f"{name} cannot change while pages are shared (EBUSY); write 2 to run first")
    if name == "run" and parsed == 2:
        put("full_scans", 0)
    if name == "advisor_mode" and parsed != get(name):
        # set_advisor_defaults: the advisor starts from its minimum, and leaving it restores the default.
        put("pages_to_scan", get("advisor_min_pages_to_scan") if parsed else control.KNOB_DEFAULTS["pages_to_scan"])
    put(name, parsed)


def wait_unmerged(get: Callable[[str], int], before: int, fallback: Callable[[], None] | None,
                  timeout: float = 60.0) -> None:
    """After run=2 was written: return once every KSM mapping is broken, as run_store does.

    ksmd unmerges at its next batch boundary and counts it in
    ``scanner_unmerges``; with no ksmd running, ``fallback`` does it here.
    """
    def ksmd_runs() -> bool:
        pid = get("scanner_pid")
        return bool(pid) and segments.pid_alive(pid)

    # Done when ksmd counted the unmerge, when another writer changed run
    # meanwhile, or when no ksmd runs to do it.
    poll_until(lambda: get("scanner_unmerges") > before or get("run") != 2 or not ksmd_runs(), timeout,
               lambda: KnobBusyError(f"run=2: ksmd did not unmerge within {timeout} s (EBUSY)"),
               first=0.001, most=0.001)
    if get("scanner_unmerges") > before or get("run") != 2:
        return
    if fallback is None:
        raise KnobBusyError("run=2: no ksmd runs to unmerge (EBUSY)")
    fallback()


def guest_ksm_stat(system: System, gid: int) -> dict[str, int]:
    """/proc/PID/ksm_stat of guest ``gid``."""
    table = system.table(gid)
    pairs = table.header[H_KSM_STAT:H_KSM_STAT + 2 * system.get("scanners")]
    items, merging = int(pairs[0::2].sum()), int(pairs[1::2].sum())
    zero = ksm_zero_pages_of(system, gid)
    return {
        "ksm_rmap_items": items,
        "ksm_zero_pages": zero,
        "ksm_merging_pages": merging,
        "ksm_process_profit": (merging + zero) * 4096 - items * RMAP_ITEM_BYTES,
        "ksm_merge_any": int(table.header[H_MERGE_ANY]),
        "ksm_mergeable": int(bool(table.header[H_MERGE_ANY] or table.stored_ranges())),
    }


def unmerge_everything(system: System) -> None:
    """run=2 with no ksmd running: break every KSM mapping here, and zero the counters.

    A ksmd started later begins with empty trees.
    """
    for gid in system.live_guests():
        table = system.table(gid)
        with table.mm_lock:
            unmerge_range(table, 0, table.pages)
        table.header[H_KSM_STAT:] = 0
    for name in ("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains", "stable_node_dups",
                 "rmap_items"):
        system.set(name, 0)
    system.set("scanner_unmerges", system.get("scanner_unmerges") + 1)


def parse_knob(name: str, value: Any) -> int:
    """A knob value as the kernel parses it; KnobError (EINVAL) if it cannot be one."""
    if name not in control.KNOB_DEFAULTS:
        if name in control.COUNTERS:
            raise KnobError(f"{name} is a counter, not a knob: it is read-only")
        raise KnobError(f"no knob named {name!r}; knobs: {', '.join(control.KNOB_DEFAULTS)}")
    words = control.WORD_KNOBS.get(name)
    if words is not None and isinstance(value, str) and not value.strip().isdigit():
        text = value.strip().strip("[]")
        if text not in words:
            raise KnobError(f"{name} must be one of {', '.join(words)}, not {value!r} (EINVAL)")
        return words.index(text)
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
    if words is not None and value >= len(words):
        raise KnobError(f"{name}: {value} is not one of {', '.join(words)} (EINVAL)")
    if name == "scanners" and not 1 <= value <= control.MAX_SCANNERS:
        raise KnobError(f"scanners: {value} is not in 1..{control.MAX_SCANNERS} (EINVAL)")
    if name == "advisor_max_cpu" and not 1 <= value <= 100:
        raise KnobError(f"advisor_max_cpu: {value} is not a percentage in 1..100 (EINVAL)")
    if name in ("advisor_target_scan_time", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan") and value < 1:
        raise KnobError(f"{name}: {value} must be at least 1 (EINVAL)")
    return int(value)


class KsmFiles:
    """The knobs and counters of a machine, as /sys/kernel/mm/ksm shows them.

    :class:`Ksm` (the host's ``machine.ksm``) and :class:`AttachedKsm` (another
    process's view of a running machine) differ only in how they reach the
    words: :meth:`get`, :meth:`_put`, the lock a write holds, the zero-page
    count, and who unmerges for run=2 when no ksmd runs.
    """

    def get(self, name: str) -> int:
        """The stored number of a knob or counter."""
        raise NotImplementedError

    def _put(self, name: str, value: int) -> None:
        raise NotImplementedError

    def _write_lock(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def _zero_pages(self) -> int:
        raise NotImplementedError

    def _unmerge_here(self) -> Callable[[], None] | None:
        """What does run=2's unmerge when no ksmd runs (None: nobody, EBUSY)."""
        return None

    def knob(self, name: str) -> Any:
        """Knob ``name`` as sysfs shows it: a number, or a word for the word-valued ones."""
        words = control.WORD_KNOBS.get(name)
        return self.get(name) if words is None else words[self.get(name)]

    def set(self, name: str, value: Any) -> None:
        """Write knob ``name``; KnobError (EINVAL) or KnobBusyError (EBUSY) as the kernel.

        run=2 returns once every KSM mapping is broken, as run_store does.
        """
        with self._write_lock():
            unmerge = name == "run" and self.get("run") != 2 and parse_knob(name, value) == 2
            before = self.get("scanner_unmerges")
            write_knob(name, value, self.get, self._put)
        if unmerge:
            wait_unmerged(self.get, before, self._unmerge_here())

    def knobs(self) -> dict[str, Any]:
        """Every knob, by name."""
        return {name: self.knob(name) for name in control.KNOB_DEFAULTS}

    def _word(self, index: int) -> int:
        """Control word ``index``."""
        raise NotImplementedError

    def per_scanner(self, name: str) -> list[int]:
        """Word ``name`` of each scanner's entry (control.SCANNER_FIELDS: ``scanner_cpu_ns``,
        ``pages_scanned``, ...), scanner 0 first, for the ``scanners`` there are now."""
        n = max(1, min(self.get("scanners"), control.MAX_SCANNERS))
        return [self._word(control.scanner_word(i, name)) for i in range(n)]

    def counters(self) -> dict[str, int]:
        """Every counter, by name; on a machine of several NUMA nodes also the allocator's
        (the totals by their /proc/vmstat names, each node's by its numastat names as
        ``node<N>_<name>``)."""
        out = _counters(self.get, self._zero_pages())
        nodes = self.numastat()
        if len(nodes) > 1:
            for total, name in _VMSTAT_NUMA.items():
                out[total] = sum(node[name] for node in nodes)
            for k, node in enumerate(nodes):
                out.update({f"node{k}_{name}": value for name, value in node.items()})
        return out

    def numastat(self) -> list[dict[str, int]]:
        """Per NUMA node, /sys/devices/system/node/node<N>/numastat (and the node's nr_free_pages)."""
        out = []
        for k in range(self.get("nodes")):
            base = control.NODE_BASE + control.NODE_WORDS * k
            node = {name: self._word(base + word) for name, word in control.NUMASTAT.items()}
            node["nr_free_pages"] = self._word(base + control.N_FREE_COUNT)
            out.append(node)
        return out

    def sysfs_lines(self) -> list[str]:
        """``grep . /sys/kernel/mm/ksm/*``, line by line; with several NUMA nodes, then
        ``grep . /sys/devices/system/node/node*/numastat``."""
        values = {**self.knobs(), **_counters(self.get, self._zero_pages())}
        for name, words in control.WORD_KNOBS.items():
            values[name] = " ".join(f"[{w}]" if w == values[name] else w for w in words)
        lines = [f"/sys/kernel/mm/ksm/{name}:{values[name]}" for name in sorted(values)
                 if name not in control.OWN_KNOBS]
        nodes = self.numastat()
        if len(nodes) > 1:
            lines += [f"/sys/devices/system/node/node{k}/numastat:{name} {node[name]}"
                      for k, node in enumerate(nodes) for name in control.NUMASTAT]
        return lines


class Ksm(KsmFiles):
    """The knobs and counters of one machine: ``machine.ksm``, read and written by attribute too."""

    def __init__(self, system: System, on_write: Callable[[str], None] | None = None) -> None:
        object.__setattr__(self, "_system", system)
        object.__setattr__(self, "_on_write", on_write)

    def __getattr__(self, name: str) -> Any:
        if name in control.KNOB_DEFAULTS:
            return self.knob(name)
        counters = self.counters()
        if name in counters:
            return counters[name]
        raise AttributeError(f"no knob or counter named {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self.set(name, value)

    def set(self, name: str, value: Any) -> None:
        super().set(name, value)
        if self._on_write is not None:
            self._on_write(name)

    def get(self, name: str) -> int:
        return self._system.get(name)

    def _word(self, index: int) -> int:
        return int(self._system.ctl[index])

    def _put(self, name: str, value: int) -> None:
        self._system.set(name, value)

    def _write_lock(self) -> AbstractContextManager[Any]:
        return self._system.locks.stat

    def _zero_pages(self) -> int:
        if not self._system.get("ksm_zero_used"):
            return 0
        return sum(ksm_zero_pages_of(self._system, g) for g in self._system.live_guests())

    def _unmerge_here(self) -> Callable[[], None] | None:
        return lambda: unmerge_everything(self._system)

    _system: System
    _on_write: Callable[[str], None] | None


# -- a running machine, from another process ---------------------------------------------------


def running_machines() -> list[str]:
    """Segment prefixes of the machines whose hosts are alive, oldest first."""
    names = [e[:-len("_ctl")] for e in os.listdir(segments.SHM_DIR)
             if e.startswith(segments.PREFIX) and e.endswith("_ctl")]
    stale = set(segments.stale_segments())
    live = [n for n in names if f"{n}_ctl" not in stale]
    return sorted(live, key=lambda n: os.stat(os.path.join(segments.SHM_DIR, f"{n}_ctl")).st_mtime)


class AttachedKsm(KsmFiles):
    """The knobs and counters of a machine run by another process (``shmksm stats``/``knobs``).

    Attaches the control segment and the guests' page tables read-only in
    spirit: only knob writes change anything, one word each, as a sysfs
    write does.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        try:
            self._seg = segments.attach(f"{prefix}_ctl")
        except FileNotFoundError:
            raise KnobError(f"no running shmksm machine {prefix!r}") from None
        self.ctl = np.ndarray(control.WORDS, np.int64, self._seg.buf)

    def close(self) -> None:
        del self.ctl
        self._seg.close()

    def __enter__(self) -> AttachedKsm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, name: str) -> int:
        return int(self.ctl[control.INDEX[name]])

    def _word(self, index: int) -> int:
        return int(self.ctl[index])

    def _zero_pages(self) -> int:
        total = 0
        if not self.get("ksm_zero_used"):
            return total
        want = np.uint64(PRESENT | ZERO | KSM)
        for gid in range(control.MAX_GUESTS):
            if self.ctl[control.GUEST_BASE + control.GUEST_WORDS * gid + control.G_STATE] != control.GUEST_LIVE:
                continue
            try:
                seg = segments.attach(f"{self.prefix}_g{gid}")
            except FileNotFoundError:
                continue
            try:
                pages = int(np.ndarray(1, np.int64, seg.buf)[0])
                ptes = np.ndarray(pages, np.uint64, seg.buf, 8 * pagetable.HEADER_WORDS)
                total += int(np.count_nonzero((ptes & want) == want))
                del ptes
            finally:
                seg.close()
        return total

    def _put(self, name: str, value: int) -> None:
        self.ctl[control.INDEX[name]] = value
