"""Plots (matplotlib, an optional extra: ``pip install 'shmksm[plot]'``)."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError


def require_matplotlib() -> Any:
    """The pyplot module, or a UsageError that says how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'shmksm[plot]'") from None
    return plt


_LABEL_GAP = 0.06  # the least distance between two scan labels, as a fraction of the time axis


def timeline_figure(report: dict[str, Any]) -> Any:
    """The figure of plot_timeline.

    Every full scan gets a dotted line; the labels above the plot skip scans
    that would run into the previous label (the line stays), and the legend
    stands beside the plot, clear of the curves.
    """
    plt = require_matplotlib()
    timeline = report["timeline"]
    t = [row["t"] for row in timeline]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for name in ("pages_sharing", "pages_shared", "pages_unshared", "pages_volatile", "ksm_zero_pages"):
        ax.step(t, [row[name] for row in timeline], where="post", label=name)
    scans = [(row["t"], row["full_scans"]) for i, row in enumerate(timeline)
             if i and row["full_scans"] != timeline[i - 1]["full_scans"]]
    span = (max(t) - min(t)) if t else 1.0
    labelled = -float("inf")
    for x, n in scans:
        ax.axvline(x, color="grey", lw=0.5, ls=":")
        if x - labelled >= _LABEL_GAP * span:
            ax.text(x, 1.01, f"scan {n}", fontsize=7, color="grey", rotation=45, ha="left", va="bottom",
                    transform=ax.get_xaxis_transform(), gid="scan-label")
            labelled = x
    ax.set_xlabel("seconds since run=1")
    ax.set_ylabel("pages")
    knobs = ", ".join(f"{k} {v}" for k, v in report["knobs"].items())
    ax.set_title(f"shmksm: {report['pages']} pages\n{knobs}", fontsize=8, pad=28)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_timeline(report: dict[str, Any], path: str) -> None:
    """Counters of a run over time: pages_shared, pages_sharing, pages_unshared, ksm_zero_pages."""
    plt = require_matplotlib()
    _save(plt, timeline_figure(report), path)


def plot_eras(result: dict[str, Any], path: str) -> None:
    """Shadow faults per notifier era, split into merge and copy-on-write."""
    plt = require_matplotlib()
    eras = list(result["eras"])
    merge = [result["eras"][e]["merge_faults"] for e in eras]
    cow = [result["eras"][e]["cow_faults"] for e in eras]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(eras, merge, label="after merging")
    ax.bar(eras, cow, bottom=merge, label="after copy-on-write")
    ax.set_ylabel("shadow faults (emulated vmexits)")
    ax.set_title("change_pte across the notifier eras", fontsize=10)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_sweep(result: dict[str, Any], path: str) -> None:
    """Convergence time, scanner CPU and memory saved against the swept knob."""
    plt = require_matplotlib()
    knob = result["knob"]
    rows = result["points"]
    xs = [r["value"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    for ax, key, label in zip(axes, ("converged_seconds", "ksmd_cpu_seconds", "saved_mib"),
                              ("seconds to converge", "scanner CPU seconds", "MiB saved"), strict=True):
        ax.errorbar(xs, [r[key]["mean"] for r in rows], yerr=[r[key]["stdev"] for r in rows], marker="o", capsize=3)
        ax.set_xlabel(knob)
        ax.set_ylabel(label)
    fig.suptitle(f"shmksm sweep of {knob}", fontsize=10)
    _save(plt, fig, path)


def plot_tune(result: dict[str, Any], path: str) -> None:
    """Each setting's curve of saving (share of the ideal) against ksmd CPU, the target and the budget."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for run in result["runs"]:
        cpu = [c for c, _ in run["curve"]]
        share = [100 * s for _, s in run["curve"]]
        ax.step(cpu, share, where="post", lw=2.2 if run is result["best"] or run == result["best"] else 1,
                label=run["label"])
    ax.axhline(100 * result["target"], color="grey", ls="--", lw=0.8)
    if result["cpu_budget"] is not None:
        ax.axvline(result["cpu_budget"], color="grey", ls=":", lw=0.8)
    ax.set_xlabel("ksmd CPU seconds")
    ax.set_ylabel("% of the ideal saving")
    ax.set_title("shmksm tune: saving against scanner CPU (dashed: target, dotted: budget)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
