"""The ``shmksm`` command line, run as users run it: real processes, real exit codes, real stderr.

Errors must be one line on stderr starting with "Error:", exit code 2 for
usage errors and 1 for runtime errors, never a traceback, and nothing left
in /dev/shm (conftest.py's guard checks every test).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from helpers import (
    assert_one_line_error,
    brute_force_ideal,
    gcore_dump,
    memory_pages,
    pages_of,
    run_cli,
    run_json,
    write_bad_images,
)

import shmksm
from shmksm._mm import segments
from shmksm.cli import main
from shmksm.tool.images import MIXES, Mix, ideal, write_mix
from shmksm.tool.runner import RUN_COUNTERS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTLE_KEYS = ("pages_shared", "pages_sharing", "ksm_zero_pages")

# -- --help ---------------------------------------------------------------------------------------


def command_paths(group: click.Group = main, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))


COMMANDS = [(), *command_paths()]


def test_the_commands_are_the_documented_ones() -> None:
    """A new command gets its --help and bad-input cases here."""
    assert {" ".join(p) for p in COMMANDS} == {
        "", "capture", "chaos", "cleanup", "demo", "estimate", "explain", "experiment", "experiment notifier",
        "experiment sidechannel", "experiment sweep", "experiment tune", "knobs", "run", "stats", "stress"}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "shmksm")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help(path: tuple[str, ...], flag: str) -> None:
    result = CliRunner().invoke(main, [*path, flag], prog_name="shmksm")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: shmksm {' '.join(path)}".rstrip())
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert any(opt in result.output for opt in param.opts), f"{param.opts} missing from the help"
    if isinstance(command, click.Group):
        assert all(name in result.output for name in command.commands)


def test_the_cli_installs_no_signal_handler_in_its_caller() -> None:
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(main, ["estimate", "no-such-image"])
    assert result.exit_code == 2, result.output
    assert signal.getsignal(signal.SIGTERM) is before


def test_help_as_a_real_process() -> None:
    proc = run_cli("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "Usage:" in proc.stdout and "Commands:" in proc.stdout
    for name in main.commands:
        assert re.search(rf"^\s+{name}\s", proc.stdout, re.MULTILINE), f"{name} is not listed"
    version = run_cli("--version", timeout=60)
    assert version.returncode == 0 and re.search(r"\d+\.\d+", version.stdout), version.stderr


def test_python_m_shmksm_runs_a_machine() -> None:
    """``python -m shmksm`` is the command: its workers import the main module again and must not run it."""
    proc = run_cli("run", "--scenario", "default", "--guests", 2, "--pages-to-scan", 2000, "--sleep-millisecs", 0,
                   "--json", "-", "--timeout", 90, module="shmksm")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ksm"]["pages_sharing"] > 0


# -- bad input: one line on stderr, exit 2 (usage) or 1 (runtime), no traceback ------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad-input")
    found = {kind: str(path) for kind, path in write_bad_images(folder).items()}
    good = folder / "good.img"
    good.write_bytes(pages_of([1, 2, 1, 0]))
    found["good"] = str(good)
    return found


@pytest.fixture(scope="module")
def truncated_gcore(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real core file (gcore of a live Python process) cut in its middle."""
    core = gcore_dump(tmp_path_factory.mktemp("gcore-cut"))
    cut = core.with_suffix(".cut")
    data = core.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    core.unlink()
    return str(cut)



