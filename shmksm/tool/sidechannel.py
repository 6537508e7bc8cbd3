"""The deduplication side channel: KSM's timing attack, and the mitigations measured against it.

A write to a merged page takes a fault and a copy; a write to a page nobody
shares does not.  An attacker who plants a guess of another tenant's page,
waits for ksmd and times a write to it learns whether the tenant holds that
page (Suzaki et al., EuroSec 2011; Bosman et al., "Dedup Est Machina",
S&P 2016).  The experiment:

* a victim guest (security domain 1) holds, for each trial, one secret page:
  one of ``candidates`` contents, drawn from the seed;
* an attacker guest (domain 2) plants every candidate of every trial, and
  both make their memory mergeable; each also holds a few empty pages;
* ksmd scans until three full scans have passed, then stops (``run = 0``: the
  attacker times on a quiet machine, the best case for the attack);
* the attacker writes one byte into each of its candidate pages, in a random
  order, timing each write, and guesses for each trial the slowest page.

Many trials share one machine: every trial has its own pages and contents,
so they cost one merge phase.  The result, per ``mitigation``: the write
times of the pages the victim also holds ("merged": the duplicates) and of
the others ("unmerged"), their two-sample Kolmogorov-Smirnov p-value
(scipy), the success rate beside chance (1 / candidates) with a one-sided
binomial p-value, and the policy's cost: the faults the timed writes took,
ksmd's CPU time to three full scans, and the memory saved.  After the writes
every page is read back (no write lost) and ``machine.check()`` runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .._mm.control import MITIGATIONS
from .._mm.frames import PAGE_SIZE
from .._mm.pagetable import KSM, PRESENT
from ..errors import UsageError
from ..guest import MADV_MERGEABLE, GuestView
from ..machine import Machine

VICTIM_DOMAIN: Final = 1
ATTACKER_DOMAIN: Final = 2
ZERO_PAGES: Final = 16  # empty pages per guest: what "domains" still merges across domains
WARMUP_PAGES: Final = 8  # attacker pages written before timing, so that no timed write runs cold code
SCANS: Final = 3


def _require_scipy() -> Any:
    try:
        import scipy.stats
    except ImportError:
        raise UsageError("the side-channel experiment needs scipy: pip install 'shmksm[stats]'") from None
    return scipy.stats


def trial_pages(seed: int, trial: int, candidates: int) -> tuple[npt.NDArray[np.uint8], int]:
    """The candidate contents of ``trial`` (``uint8[candidates, 4096]``) and the secret's index."""
    rng = np.random.default_rng([seed, 0, trial])
    return rng.integers(0, 256, (candidates, PAGE_SIZE), dtype=np.uint8), int(rng.integers(candidates))


def _plant_secrets(view: GuestView, seed: int, trials: int, candidates: int) -> None:
    """The victim: page t holds trial t's secret; then ZERO_PAGES empty pages; all mergeable."""
    for t in range(trials):
        pages, secret = trial_pages(seed, t, candidates)
        view.write(t * PAGE_SIZE, pages[secret])
    view.write(trials * PAGE_SIZE, bytes(ZERO_PAGES * PAGE_SIZE))
    view.madvise(0, view.size, MADV_MERGEABLE)


def _plant_candidates(view: GuestView, seed: int, trials: int, candidates: int) -> None:
    """The attacker: page t*candidates+i holds trial t's candidate i; then warm-up and empty pages."""
    for t in range(trials):
        pages, _ = trial_pages(seed, t, candidates)
        view.write(t * candidates * PAGE_SIZE, pages)
    base = trials * candidates
    warm = np.random.default_rng([seed, 1]).integers(0, 256, (WARMUP_PAGES, PAGE_SIZE), dtype=np.uint8)
    view.write(base * PAGE_SIZE, warm)
    view.write((base + WARMUP_PAGES) * PAGE_SIZE, bytes(ZERO_PAGES * PAGE_SIZE))
    view.madvise(0, view.size, MADV_MERGEABLE)


def _copies(view: GuestView) -> int:
    """Copies made by write faults so far, machine-wide: into KSM pages, and into private pages under vusion.

    Under vusion a fault's copy is counted when its deferred put is done:
    those still queued are done first.
    """
    view.system.frames.drain_deferred()
    return view.system.get("cow_ksm") + view.system.get("cow_faults")


