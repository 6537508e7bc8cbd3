"""The report rows every benchmark prints: one measure, its target, and whether it was met."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


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


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Write a benchmark's document as JSON to ``path`` ('-': stdout)."""
    text = json.dumps(doc, indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def exit_code(rows: list[Row]) -> int:
    """0 if every target was met, 1 otherwise."""
    return 0 if all(r.met is not False for r in rows) else 1
