"""The fault-injection campaign: SIGKILL of every role at random moments, as a test and as a command.

A short campaign runs by default; 500 kills of every role mixed under ``-m stress``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from shmksm.cli import main
from shmksm.tool.chaos import ROLES, ChaosConfig, ideal_counters, run_chaos


def _assert_clean(report_dict: dict[str, object]) -> None:
    summary = {k: report_dict[k] for k in ("hangs", "failed_checks", "bytes_lost", "segments_left", "stale_reads",
                                           "unexpected_exits")}
    assert summary == dict.fromkeys(summary, 0), (summary, report_dict["errors"], report_dict["stacks"])
    assert report_dict["converged"], (report_dict["counters"], report_dict["ideal"])
    assert report_dict["ok"]


def test_ideal_counters_of_the_final_content() -> None:
    assert ideal_counters(4, 64, 256) == {"pages_shared": 16, "pages_sharing": 240}
    # 4 mappings of each of 16 contents, at most 2 per KSM page: 2 KSM pages of 2 each.
    assert ideal_counters(2, 32, 2) == {"pages_shared": 32, "pages_sharing": 32}


def test_a_short_campaign_of_every_role_loses_nothing() -> None:
    report = run_chaos(ChaosConfig(kills=24, seconds=20, seed=11, hang_seconds=30))
    assert sum(report.kills.values()) >= 8, report.kills
    assert set(report.kills) == set(ROLES)
    assert report.checks >= sum(report.kills.values())
    assert report.verified_bytes > 0 and report.guest_ops > 0
    _assert_clean(report.as_dict())


def test_killing_one_of_two_parallel_scanners_at_a_time_loses_nothing() -> None:
    result = CliRunner().invoke(main, ["chaos", "--scanners", "2", "--kills", "10", "--seconds", "20", "--seed", "5",
                                       "--roles", "guest,ksmd", "--json"], prog_name="shmksm")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kills"]["ksmd"] >= 2, report["kills"]
    _assert_clean(report)  # the two scanners converged to the ideal counters at the end


def test_the_command_reports_json_and_a_table() -> None:
    result = CliRunner().invoke(main, ["chaos", "--kills", "6", "--seconds", "15", "--seed", "3", "--roles",
                                       "guest,ksmd", "--json"], prog_name="shmksm")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["kills"]) == {"guest", "ksmd"}
    _assert_clean(report)
    table = CliRunner().invoke(main, ["chaos", "--kills", "2", "--seconds", "10", "--roles", "broker"],
                               prog_name="shmksm")
    assert table.exit_code == 0, table.output
    for word in ("broker", "hangs", "failed_checks", "bytes_lost", "segments_left", "converged"):
        assert word in table.output


@pytest.mark.parametrize("args", [["--roles", "nobody"], ["--kills", "-1"], ["--guests", "1"], ["--seconds", "0"],
                                  ["--scanners", "0"]])
def test_bad_options_are_one_line_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["chaos", *args], prog_name="shmksm")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


@pytest.mark.stress
def test_500_kills_of_every_role_mixed() -> None:
    proc = subprocess.run([sys.executable, "-m", "shmksm.cli", "chaos", "--kills", "500", "--seconds", "1200",
                           "--seed", "500", "--hang-seconds", "60", "--json", "-"],
                          check=False, capture_output=True, text=True, timeout=1800)
    report = json.loads(proc.stdout)
    assert sum(report["kills"].values()) == 500, report["kills"]
    assert all(report["kills"][role] > 50 for role in ROLES), report["kills"]
    _assert_clean(report)
    assert proc.returncode == 0, proc.stderr[-2000:]
