"""experiment tune: the knobs that reach a share of the ideal saving within a budget of ksmd CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli

from shmksm.tool.images import Mix, ideal, write_mix
from shmksm.tool.tune import FRONTIER_SHARES, Candidate, candidates, cpu_to_reach, tune

SMALL = Mix(common=256, zero=64, unique=64, intra=128, intra_distinct=8)


def test_candidates_are_every_combination_and_the_advisor_sets_pages_to_scan_itself() -> None:
    got = candidates([100, 1000], [0, 20], [1], [5])
    assert len(got) == 4 + 2
    advised = got[-1]
    assert advised.knobs({"max_page_sharing": 256}) == {"max_page_sharing": 256, "sleep_millisecs": 20,
                                                        "smart_scan": 1, "advisor_target_scan_time": 5,
                                                        "advisor_mode": 1}
    assert "pages_to_scan" not in advised.knobs({})  # the kernel refuses it while the advisor runs


def test_cpu_to_reach_is_the_first_point_of_the_curve_at_the_share() -> None:
    points = [(0.0, 0.0), (0.1, 0.4), (0.2, 0.9), (0.3, 1.0)]
    assert cpu_to_reach(points, 0.9) == 0.2
    assert cpu_to_reach(points, 0.5) == 0.2
    assert cpu_to_reach(points, 0.4) == 0.1
    assert cpu_to_reach(points[:2], 0.9) is None


def test_tune_measures_each_setting_and_picks_the_cheapest(tmp_path: Path) -> None:
    paths = write_mix(str(tmp_path), 2, SMALL)
    settings = [Candidate(100, 0, 1), Candidate(5000, 0, 1)]
    result = tune(paths, target=0.9, settings=settings, timeout=60)
    assert result["ideal_pages_saved"] == ideal(paths).pages_sharing
    runs = result["runs"]
    assert [r["setting"]["pages_to_scan"] for r in runs] == [100, 5000]
    for run in runs:
        cpus = [c for c, _ in run["curve"]]
        assert cpus == sorted(cpus)  # a curve against CPU, which only grows
        assert run["final_share"] == 1.0  # a run goes on until it settles: the ideal
        assert run["within_budget"] and run["cpu_seconds_to_target"] is not None
    assert result["best"]["cpu_seconds_to_target"] == min(r["cpu_seconds_to_target"] for r in runs)
    assert [p["share"] for p in result["frontier"]] == list(FRONTIER_SHARES)
    for point in result["frontier"]:
        reached = [cpu_to_reach([tuple(p) for p in r["curve"]], point["share"]) for r in runs]
        assert point["cpu_seconds"] == min(c for c in reached if c is not None)
    shares = [p["cpu_seconds"] for p in result["frontier"]]
    assert shares == sorted(shares)


def test_the_command_writes_json_and_the_curve(tmp_path: Path) -> None:
    args = ["experiment", "tune", "--scenario", "one-content", "--guests", "1", "--pages-to-scan", "2000",
            "--sleep-millisecs", "0", "--advisor-target-scan-time", "none"]
    proc = run_cli(*args, "--json", "-", "--plot", tmp_path / "tune.png", timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["runs"]) == 1 and result["best"] is not None
    assert result["workload"] == {"scenario": "one-content", "guests": 1}
    assert (tmp_path / "tune.png").stat().st_size > 0
    text = run_cli(*args, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "best: pages_to_scan 2000, sleep_millisecs 0, smart_scan 1: 90% at" in text.stdout
    assert "saving against ksmd CPU" in text.stdout and "100%" in text.stdout


def test_no_setting_within_the_budget_is_a_one_line_error() -> None:
    proc = run_cli("experiment", "tune", "--scenario", "one-content", "--guests", "1", "--pages-to-scan", "100",
                   "--sleep-millisecs", "0", "--advisor-target-scan-time", "none", "--cpu-budget", "0.000001",
                   timeout=120)
    assert_one_line_error(proc, 1, "no setting reached 90% of the ideal saving within 1e-06 ksmd CPU-s")


@pytest.mark.parametrize(("args", "fragment"), [
    (["--target", "1.5"], "--target"),
    (["--target", "0"], "--target"),
    (["--smart-scan", "2"], "--smart-scan"),
    (["--pages-to-scan", "0"], "--pages-to-scan"),
    (["--advisor-target-scan-time", "0"], "--advisor-target-scan-time"),
    (["--cpu-budget", "-1"], "--cpu-budget"),
    (["--scenario", "nosuch"], "unknown scenario"),
    (["--scenario", "default", "--image", "x.img"], "not both"),
    (["--image", "/nonexistent.img"], "No such file"),
])
def test_bad_input_is_a_one_line_usage_error(args: list[str], fragment: str) -> None:
    assert_one_line_error(run_cli("experiment", "tune", *args), 2, fragment)


def test_help_has_an_example() -> None:
    proc = run_cli("experiment", "tune", "--help")
    assert proc.returncode == 0 and "shmksm experiment tune --scenario default --target 0.9" in proc.stdout