BAD_INPUTS = [
    # (id, arguments ({name} is a file of the `files` fixture), exit code, part of the error line)
    ("unknown-command", ["nosuch"], 2, "No such command"),
    ("run-missing-image", ["run", "--image", "{missing}"], 2, "No such file or directory"),
    ("estimate-missing-image", ["estimate", "{missing}"], 2, "No such file or directory"),
    ("run-ragged-image", ["run", "--image", "{ragged}"], 2, "size 4097 is not a positive multiple of 4096"),
    ("estimate-ragged-image", ["estimate", "{good}", "{ragged}"], 2, "is not a positive multiple of 4096"),
    ("run-empty-image", ["run", "--image", "{empty}"], 2, "size 0"),
    ("estimate-empty-image", ["estimate", "{empty}"], 2, "size 0"),
    ("run-garbage-elf", ["run", "--image", "{garbage_elf}"], 2, "not a positive multiple of 4096"),
    ("estimate-garbage-elf", ["estimate", "{garbage_elf}", "--format", "core"], 2, "corrupt ELF core"),
    ("run-truncated-core", ["run", "--image", "{truncated_core}"], 2, "runs past the end of the file"),
    ("estimate-truncated-header", ["estimate", "{truncated_header}"], 2, "corrupt ELF core"),
    ("run-truncated-gcore", ["run", "--image", "{truncated_gcore}"], 2, "corrupt ELF core"),
    ("run-core-without-memory", ["run", "--image", "{no_memory}"], 2, "no memory"),
    ("run-elf-executable", ["run", "--image", "{executable}", "--format", "core"], 2, "not a core dump"),
    ("run-bin-true", ["run", "--image", "/bin/true"], 2, "not a core dump"),
    ("estimate-bin-true", ["estimate", "/bin/true"], 2, "not a core dump"),
    ("estimate-no-image", ["estimate"], 2, "give IMAGES or --pid"),
    ("unknown-scenario", ["run", "--scenario", "nosuch"], 2, "unknown scenario 'nosuch'"),
    ("image-and-scenario", ["run", "--scenario", "default", "--image", "{good}"], 2, "either --image"),
    ("neither-image-nor-scenario", ["run"], 2, "either --image"),
    ("pages-to-scan-0", ["run", "--image", "{good}", "--pages-to-scan", "0"], 2, "--pages-to-scan"),
    ("pages-to-scan-negative", ["run", "--image", "{good}", "--pages-to-scan", "-5"], 2, "--pages-to-scan"),
    ("pages-to-scan-not-a-number", ["run", "--image", "{good}", "--pages-to-scan", "many"], 2, "--pages-to-scan"),
    ("sleep-millisecs-negative", ["run", "--image", "{good}", "--sleep-millisecs", "-1"], 2, "--sleep-millisecs"),
    ("max-page-sharing-1", ["run", "--image", "{good}", "--max-page-sharing", "1"], 2, "--max-page-sharing"),
    ("estimate-max-page-sharing-1", ["estimate", "{good}", "--max-page-sharing", "1"], 2, "--max-page-sharing"),
    ("scans-0", ["run", "--image", "{good}", "--scans", "0"], 2, "--scans"),
    ("scanners-0", ["run", "--image", "{good}", "--scanners", "0"], 2, "--scanners"),
    ("scanners-17", ["run", "--image", "{good}", "--scanners", "17"], 2, "--scanners"),
    ("guests-0", ["run", "--scenario", "default", "--guests", "0"], 2, "--guests"),
    ("guest-larger-than-a-machine", ["stress", "--guests", "1", "--pages", "33554433"], 2,
     "at most 33554432 pages"),
    ("more-guests-than-a-machine", ["stress", "--guests", "65", "--pages", "4"], 2, "at most 64 guests"),
    ("run-json-unwritable", ["run", "--image", "{good}", "--json", "/nonexistent/dir/x.json"], 2, "cannot write"),
    ("run-csv-unwritable", ["run", "--image", "{good}", "--csv", "/nonexistent/dir/x.csv"], 2, "cannot write"),
    ("run-plot-unwritable", ["run", "--image", "{good}", "--plot", "/nonexistent/dir/p.png"], 2, "cannot write"),
    ("run-json-is-a-folder", ["run", "--image", "{good}", "--json", "/tmp"], 2, "cannot write"),
    ("estimate-json-unwritable", ["estimate", "{good}", "--json", "/nonexistent/dir/x.json"], 2, "cannot write"),
    ("demo-plot-unwritable", ["demo", "--plot", "/nonexistent/dir/p.png"], 2, "cannot write"),
    ("notifier-json-unwritable", ["experiment", "notifier", "--json", "/nonexistent/dir/x.json"], 2,
     "cannot write"),
    ("notifier-too-many-shadows", ["experiment", "notifier", "--shadows", "17"], 2, "at most 16"),
    ("sweep-plot-unwritable", ["experiment", "sweep", "--knob", "pages_to_scan", "--values", "100",
                               "--plot", "/nonexistent/dir/p.png"], 2, "cannot write"),
    ("knobs-without-equals", ["knobs", "pages_to_scan"], 2, "'pages_to_scan' is not NAME=VALUE"),
    ("knobs-without-name", ["knobs", "=3"], 2, "'=3' is not NAME=VALUE"),
    ("stats-no-such-machine", ["stats", "--machine", "nosuch"], 2, "no running shmksm machine 'nosuch'"),
    ("knobs-no-such-machine", ["knobs", "--machine", "nosuch", "run=1"], 2, "no running shmksm machine 'nosuch'"),
    ("sweep-unknown-knob", ["experiment", "sweep", "--knob", "nosuch", "--values", "1"], 2, "--knob"),
    ("sweep-values-not-integers", ["experiment", "sweep", "--knob", "pages_to_scan", "--values", "a,b"], 2,
     "'a,b' is not a comma-separated list of integers"),
    ("sweep-no-values", ["experiment", "sweep", "--knob", "pages_to_scan", "--values", ","], 2,
     "give at least one value"),
    ("sweep-pages-to-scan-0", ["experiment", "sweep", "--knob", "pages_to_scan", "--values", "100,0"], 2,
     "pages_to_scan must be positive"),
    ("sweep-sleep-negative", ["experiment", "sweep", "--knob", "sleep_millisecs", "--values", "-1"], 2,
     "out of range"),
    ("sweep-use-zero-pages-2", ["experiment", "sweep", "--knob", "use_zero_pages", "--values", "0,2"], 2,
     "not 0 or 1"),
    ("sweep-65-guests", ["experiment", "sweep", "--knob", "guests", "--values", "65"], 2, "guests must be 1..64"),
    ("sweep-unknown-scenario", ["experiment", "sweep", "--knob", "pages_to_scan", "--values", "100",
                                "--scenario", "nosuch"], 2, "unknown scenario 'nosuch'"),
    pytest.param("run-timeout-nan", ["run", "--image", "{good}", "--timeout", "nan"], 2, "--timeout",
                 id="run-timeout-nan"),
    pytest.param("stress-seconds-nan", ["stress", "--seconds", "nan", "--guests", "1", "--pages", "16",
                                        "--shadows", "0"], 2, "--seconds",
                 id="stress-seconds-nan"),
]


