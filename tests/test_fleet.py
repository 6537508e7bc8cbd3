"""shmksm.tool.fleet: the ideal dedup of images on a local Dask cluster, and ``shmksm estimate --scheduler``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, brute_force_ideal, build_core, pages_of, run_cli

from shmksm.cli import main
from shmksm.tool.fleet import ideal_on_cluster
from shmksm.tool.images import Mix, ideal, write_mix

distributed = pytest.importorskip("distributed", reason="the dask extra (dask[distributed]) is not installed")

# The parts of estimate's JSON that depend on the run, not on the images.
RUN_KEYS = ("seconds", "bytes_per_second", "peak_rss_kb")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local cluster of two worker processes; its scheduler's address."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three raw images with pages common to all, and an ELF core with a content of 9 copies."""
    out = tmp_path_factory.mktemp("fleet")
    paths = write_mix(str(out), 3, Mix(common=96, zero=40, unique=24, intra=64, intra_distinct=5))
    build_core(out / "guest.core", [pages_of([1] * 9 + [0] * 3), pages_of([2, 2])])
    return [*paths, str(out / "guest.core")]


@pytest.mark.parametrize("max_page_sharing", [256, 4])
def test_ideal_on_cluster_is_the_local_ideal(cluster: str, fleet: list[str], max_page_sharing: int) -> None:
    got = ideal_on_cluster(fleet, cluster, max_page_sharing)
    assert got == ideal(fleet, max_page_sharing)
    assert got.as_dict() == brute_force_ideal(fleet, max_page_sharing)
    assert got.pages_sharing > 0 and got.zero_pages == 3 * 40 + 3


def estimate_json(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(main, ["estimate", *args, "--json", "-"])
    assert result.exit_code == 0, (result.output, result.exception)
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_estimate_with_a_scheduler_gives_the_same_numbers(cluster: str, fleet: list[str]) -> None:
    on_cluster = estimate_json(*fleet, "--scheduler", cluster, "--max-page-sharing", "4")
    local = estimate_json(*fleet, "--max-page-sharing", "4")
    for report in (on_cluster, local):
        for key in RUN_KEYS:
            assert report.pop(key) is not None
    assert on_cluster == local
    assert on_cluster == {**brute_force_ideal(fleet, 4), "images": fleet}


def test_an_unreachable_scheduler_is_a_one_line_error(fleet: list[str]) -> None:
    t0 = time.monotonic()
    proc = run_cli("estimate", fleet[0], "--scheduler", "tcp://127.0.0.1:1", timeout=60)
    elapsed = time.monotonic() - t0
    assert_one_line_error(proc, 1, "cannot reach the Dask scheduler at tcp://127.0.0.1:1")
    assert elapsed < 15, f"gave up after {elapsed:.1f} s"


@pytest.mark.parametrize("address", [
    pytest.param("garbage", id="no-port"),
    pytest.param("nosuchproto://127.0.0.1:1", id="unknown-scheme"),
])
def test_a_malformed_scheduler_address_is_a_usage_error(fleet: list[str], address: str) -> None:
    proc = run_cli("estimate", fleet[0], "--scheduler", address, timeout=60)
    assert_one_line_error(proc, 2, "scheduler")


def test_relative_image_paths_work_with_a_scheduler(cluster: str, fleet: list[str]) -> None:
    folder = Path(fleet[0]).parent
    names = [Path(p).name for p in fleet]
    proc = run_cli("estimate", *names, "--scheduler", cluster, "--json", "-", timeout=60, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert {k: report[k] for k in ("pages_shared", "pages_sharing")} == {
        k: v for k, v in brute_force_ideal(fleet).items() if k in ("pages_shared", "pages_sharing")}


def test_a_sweep_on_the_cluster_gives_the_local_table_json_and_plot(cluster: str, tmp_path: Path) -> None:
    """Each run a task on the two workers: the same points as a local sweep (the saving is exact)."""
    args = ["experiment", "sweep", "--knob", "max_page_sharing", "--values", "2,256", "--runs", "2",
            "--scenario", "one-content", "--guests", "1"]
    on_cluster = json.loads(run_cli(*args, "--scheduler", cluster, "--json", "-", timeout=300).stdout)
    local = json.loads(run_cli(*args, "--json", "-", timeout=300).stdout)
    for result in (on_cluster, local):
        assert [p["value"] for p in result["points"]] == [2, 256]
        assert [p["runs"] for p in result["points"]] == [2, 2]
    assert [p["saved_mib"] for p in on_cluster["points"]] == [p["saved_mib"] for p in local["points"]]
    assert {k: v for k, v in on_cluster.items() if k != "points"} == {k: v for k, v in local.items() if k != "points"}
    table = run_cli(*args, "--scheduler", cluster, "--plot", tmp_path / "sweep.png", timeout=300)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["max_page_sharing", "converged", "s", "ksmd", "CPU", "s",
                                                    "saved", "MiB", "full", "scans"]
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_a_sweep_with_an_unreachable_scheduler_is_a_one_line_error() -> None:
    proc = run_cli("experiment", "sweep", "--knob", "pages_to_scan", "--values", "100", "--runs", "1",
                   "--scheduler", "tcp://127.0.0.1:1", timeout=60)
    assert_one_line_error(proc, 1, "cannot reach the Dask scheduler at tcp://127.0.0.1:1")
    proc = run_cli("experiment", "sweep", "--knob", "pages_to_scan", "--values", "100", "--runs", "1",
                   "--scheduler", "garbage", timeout=60)
    assert_one_line_error(proc, 2, "scheduler")