def _time_writes(view: GuestView, seed: int, trials: int, candidates: int) -> tuple[list[int], int]:
    """The attack: write one byte into every candidate page, in a random order.

    Returns the nanoseconds each write took, and the copies they made.  The
    byte written is the complement of the page's first byte, so every write
    changes the page.  The warm-up pages are written first, untimed.
    """
    n = trials * candidates
    first = np.empty(n, np.uint8)
    for t in range(trials):
        first[t * candidates:(t + 1) * candidates] = trial_pages(seed, t, candidates)[0][:, 0]
    for page in range(n, n + WARMUP_PAGES):
        view.write(page * PAGE_SIZE, b"\x00")
    times = [0] * n
    copies = _copies(view)
    clock = time.perf_counter_ns
    write = view.write
    for page in np.random.default_rng([seed, 2]).permutation(n).tolist():
        data = bytes((int(first[page]) ^ 0xFF,))
        start = clock()
        write(page * PAGE_SIZE, data)
        times[page] = clock() - start
    return times, _copies(view) - copies


def _lost_writes(view: GuestView, seed: int, trials: int, candidates: int, attacker: bool) -> int:
    """Pages that do not read back what was written: every candidate with its first byte
    complemented (attacker), every secret untouched (victim), and the empty pages."""
    lost = 0
    for t in range(trials):
        pages, secret = trial_pages(seed, t, candidates)
        if attacker:
            pages[:, 0] ^= 0xFF
            got = np.frombuffer(view.read(t * candidates * PAGE_SIZE, candidates * PAGE_SIZE), np.uint8)
            lost += int(np.count_nonzero((got.reshape(candidates, PAGE_SIZE) != pages).any(axis=1)))
        elif view.read(t * PAGE_SIZE, PAGE_SIZE) != pages[secret].tobytes():
            lost += 1
    zero_at = (trials * candidates + WARMUP_PAGES if attacker else trials) * PAGE_SIZE
    lost += view.read(zero_at, ZERO_PAGES * PAGE_SIZE) != bytes(ZERO_PAGES * PAGE_SIZE)
    return lost


@dataclass(frozen=True)
class Distribution:
    """Write times in microseconds."""

    n: int
    median_us: float
    p5_us: float
    p95_us: float

    @classmethod
    def of(cls, ns: npt.NDArray[np.int64]) -> Distribution:
        p5, median, p95 = (round(float(v) / 1000, 2) for v in np.percentile(ns, [5, 50, 95]))
        return cls(len(ns), median, p5, p95)


@dataclass(frozen=True)
class PolicyResult:
    """One mitigation's run of the experiment."""

    mitigation: str
    trials: int
    candidates: int
    merged: Distribution  # the attacker's pages whose content the victim holds
    unmerged: Distribution  # the others
    ks_pvalue: float  # two-sample Kolmogorov-Smirnov, merged vs unmerged
    hits: int
    success_rate: float
    chance: float
    success_pvalue: float  # one-sided binomial: P(hits or more | guessing at chance)
    ksm_pages_timed: int  # the attacker's candidate pages that mapped a KSM page when the timing began
    faults: int  # copies taken by the timed writes (into KSM pages, and into private pages under vusion)
    ksmd_cpu_seconds: float  # ksmd's CPU time over the three full scans
    pages_saved: int  # pages_sharing + ksm_zero_pages after the scans
    general_profit: int
    lost_writes: int
    seconds: float


@dataclass(frozen=True)
class Measurement:
    """What one run measured, before any statistics."""

    times_ns: npt.NDArray[np.int64]  # [trials, candidates]: the attacker's write times
    secrets: npt.NDArray[np.intp]  # [trials]: the index of each trial's secret
    ksm_pages_timed: int
    faults: int
    ksmd_cpu_seconds: float
    counters: dict[str, int]
    lost_writes: int
    seconds: float


