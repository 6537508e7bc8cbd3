"""Tuning: which knobs reach a given share of the ideal saving within a budget of ksmd CPU.

What ksmtuned guesses, measured.  The workload (images: a scenario's, or
processes captured by ``shmksm capture``) runs under ksmd once per candidate
setting of ``pages_to_scan``, ``sleep_millisecs`` and ``smart_scan``, and of
the scan-time advisor (``advisor_mode`` scan-time with an
``advisor_target_scan_time``, which sets ``pages_to_scan`` itself).  Each
run's timeline gives its curve of saving (pages_sharing, plus ksm_zero_pages
with use_zero_pages, as a share of the ideal that :func:`images.ideal`
counts) against ksmd's CPU seconds.  The best setting is the one that reaches
the target share with the least CPU, within the budget; the frontier is, for
each share of the ideal, the least CPU any setting needed to reach it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .images import ideal
from .runner import run_images

FRONTIER_SHARES = (0.25, 0.5, 0.75, 0.9, 0.95, 1.0)


@dataclass(frozen=True)
class Candidate:
    """One setting of the knobs; ``advisor_target_scan_time`` 0 means the advisor is off."""

    pages_to_scan: int
    sleep_millisecs: int
    smart_scan: int
    advisor_target_scan_time: int = 0

    def knobs(self, base: dict[str, int]) -> dict[str, int]:
        """The knobs of a run, in an order the machine accepts (the advisor sets pages_to_scan itself)."""
        knobs = {**base, "sleep_millisecs": self.sleep_millisecs, "smart_scan": self.smart_scan}
        if self.advisor_target_scan_time:
            return {**knobs, "advisor_target_scan_time": self.advisor_target_scan_time, "advisor_mode": 1}
        return {**knobs, "pages_to_scan": self.pages_to_scan}

    def label(self) -> str:
        scan = (f"advisor target {self.advisor_target_scan_time} s" if self.advisor_target_scan_time
                else f"pages_to_scan {self.pages_to_scan}")
        return f"{scan}, sleep_millisecs {self.sleep_millisecs}, smart_scan {self.smart_scan}"


def candidates(pages_to_scan: Sequence[int], sleep_millisecs: Sequence[int], smart_scan: Sequence[int],
               advisor_target_scan_time: Sequence[int]) -> list[Candidate]:
    """Every combination: the fixed pages_to_scan values, then the advisor's targets."""
    fixed = [Candidate(p, s, m) for p, s, m in itertools.product(pages_to_scan, sleep_millisecs, smart_scan)]
    advised = [Candidate(0, s, m, t) for t, s, m in itertools.product(advisor_target_scan_time, sleep_millisecs,
                                                                       smart_scan)]
    return fixed + advised


def curve(timeline: list[dict[str, Any]], ideal_pages: int, use_zero_pages: bool) -> list[tuple[float, float]]:
    """(ksmd CPU seconds, share of the ideal saving) at each change of a run's counters."""
    out = []
    for row in timeline:
        saved = row["pages_sharing"] + (row["ksm_zero_pages"] if use_zero_pages else 0)
        out.append((row["scanner_cpu_ns"] / 1e9, saved / ideal_pages if ideal_pages else 1.0))
    return out


def cpu_to_reach(points: list[tuple[float, float]], share: float) -> float | None:
    """The ksmd CPU seconds at which a curve first reached ``share`` of the ideal, None if never."""
    return next((cpu for cpu, got in points if got >= share - 1e-9), None)


def tune(paths: Sequence[str], target: float = 0.9, cpu_budget: float | None = None,
         settings: Sequence[Candidate] = (), max_page_sharing: int = 256, use_zero_pages: bool = False,
         timeout: float = 60.0, progress: Callable[[Candidate, dict[str, Any]], None] | None = None,
         ) -> dict[str, Any]:
    """Run ``paths`` under every setting; the JSON-ready result (runs, best, frontier).

    A run stops when its counters settle (3 full scans without a change) or
    at ``timeout`` seconds; ``progress(setting, run)`` follows each run.
    """
    if not 0 < target <= 1:
        raise UsageError(f"the target is a share of the ideal saving in (0, 1], not {target}")
    if cpu_budget is not None and cpu_budget <= 0:
        raise UsageError(f"the CPU budget must be positive, not {cpu_budget}")
    if not settings:
        raise UsageError("no setting to try")
    best_possible = ideal(list(paths), max_page_sharing)
    ideal_pages = (best_possible.pages_sharing_zero + best_possible.zero_pages if use_zero_pages
                   else best_possible.pages_sharing)
    base = {"max_page_sharing": max_page_sharing, "use_zero_pages": int(use_zero_pages)}
    runs = []
    for setting in settings:
        report = run_images(list(paths), knobs=setting.knobs(base), timeout=timeout,
                            timeline_extra=("scanner_cpu_ns",))
        points = curve(report["timeline"], ideal_pages, use_zero_pages)
        cpu = cpu_to_reach(points, target)
        reached_at = next((row["t"] for row, (c, _) in zip(report["timeline"], points, strict=True) if c == cpu),
                          None) if cpu is not None else None
        run = {"knobs": setting.knobs(base), "label": setting.label(), "setting": setting.__dict__,
               "cpu_seconds_to_target": cpu, "seconds_to_target": reached_at,
               "within_budget": cpu is not None and (cpu_budget is None or cpu <= cpu_budget),
               "final_share": round(points[-1][1], 4) if points else 0.0,
               "ksmd_cpu_seconds": report["ksmd_cpu_seconds"], "wall_seconds": report["wall_seconds"],
               "curve": [(round(c, 4), round(s, 4)) for c, s in points]}
        runs.append(run)
        if progress is not None:
            progress(setting, run)
    fitting = [r for r in runs if r["within_budget"]]
    best = min(fitting, key=lambda r: (r["cpu_seconds_to_target"], r["seconds_to_target"])) if fitting else None
    frontier = []
    for share in FRONTIER_SHARES:
        reached = [(cpu_to_reach([tuple(p) for p in r["curve"]], share), r["label"]) for r in runs]
        costs = [(cpu, label) for cpu, label in reached if cpu is not None]
        cheapest = min(costs) if costs else None
        frontier.append({"share": share, "cpu_seconds": cheapest[0] if cheapest else None,
                         "setting": cheapest[1] if cheapest else None})
    return {"target": target, "cpu_budget": cpu_budget, "ideal_pages_saved": ideal_pages,
            "ideal": best_possible.as_dict(), "use_zero_pages": use_zero_pages, "runs": runs,
            "best": best, "frontier": frontier}