@pytest.mark.parametrize(("case", "args", "code", "message"),
                         [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in BAD_INPUTS])
def test_bad_input_is_a_one_line_error(request: pytest.FixtureRequest, files: dict[str, str], case: str,
                                       args: list[str], code: int, message: str, tmp_path: Path) -> None:
    if "/bin/true" in args and not os.path.exists("/bin/true"):
        pytest.skip("no /bin/true here")
    if "{truncated_gcore}" in args:
        files = {**files, "truncated_gcore": request.getfixturevalue("truncated_gcore")}
    argv = [a.format(**files) for a in args]
    proc = run_cli(*argv, timeout=6 if "nan" in args else 120, cwd=tmp_path)
    assert_one_line_error(proc, code, message)


def test_a_guest_larger_than_the_machine_is_a_usage_error() -> None:
    with shmksm.Machine(frames=16, ksmd=False) as machine, pytest.raises(shmksm.UsageError, match="too small"):
        machine.add_guest(pages=100)


# -- run: the report, the timeline as CSV, the plot ------------------------------------------------


def chains_and_dups(paths: list[str], max_page_sharing: int) -> tuple[int, int]:
    """stable_node_chains and stable_node_dups of an ideal merger: a content on two KSM pages or more is a chain."""
    counts = Counter(p for path in paths for p in memory_pages(path))
    m = max_page_sharing
    shared = [-(-n // m) - (n % m == 1) for n in counts.values() if n > 1]
    chained = [s for s in shared if s > 1]
    return len(chained), sum(chained)


def assert_converged_at_the_second_full_scan(report: dict[str, Any]) -> None:
    """The counters settled during full scan 2, as the kernel's do (README: "reached at full scan 2").

    ``converged.full_scans`` is ksmd's own record; the runner's looks every
    5 ms agree: none saw the final counters before the first full scan ended.
    """
    assert report["converged"]["full_scans"] == 2, report["timeline"]
    timeline = report["timeline"]
    final = tuple(report["ksm"][k] for k in SETTLE_KEYS)
    first = next(e for e in timeline if tuple(e[k] for k in SETTLE_KEYS) == final)
    assert first["full_scans"] >= 1, timeline


def test_run_with_two_scanners_reaches_the_counters_of_one(tmp_path: Path) -> None:
    reports = []
    for scanners in (1, 2):
        proc = run_cli("run", "--scenario", "default", "--guests", 2, "--pages-to-scan", 2000, "--sleep-millisecs", 0,
                       "--scanners", scanners, "--json", "-", "--timeout", 90, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout))
    one, two = reports
    assert len(one["scanners"]) == 1 and len(two["scanners"]) == 2
    assert all(s["cpu_seconds"] > 0 and s["pages_scanned"] > 0 for s in two["scanners"])
    assert {k: two["ksm"][k] for k in SETTLE_KEYS} == {k: one["ksm"][k] for k in SETTLE_KEYS}


def test_run_a_scenario_with_json_csv_and_plot(tmp_path: Path) -> None:
    table, png = tmp_path / "timeline.csv", tmp_path / "counters.png"
    proc = run_cli("run", "--scenario", "default", "--guests", 2, "--pages-to-scan", 2000, "--sleep-millisecs", 0,
                   "--json", "-", "--csv", table, "--plot", png, "--timeout", 90, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) >= {"source", "kernel", "images", "pages", "knobs", "ksm", "converged", "wall_seconds",
                           "ksmd_cpu_seconds", "timeline", "scenario"}
    assert report["scenario"] == "default" and report["source"] == "shmksm"
    assert set(report["ksm"]) == set(RUN_COUNTERS)
    assert set(report["converged"]) == {"seconds", "full_scans", "ksmd_cpu_seconds"}
    assert report["knobs"] == {"pages_to_scan": 2000, "sleep_millisecs": 0, "max_page_sharing": 256,
                               "use_zero_pages": 0, "smart_scan": 1}
    assert len(report["images"]) == 2 and report["pages"] == 2 * MIXES["default"].pages
    assert report["wall_seconds"] >= report["converged"]["seconds"] >= 0
    assert report["ksmd_cpu_seconds"] >= report["converged"]["ksmd_cpu_seconds"] > 0
    # The scenario's images are write_mix's with its default seed: the ideal is known.
    want = ideal(write_mix(str(tmp_path / "same"), 2, MIXES["default"]))
    assert {k: report["ksm"][k] for k in SETTLE_KEYS} == {
        "pages_shared": want.pages_shared, "pages_sharing": want.pages_sharing, "ksm_zero_pages": 0}
    assert_converged_at_the_second_full_scan(report)

    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["t", *RUN_COUNTERS]
    assert len(rows) == 1 + len(report["timeline"]) > 2
    for row, entry in zip(rows[1:], report["timeline"], strict=True):
        assert row == [str(entry[k]) for k in rows[0]]

    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert png.stat().st_size > 1000


def test_run_images_converges_to_their_ideal(tmp_path: Path) -> None:
    images = write_mix(str(tmp_path), 2, MIXES["default"])
    args: list[object] = ["run"]
    for image in images:
        args += ["--image", image]
    report = run_json(*args, "--pages-to-scan", 2000, "--sleep-millisecs", 0, "--json", "-", "--timeout", 90)
    want = brute_force_ideal(images)
    assert want == ideal(images).as_dict()
    ksm = report["ksm"]
    assert report["images"] == images and report["pages"] == want["pages"]
    assert (ksm["pages_shared"], ksm["pages_sharing"], ksm["ksm_zero_pages"]) == (
        want["pages_shared"], want["pages_sharing"], 0)
    assert (ksm["stable_node_chains"], ksm["stable_node_dups"]) == chains_and_dups(images, 256) == (1, 8)
    assert ksm["full_scans"] >= report["converged"]["full_scans"] + 3, "the counters held for 3 full scans"
    assert_converged_at_the_second_full_scan(report)


def test_run_prints_the_counters_without_json(tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    image.write_bytes(pages_of([1] * 5 + [2] * 3 + [0] * 4 + [3]))
    proc = run_cli("run", "--image", image, "--pages-to-scan", 100, "--sleep-millisecs", 0, "--use-zero-pages",
                   "--timeout", 60)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert (lines["pages_shared"], lines["pages_sharing"], lines["ksm_zero_pages"]) == ("2", "6", "4")
    assert re.search(r"^converged at full scan \d+ after [\d.]+ s", proc.stdout, re.MULTILINE)


# -- estimate ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def estimate_images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Mixed images, and contents of 9 (= 1 mod 4) and 10 copies and 700 zero pages to form chains."""
    folder = tmp_path_factory.mktemp("estimate")
    paths = write_mix(str(folder), 2, Mix(common=300, zero=350, unique=50, intra=200, intra_distinct=7), seed=3)
    extra = folder / "extra.img"
    extra.write_bytes(pages_of([5] * 9 + [6] * 10 + [7]))
    return [*paths, str(extra)]


@pytest.mark.parametrize("max_page_sharing", [256, 4, 2])
def test_estimate_is_the_brute_force_count(estimate_images: list[str], max_page_sharing: int) -> None:
    result = run_json("estimate", *estimate_images, "--max-page-sharing", max_page_sharing, "--json", "-")
    assert result.pop("images") == estimate_images
    assert result.pop("seconds") >= 0 and result.pop("bytes_per_second") >= 0 and result.pop("peak_rss_kb") > 0
    want = brute_force_ideal(estimate_images, max_page_sharing)
    assert result == want == ideal(estimate_images, max_page_sharing).as_dict()
    assert want["zero_pages"] == 700 and want["pages"] == 2 * 900 + 20


def test_estimate_prints_a_summary(estimate_images: list[str], tmp_path: Path) -> None:
    out = tmp_path / "estimate.json"
    result = CliRunner().invoke(main, ["estimate", *estimate_images, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    want = brute_force_ideal(estimate_images)
    assert {k: v for k, v in json.loads(out.read_text()).items() if k in want} == want
    result = CliRunner().invoke(main, ["estimate", *estimate_images])
    assert result.exit_code == 0, result.output
    assert f"pages {want['pages']}, distinct {want['distinct']}, zero {want['zero_pages']}" in result.stdout
    assert f"pages_shared {want['pages_shared']}, pages_sharing {want['pages_sharing']} (" in result.stdout
    assert (f"with use_zero_pages: pages_shared {want['pages_shared_zero']}, pages_sharing "
            f"{want['pages_sharing_zero']}, ksm_zero_pages {want['zero_pages']}") in result.stdout


# -- experiments -----------------------------------------------------------------------------------


def test_a_sweep_reports_the_memory_saved_per_value(tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    proc = run_cli("experiment", "sweep", "--knob", "max_page_sharing", "--values", "256,2", "--runs", 1,
                   "--guests", 1, "--jobs", 2, "--json", "-", "--plot", png, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # the progress bar went to stderr
    assert (result["knob"], result["scenario"], result["guests"]) == ("max_page_sharing", "default", 1)
    image = write_mix(str(tmp_path / "mix"), 1, MIXES["default"])
    assert [p["value"] for p in result["points"]] == [256, 2]
    for point in result["points"]:
        want = ideal(image, point["value"])
        assert point["runs"] == 1
        assert point["saved_mib"] == {"mean": round(want.pages_sharing * 4096 / 2**20, 4), "stdev": 0.0}
        assert point["full_scans"]["mean"] >= 1 and point["converged_seconds"]["mean"] > 0
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_the_notifier_experiment_compares_eras() -> None:
    result = run_json("experiment", "notifier", "--guests", 1, "--pages", 64, "--shadows", 1, "--era", "2024",
                      "--era", "2009", "--json", "-")
    assert result["workload"] == {"guests": 1, "pages": 64, "shadows": 1, "duplicate_pages": 32}
    eras = result["eras"]
    assert isinstance(eras, dict) and list(eras) == ["2024", "2009"]
    for r in eras.values():
        assert r["shadow_faults"] == r["merge_faults"] + r["cow_faults"]
        assert r["warmup_faults"] == 64
    assert eras["2024"]["faults_avoided"] == 0
    assert eras["2009"]["faults_avoided"] == eras["2024"]["shadow_faults"] - eras["2009"]["shadow_faults"]
    assert eras["2024"]["shadow_faults"] > 0 and eras["2009"]["updated_in_place"] > 0


# -- stats, knobs and cleanup against a running machine -------------------------------------------

MACHINE_SCRIPT = """
import json, sys
import shmksm

def fill(view):
    view.write(0, b"A" * view.size)
    view.madvise(0, view.size, shmksm.MADV_MERGEABLE)

if __name__ == "__main__":
    with shmksm.Machine(frames=512, pages_to_scan=100, sleep_millisecs=10) as machine:
        guests = [machine.add_guest(pages=32) for _ in range(2)]
        for g in guests:
            machine.spawn(fill, g).join()
        machine.ksm.run = 1
        machine.wait_full_scans(2)
        machine.ksm.run = 0
        print(json.dumps({"prefix": machine.system.spec.prefix, "counters": machine.ksm.counters()}), flush=True)
        for line in sys.stdin:  # one line asks for the knobs; end of input stops the machine
            print(json.dumps(machine.ksm.knobs()), flush=True)
"""


class RunningMachine:
    """A shmksm machine in another process, with two guests of 32 equal pages merged (1 shared, 63 sharing)."""

    def __init__(self, folder: Path) -> None:
        script = folder / "machine.py"
        script.write_text(MACHINE_SCRIPT)
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=folder)
        started = json.loads(self.readline(60))
        self.prefix: str = started["prefix"]
        self.counters: dict[str, int] = started["counters"]

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"the machine process said nothing in {timeout} s")
        line = self.proc.stdout.readline()
        assert line, f"the machine process exited with {self.proc.wait()}"
        return line

    def knobs(self) -> dict[str, Any]:
        """The knobs as the machine's own process reads them."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("knobs\n")
        self.proc.stdin.flush()
        knobs: dict[str, Any] = json.loads(self.readline(30))
        return knobs

    def segments(self) -> set[str]:
        return {e for e in os.listdir(segments.SHM_DIR) if e.startswith(f"{self.prefix}_")}

    def stop(self) -> None:
        try:
            self.proc.communicate(timeout=30)  # end of input: the machine closes
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMachine]:
    m = RunningMachine(tmp_path_factory.mktemp("machine"))
    try:
        yield m
    finally:
        m.stop()
    assert m.proc.returncode == 0


def test_stats_prints_the_sysfs_files(machine: RunningMachine) -> None:
    assert (machine.counters["pages_shared"], machine.counters["pages_sharing"]) == (1, 63)
    proc = run_cli("stats", "--machine", machine.prefix, timeout=60)
    assert proc.returncode == 0, proc.stderr
    values = {}
    for line in proc.stdout.splitlines():
        match = re.fullmatch(r"/sys/kernel/mm/ksm/([a-z_]+):(.+)", line)
        assert match, f"not a sysfs line: {line!r}"
        values[match[1]] = match[2]
    assert set(values) >= {"run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "pages_shared",
                           "pages_sharing", "pages_unshared", "pages_volatile", "full_scans", "ksm_zero_pages",
                           "general_profit", "stable_node_chains", "stable_node_dups", "use_zero_pages"}
    assert list(values) == sorted(values)
    assert (values["pages_shared"], values["pages_sharing"], values["ksm_zero_pages"]) == ("1", "63", "0")
    assert (values["run"], values["max_page_sharing"]) == ("0", "256")
    assert int(values["full_scans"]) >= 2


def test_knobs_sets_the_running_machines_knobs(machine: RunningMachine) -> None:
    proc = run_cli("knobs", "pages_to_scan=777", "sleep_millisecs= 33 ", "--machine", machine.prefix, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pages_to_scan: 777" in proc.stdout.splitlines()
    assert "sleep_millisecs: 33" in proc.stdout.splitlines()
    knobs = machine.knobs()
    assert (knobs["pages_to_scan"], knobs["sleep_millisecs"]) == (777, 33)
    shown = run_cli("knobs", "--machine", machine.prefix, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert dict(line.split(": ", 1) for line in shown.stdout.splitlines()) == {k: str(v) for k, v in knobs.items()}


@pytest.mark.parametrize(("setting", "code", "message"), [
    ("max_page_sharing=1", 2, "max_page_sharing: 1 is below 2 (EINVAL)"),
    ("max_page_sharing=3", 1, "cannot change while pages are shared (EBUSY)"),
    ("pages_to_scan=abc", 2, "is not an integer (EINVAL)"),
    ("run=5", 2, "(EINVAL)"),
    ("pages_shared=0", 2, "read-only"),
    ("nosuch=1", 2, "no knob named 'nosuch'"),
    ("mitigation=off", 2, "mitigation must be one of none, vusion, domains"),
    ("mitigation=vusion", 1, "mitigation cannot change while pages are shared (EBUSY)"),
])
def test_knobs_refuses_as_the_kernel(machine: RunningMachine, setting: str, code: int, message: str) -> None:
    before = machine.knobs()
    proc = run_cli("knobs", setting, "--machine", machine.prefix, timeout=60)
    assert_one_line_error(proc, code, message)
    assert machine.knobs() == before


def test_cleanup_removes_dead_hosts_segments_only(machine: RunningMachine) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(segments.SHM_DIR) / f"{segments.PREFIX}{dead.pid}_0badc0de_ctl"
    stale.write_bytes(bytes(64))
    live = machine.segments()
    assert f"{machine.prefix}_ctl" in live
    try:
        proc = run_cli("cleanup", timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        count = re.fullmatch(r"(\d+) stale segment\(s\) removed", lines[-1])
        assert count, lines
        assert int(count[1]) == len(lines) - 1 and all(line.startswith("removed /dev/shm/") for line in lines[:-1])
        assert not stale.exists()
        assert machine.segments() == live, "cleanup removed a live machine's segments"
    finally:
        stale.unlink(missing_ok=True)


# -- demo and stress --------------------------------------------------------------------------------


def test_demo_saves_memory(tmp_path: Path) -> None:
    png = tmp_path / "demo.png"
    proc = run_cli("demo", "--seconds", 3, "--memory", 4, "--guests", 2, "--plot", png, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    saved = re.search(r"^memory saved\s+([\d.]+) MiB of ([\d.]+) MiB \(([\d.]+)%\)", proc.stdout, re.MULTILINE)
    assert saved, proc.stdout
    assert float(saved[1]) > 0 and float(saved[3]) > 0
    assert math.isclose(float(saved[2]), 8.0)
    assert re.search(r"full scans\s+\d+, guests wrote [1-9]\d* times, 0 read-back mismatches", proc.stdout)
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_stress_finds_no_mismatch() -> None:
    """Guests, ksmd and a free-running shadow at full speed for 3 s: every guest reads back what it wrote."""
    t0 = time.monotonic()
    proc = run_cli("stress", "--seconds", 3, "--guests", 2, "--pages", 256, "--shadows", 1, timeout=90)
    seconds = time.monotonic() - t0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "mismatched bytes per guest: [0, 0]; stale shadow reads: 0; check() passed" in proc.stdout, proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^2 guests x 256 pages for [\d.]+ s, era 2024: [1-9]\d* full scans, [1-9]\d* COW breaks",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert seconds >= 3