def measure(mitigation: str, trials: int, candidates: int, seed: int) -> Measurement:
    """Run the attack once, on a fresh machine under ``mitigation``; machine.check() at the end."""
    if mitigation not in MITIGATIONS:
        raise UsageError(f"mitigation must be one of {', '.join(MITIGATIONS)}, not {mitigation!r}")
    if trials < 1 or candidates < 2 or seed < 0:
        raise UsageError(f"need at least 1 trial, 2 candidates and a seed >= 0, not {trials}, {candidates}, {seed}")
    started = time.monotonic()
    victim_pages = trials + ZERO_PAGES
    attacker_pages = trials * candidates + WARMUP_PAGES + ZERO_PAGES
    total = victim_pages + attacker_pages
    with Machine(frames=2 * total + 256, pages_to_scan=max(1000, total), sleep_millisecs=0,
                 mitigation=mitigation) as machine:
        victim = machine.add_guest(victim_pages, domain=VICTIM_DOMAIN)
        attacker = machine.add_guest(attacker_pages, domain=ATTACKER_DOMAIN)
        machine.spawn(_plant_secrets, victim, seed, trials, candidates).join()
        machine.spawn(_plant_candidates, attacker, seed, trials, candidates).join()
        machine.ksm.run = 1
        machine.wait_full_scans(SCANS)
        machine.ksm.run = 0
        _wait_ksmd_idle(machine)
        counters = machine.ksm.counters()
        cpu = machine.system.get("scanner_cpu_ns") / 1e9
        ptes = machine.system.table(attacker.id).ptes[:trials * candidates]
        ksm_timed = int(np.count_nonzero((ptes & np.uint64(KSM | PRESENT)) == np.uint64(KSM | PRESENT)))
        del ptes
        timed, faults = machine.spawn(_time_writes, attacker, seed, trials, candidates).join()
        times = np.array(timed, np.int64)
        lost = machine.spawn(_lost_writes, attacker, seed, trials, candidates, True).join()
        lost += machine.spawn(_lost_writes, victim, seed, trials, candidates, False).join()
        machine.check()
    secrets = np.array([trial_pages(seed, t, candidates)[1] for t in range(trials)], np.intp)
    return Measurement(times.reshape(trials, candidates), secrets, ksm_timed, faults, round(cpu, 3), counters, lost,
                       round(time.monotonic() - started, 2))


def run_policy(mitigation: str, trials: int, candidates: int, seed: int) -> PolicyResult:
    """The experiment on a fresh machine under one mitigation, with its statistics."""
    stats = _require_scipy()
    m = measure(mitigation, trials, candidates, seed)
    is_secret = np.zeros((trials, candidates), np.bool_)
    is_secret[np.arange(trials), m.secrets] = True
    merged, unmerged = m.times_ns[is_secret], m.times_ns[~is_secret]
    hits = int(np.count_nonzero(m.times_ns.argmax(axis=1) == m.secrets))
    chance = 1 / candidates
    return PolicyResult(
        mitigation=mitigation, trials=trials, candidates=candidates,
        merged=Distribution.of(merged), unmerged=Distribution.of(unmerged),
        ks_pvalue=float(stats.ks_2samp(merged, unmerged).pvalue),
        hits=hits, success_rate=hits / trials, chance=chance,
        success_pvalue=float(stats.binomtest(hits, trials, chance, alternative="greater").pvalue),
        ksm_pages_timed=m.ksm_pages_timed, faults=m.faults, ksmd_cpu_seconds=m.ksmd_cpu_seconds,
        pages_saved=m.counters["pages_sharing"] + m.counters["ksm_zero_pages"],
        general_profit=m.counters["general_profit"], lost_writes=m.lost_writes, seconds=m.seconds)


def _wait_ksmd_idle(machine: Machine, quiet: float = 0.05, timeout: float = 10.0) -> None:
    """After run = 0: wait until ksmd's batch heartbeat has not moved for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = machine.system.get("scanner_batches"), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.005)
        now = machine.system.get("scanner_batches")
        if now != last:
            last, since = now, time.monotonic()


def sidechannel_experiment(trials: int = 100, candidates: int = 16, seed: int = 1,
                           mitigations: Iterable[str] = MITIGATIONS,
                           progress: Callable[[PolicyResult], None] | None = None) -> dict[str, Any]:
    """Run the experiment under each mitigation; return the results as one JSON-ready dict."""
    _require_scipy()
    policies: dict[str, Any] = {}
    for mitigation in mitigations:
        result = run_policy(mitigation, trials, candidates, seed)
        if progress is not None:
            progress(result)
        policies[mitigation] = asdict(result)
    base = policies.get("none")
    if base is not None:
        for r in policies.values():
            r["extra_faults"] = r["faults"] - base["faults"]
            r["extra_ksmd_cpu_seconds"] = round(r["ksmd_cpu_seconds"] - base["ksmd_cpu_seconds"], 3)
    return {"trials": trials, "candidates": candidates, "seed": seed, "policies": policies}


__all__ = ["Distribution", "PolicyResult", "run_policy", "sidechannel_experiment", "trial_pages"]
