"""The live view of a running machine: a dashboard on a terminal, plain lines otherwise.

On a terminal, rich's live display redraws in place, a few times a second:
the KSM counters with their change since the previous look, the memory saved
as a bar, a row per guest (its /proc/PID/ksm_stat), the shadow MMUs' faults
and the scanner's CPU.  When the output is not a terminal (a pipe, a file, a
CI log) it prints one plain line a second instead.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Final

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .._mm.frames import PAGE_SIZE

_SHOWN: Final = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
                 "full_scans", "general_profit")


@dataclass(frozen=True)
class Snapshot:
    """What the machine looks like at one moment of a run."""

    elapsed: float  # seconds since the run began
    counters: dict[str, int]  # /sys/kernel/mm/ksm
    pages: int  # the guests' pages in all
    guests: list[dict[str, int]] = field(default_factory=list)  # each guest's ksm_stat
    shadow_faults: int | None = None  # None: no shadow MMU
    scanner_cpu_seconds: float = 0.0


def _mib(pages: int) -> str:
    return f"{pages * PAGE_SIZE / 2**20:.1f} MiB"


def _bytes(n: int) -> str:
    """Bytes, signed, in KiB or MiB."""
    return f"{n / 2**20:+.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:+.0f} KiB"


def saved_pages(counters: dict[str, int]) -> int:
    """Pages KSM saves: the sharing mappings and the empty pages it mapped to the zero page."""
    return counters["pages_sharing"] + counters["ksm_zero_pages"]


def plain_line(s: Snapshot) -> str:
    """The one-line form of a snapshot."""
    c = s.counters
    line = (f"{s.elapsed:5.1f}s  full_scans {c['full_scans']:3d}  pages_shared {c['pages_shared']:7d}  "
            f"pages_sharing {c['pages_sharing']:7d}  ksm_zero_pages {c['ksm_zero_pages']:6d}  "
            f"volatile {c['pages_volatile']:6d}  saved {_mib(saved_pages(c))}  ksmd CPU {s.scanner_cpu_seconds:.2f} s")
    return line if s.shadow_faults is None else f"{line}  shadow faults {s.shadow_faults}"


class Dashboard:
    """``with Dashboard(title) as board: board.show(snapshot)``: live on a terminal, plain lines otherwise."""

    def __init__(self, title: str, out: IO[str] | None = None, tty: bool | None = None) -> None:
        self.title = title
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self._live: Live | None = None
        self._previous: Snapshot | None = None
        self._last_line = -1.0

    def __enter__(self) -> Dashboard:
        if self.tty:
            self._live = Live(console=Console(file=self.out, force_terminal=True), refresh_per_second=4,
                              transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def show(self, snapshot: Snapshot) -> None:
        if self._live is not None:
            self._live.update(self.render(snapshot))
            self._previous = snapshot
        elif time.monotonic() - self._last_line >= 1.0:
            self.out.write(plain_line(snapshot) + "\n")
            self.out.flush()
            self._last_line = time.monotonic()

    def render(self, s: Snapshot) -> Any:
        """The dashboard of ``s``, the changes counted from the snapshot shown before."""
        before = self._previous
        counters = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        counters.add_column("counter")
        counters.add_column("value", justify="right")
        counters.add_column("change", justify="right")
        for name in _SHOWN:
            change = s.counters[name] - before.counters[name] if before is not None else 0
            counters.add_row(name, f"{s.counters[name]:,}",
                             Text(f"{change:+,}" if change else "", style="green" if change > 0 else "red"))
        saved = saved_pages(s.counters)
        bar = Table.grid(padding=(0, 1))
        bar.add_row("memory saved", ProgressBar(total=max(1, s.pages), completed=saved, width=40),
                    f"{_mib(saved)} of {_mib(s.pages)} ({100 * saved / max(1, s.pages):.1f}%)")
        guests = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("guest", "ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit"):
            guests.add_column(column, justify="right")
        for i, g in enumerate(s.guests):
            guests.add_row(str(i), f"{g['ksm_rmap_items']:,}", f"{g['ksm_merging_pages']:,}",
                           f"{g['ksm_zero_pages']:,}", _bytes(g["ksm_process_profit"]))
        cpu = s.scanner_cpu_seconds
        if before is not None and s.elapsed > before.elapsed:
            share = 100 * (cpu - before.scanner_cpu_seconds) / (s.elapsed - before.elapsed)
            cpu_text = f"ksmd CPU {cpu:.2f} s ({share:.0f}% of a core now)"
        else:
            cpu_text = f"ksmd CPU {cpu:.2f} s"
        faults = "" if s.shadow_faults is None else f"   shadow faults {s.shadow_faults:,}"
        footer = Text(f"{s.elapsed:.1f} s   {cpu_text}{faults}")
        return Panel(Group(counters, Text(""), bar, Text(""), guests, Text(""), footer), title=self.title,
                     title_align="left", expand=False)
