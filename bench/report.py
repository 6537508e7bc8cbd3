"""The report rows every benchmark prints: one measure, its target, and whether it was met."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    """One line of the report."""

    key: str
    what: str
    value: float
    unit: str
    baseline: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""


def fmt(value: float, unit: str) -> str:
    """A value with its unit, as the tables show it."""
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "us":
        return f"{value:,.2f} us"
    if unit == "msg/s":
        return f"{value:,.0f}/s"
    return f"{value:,.2f} {unit}"


def print_table(rows: list[Row]) -> None:
    """Print the rows aligned: key, measure, value, target, met, detail."""
    w = max(len(r.what) for r in rows)
    kw = max(len(r.key) for r in rows)
    print(f"{'':{kw}} {'measure':{w}}  {'value':>12}  {'target':>10}  ok   detail")
    for r in rows:
        ok = "" if r.met is None else ("yes" if r.met else "NO")
        print(f"{r.key:{kw}} {r.what:{w}}  {fmt(r.value, r.unit):>12}  {r.target:>10}  {ok:4} {r.note}")
