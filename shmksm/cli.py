"""The ``shmksm`` command.

Errors print as one line on stderr: exit code 2 for usage errors, 1 for
runtime errors, as click does; never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from ._mm import control, segments
from ._mm.mmu_notifier import ERAS
from .errors import ShmksmError, UsageError

F = TypeVar("F", bound=Callable[..., Any])


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def console_main() -> None:
    """The ``shmksm`` command: SIGTERM unwinds like Ctrl-C, so that every machine closes and cleans up.

    The handler is installed here, in the command's own process, and not by
    :func:`main`, which callers (click's CliRunner, scripts) may invoke in theirs.
    """
    signal.signal(signal.SIGTERM, _sigterm)
    main()


def friendly(fn: F) -> F:
    """Turn shmksm errors into click errors: one line, the right exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            raise click.UsageError(str(exc).splitlines()[0]) from None
        except ShmksmError as exc:
            raise click.ClickException(str(exc).splitlines()[0]) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _positive(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and not (0 < value < float("inf")):  # nan fails this too
        raise click.BadParameter(f"must be a positive finite number, not {value}")
    return value


def _check_size(guests: int, pages: int) -> None:
    """Refuse, before building anything, guests the machine could never hold."""
    import shutil

    from ._ksm.scanner import MAX_GUEST_PAGES
    from ._mm.control import MAX_GUESTS

    if guests > MAX_GUESTS:
        raise click.UsageError(f"at most {MAX_GUESTS} guests, not {guests}")
    if pages > MAX_GUEST_PAGES:
        raise click.UsageError(f"a guest has at most {MAX_GUEST_PAGES} pages ({MAX_GUEST_PAGES >> 8} MiB), not {pages}")
    need = guests * pages * 4096 * 9 // 8
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return
    if need > free:
        raise click.UsageError(f"guests of {guests} x {pages} pages need {need / 2**30:.1f} GiB of shared memory, "
                               f"/dev/shm has {free / 2**30:.1f} GiB free")


def _write_json(out: Any, obj: Any) -> None:
    """Write ``obj`` as indented JSON to an output from _open_output, and close it unless stdout."""
    json.dump(obj, out, indent=1)
    out.write("\n")
    if out is not sys.stdout:
        out.close()


def _open_output(path: str) -> Any:
    if path == "-":
        return sys.stdout
    try:
        return open(path, "w")
    except OSError as exc:
        raise click.UsageError(f"cannot write {path!r}: {exc.strerror}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shmksm")
def main() -> None:
    """shmksm: Linux KSM and MMU notifiers, emulated with real processes and real shared memory."""


_MAP_OPTIONS = (
    click.option("--map", "map_path", default=None, metavar="FILE.png",
                 help="Draw the frame pool at the end: free, private, KSM pages coloured by mapcount, the zero "
                      "page (needs matplotlib)."),
    click.option("--map-every", type=float, default=None, callback=_positive, metavar="SECONDS",
                 help="With --map, also draw it every SECONDS as frames of an animation (FILE-0001.png, ..., "
                      "FILE.gif)."),
)


def _map_options(fn: F) -> F:
    for option in reversed(_MAP_OPTIONS):
        fn = option(fn)
    return fn


def _check_map(map_path: str | None, map_every: float | None) -> None:
    if map_every is not None and not map_path:
        raise click.UsageError("--map-every needs --map FILE.png")
    if map_path:
        _check_plot_path(map_path)


def _echo_map(drawn: dict[str, Any] | None) -> None:
    if drawn:
        more = f", animation {drawn['animation']} ({len(drawn['animation_frames'])} frames)" \
            if "animation" in drawn else ""
        click.echo(f"frame map         {drawn['map']}{more}")


_FORMAT_OPTION = click.option(
    "--format", "image_format", type=click.Choice(["auto", "raw", "core"]), default="auto", show_default=True,
    help="How to read the images: auto takes ELF cores (ET_CORE) as cores and any other file of whole pages as "
         "raw memory (even one that begins with an ELF header); core insists on a core; raw never parses.")


@main.command()
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Memory image: a raw file of 4096-byte pages or an ELF core file; one guest per image. Repeatable.")
@_FORMAT_OPTION
@click.option("--scenario", default=None, metavar="NAME",
              help="A built-in scenario instead of images: default, zero-heavy, mostly-unique, one-content.")
@click.option("--guests", type=int, default=4, show_default=True, callback=_positive, help="Guests of a --scenario.")
@click.option("--pages-to-scan", type=int, default=100, show_default=True, callback=_positive,
              help="Pages per ksmd batch (pages_to_scan).")
@click.option("--sleep-millisecs", type=click.IntRange(min=0), default=20, show_default=True,
              help="Sleep between batches (sleep_millisecs).")
@click.option("--max-page-sharing", type=click.IntRange(min=2), default=256, show_default=True,
              help="Mappings per KSM page (max_page_sharing).")
@click.option("--use-zero-pages", is_flag=True, help="Map empty pages to the zero page (use_zero_pages=1).")
@click.option("--smart-scan/--no-smart-scan", default=True, show_default=True, help="smart_scan.")
@click.option("--scanners", type=click.IntRange(1, control.MAX_SCANNERS), default=1, show_default=True,
              help="Scanner processes merging in parallel: shmksm's own knob (the kernel has one ksmd).")
@click.option("--until", type=click.Choice(["converged"]), default="converged", show_default=True,
              help="Run until pages_shared, pages_sharing and ksm_zero_pages stay the same for --stable-scans "
                   "full scans.")
@click.option("--stable-scans", type=int, default=3, show_default=True, callback=_positive,
              help="Full scans without a change that mean converged.")
@click.option("--scans", type=int, default=None, callback=_positive, help="Stop after this many full scans instead.")
@click.option("--seconds", type=float, default=None, callback=_positive, help="Stop after this many seconds instead.")
@click.option("--timeout", type=float, default=600, show_default=True, callback=_positive,
              help="Give up after this long.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the report as JSON ('-' for stdout).")
@click.option("--csv", "csv_out", default=None, metavar="FILE",
              help="Write the counters' timeline as CSV ('-' for stdout).")
@click.option("--plot", default=None, metavar="FILE.png", help="Plot the counters over time (needs matplotlib).")
@click.option("--explain", "explain_pages", is_flag=True,
              help="Add why each page merged or not (as shmksm explain) to the report.")
@_map_options
@friendly
def run(images: tuple[str, ...], image_format: str, scenario: str | None, guests: int, pages_to_scan: int,
        sleep_millisecs: int, max_page_sharing: int, use_zero_pages: bool, smart_scan: bool, scanners: int, until: str,
        stable_scans: int, scans: int | None, seconds: float | None, timeout: float, json_out: str | None,
        csv_out: str | None, plot: str | None, explain_pages: bool, map_path: str | None,
        map_every: float | None) -> None:
    """Run memory images (or a built-in scenario) under ksmd until the counters settle.

    The report has the same keys as the kernel-side runner's
    (bench/kernel_ksm.py), so the two compare key by key.

    Scenarios, one image per guest (shmksm.images.MIXES): default (common
    pages across guests, zero pages, unique pages, duplicates within a
    guest); zero-heavy (mostly zero pages); mostly-unique (little to merge);
    one-content (every page alike: stable node chains).
    """
    import tempfile

    from .tool.images import MIXES, image_pages, write_mix
    from .tool.runner import run_images

    del until  # the only mode; --scans and --seconds stop earlier
    if bool(images) == bool(scenario):
        raise click.UsageError("give either --image FILE (repeatable) or --scenario NAME")
    if scenario is not None:
        _check_size(guests, 1)
    if scenario is not None and scenario not in MIXES:
        raise click.UsageError(f"unknown scenario {scenario!r}; scenarios: {', '.join(MIXES)}")
    for path in images:
        image_pages(path, image_format)
    outputs = [_open_output(path) if path else None for path in (json_out, csv_out)]
    if plot:
        _check_plot_path(plot)
    _check_map(map_path, map_every)
    knobs = {"pages_to_scan": pages_to_scan, "sleep_millisecs": sleep_millisecs,
             "max_page_sharing": max_page_sharing, "use_zero_pages": int(use_zero_pages),
             "smart_scan": int(smart_scan), "scanners": scanners}
    with tempfile.TemporaryDirectory(prefix="shmksm-scenario-") as tmp:
        paths = list(images) if images else write_mix(tmp, guests, MIXES[str(scenario)])
        report = run_images(paths, knobs=knobs, stable_scans=stable_scans, max_scans=scans,
                            max_seconds=seconds, timeout=timeout, format=image_format, explain=explain_pages,
                            map_path=map_path, map_every=map_every)
    if scenario:
        report["scenario"] = scenario
    json_file, csv_file = outputs
    if csv_file is not None:
        write_timeline_csv(report["timeline"], csv_file)
        if csv_file is not sys.stdout:
            csv_file.close()
    if json_file is not None:
        _write_json(json_file, report)
    if plot:
        from .tool.plots import plot_timeline

        plot_timeline(report, plot)
    if json_file is None and csv_file is None:
        ksm = report["ksm"]
        for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
                     "stable_node_chains", "stable_node_dups", "full_scans", "general_profit"):
            click.echo(f"{name}: {ksm[name]}")
        c = report["converged"]
        click.echo(f"converged at full scan {c['full_scans']} after {c['seconds']} s "
                   f"({c['ksmd_cpu_seconds']} ksmd CPU-s)")
        if scanners > 1:
            click.echo("scanners: " + ", ".join(f"{'ksmd' + (str(i) if i else '')} {s['cpu_seconds']} CPU-s"
                                                for i, s in enumerate(report["scanners"])))
        _echo_map(report.get("map"))
        if explain_pages:
            from .tool.explain import explanation_lines

            click.echo("")
            for line in explanation_lines(report["explain"]):
                click.echo(line)


def write_timeline_csv(timeline: list[dict[str, Any]], out: Any) -> None:
    """The timeline of a run as CSV: one row per change of the counters."""
    import csv

    if not timeline:
        return
    writer = csv.DictWriter(out, fieldnames=list(timeline[0]))
    writer.writeheader()
    writer.writerows(timeline)


def _check_plot_path(path: str) -> None:
    import os

    from .tool.plots import require_matplotlib

    require_matplotlib()
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise click.UsageError(f"cannot write {path!r}: no writable folder {folder!r}")


_PID_OPTIONS = (
    click.option("--pid", "pids", multiple=True, type=click.IntRange(min=1), metavar="PID",
                 help="A live process to read (repeatable), instead of images."),
    click.option("--all-mappings", is_flag=True,
                 help="Read every readable mapping, not only the private anonymous ones ksmd would scan."),
    click.option("--keep-going", is_flag=True, help="Skip a process that cannot be read (gone, no permission) "
                                                    "instead of stopping."),
)


def _pid_options(fn: F) -> F:
    for option in reversed(_PID_OPTIONS):
        fn = option(fn)
    return fn


@main.command()
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False))
@_FORMAT_OPTION
@_pid_options
@click.option("--max-page-sharing", type=click.IntRange(min=2), default=256, show_default=True,
              help="Mappings per KSM page, as the knob.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run on a Dask cluster (tcp://host:port); every worker must read the image paths.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result as JSON ('-' for stdout).")
@friendly
def estimate(images: tuple[str, ...], image_format: str, pids: tuple[int, ...], all_mappings: bool,
             keep_going: bool, max_page_sharing: int, scheduler: str | None, json_out: str | None) -> None:
    """The ideal dedup of IMAGES (or of live processes, --pid), without running the emulator.

    Streams the images (16 bytes of memory per page, whatever their size)
    and counts what KSM would converge to: pages_shared and pages_sharing
    under max_page_sharing, with and without use_zero_pages.

    With --pid, reads the resident pages of running processes as ksmd would
    scan them (/proc/PID/maps, pagemap, mem) and prints, in total and per
    process, the pages that would merge and the memory saved, with
    general_profit and ksm_process_profit as the kernel computes them:

    \b
        shmksm estimate --pid 1234 --pid 5678
        shmksm estimate guest0.img guest1.img --max-page-sharing 64 --json -
    """
    import resource
    import time

    from .tool.images import ideal, image_pages

    if bool(images) == bool(pids):
        raise click.UsageError("give IMAGES or --pid PID (repeatable), not both or neither")
    if pids:
        if scheduler:
            raise click.UsageError("--scheduler reads images, not live processes: capture them first")
        _estimate_live(list(pids), max_page_sharing, all_mappings, keep_going, json_out)
        return

    total = sum(image_pages(p, image_format) for p in images)
    out = _open_output(json_out) if json_out else None
    t0 = time.perf_counter()
    if scheduler:
        from .tool.fleet import ideal_on_cluster

        best = ideal_on_cluster(list(images), scheduler, max_page_sharing, image_format)
    else:
        best = ideal(list(images), max_page_sharing, image_format)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {**best.as_dict(), "images": list(images), "seconds": round(seconds, 3),
              "bytes_per_second": round(total * 4096 / max(seconds, 1e-9)), "peak_rss_kb": peak_kb}
    if out is not None:
        _write_json(out, result)
        return
    saved = best.pages_sharing
    click.echo(f"pages {best.pages}, distinct {best.distinct}, zero {best.zero_pages}")
    click.echo(f"max_page_sharing {max_page_sharing}: pages_shared {best.pages_shared}, pages_sharing "
               f"{best.pages_sharing} ({_mib(saved)} saved, {100 * saved / max(1, best.pages):.1f}%)")
    click.echo(f"with use_zero_pages: pages_shared {best.pages_shared_zero}, pages_sharing "
               f"{best.pages_sharing_zero}, ksm_zero_pages {best.zero_pages}")
    click.echo(f"{total * 4096 / 2**30:.2f} GiB in {seconds:.2f} s "
               f"({total * 4096 / max(seconds, 1e-9) / 1e9:.2f} GB/s), peak RSS {peak_kb // 1024} MiB")


def _mib(pages: int) -> str:
    return f"{pages * 4096 / 2**20:.1f} MiB"


def _skipped(message: str) -> None:
    click.echo(f"skipped: {message}", err=True)


def _estimate_live(pids: list[int], max_page_sharing: int, all_mappings: bool, keep_going: bool,
                   json_out: str | None) -> None:
    """estimate --pid: what KSM would converge to on live processes, in total and per process."""
    from .tool.live import estimate_processes

    out = _open_output(json_out) if json_out else None
    result = estimate_processes(pids, max_page_sharing, all_mappings, keep_going, _skipped)
    if out is not None:
        _write_json(out, result)
        return
    what = "readable mappings" if all_mappings else "private anonymous mappings"
    click.echo(f"{len(result['processes'])} process(es), resident pages of {what} (as ksmd scans them), "
               f"max_page_sharing {max_page_sharing}")
    click.echo(f"{'pid':>8}  {'command':<16}{'pages':>10}{'merging':>10}{'saved':>10}{'saved MiB':>11}"
               f"{'ksm_process_profit':>20}{'zero-page maps':>16}")
    for p in result["processes"]:
        click.echo(f"{p['pid']:>8}  {p['comm'][:15]:<16}{p['pages']:>10}{p['ksm_merging_pages']:>10}"
                   f"{p['saved_pages']:>10}{p['saved_pages'] * 4096 / 2**20:>11.1f}"
                   f"{p['ksm_process_profit']:>20}{p['zero_page_mappings']:>16}")
    saved = result["pages_sharing"]
    click.echo(f"total: pages {result['pages']}, distinct {result['distinct']}, zero {result['zero_pages']}; "
               f"pages_shared {result['pages_shared']}, pages_sharing {saved} "
               f"({_mib(saved)} saved, {100 * saved / max(1, result['pages']):.1f}%), "
               f"general_profit {result['general_profit']}")
    click.echo(f"with use_zero_pages: pages_shared {result['pages_shared_zero']}, pages_sharing "
               f"{result['pages_sharing_zero']}, ksm_zero_pages {result['zero_pages']}, "
               f"general_profit {result['general_profit_zero']}")
    click.echo("merging: pages that would map a KSM page (ksm_merging_pages); saved: its share of pages_sharing, "
               "each KSM page's cost split among the pages that map it")


@main.command()
@click.option("--pid", "pids", multiple=True, required=True, type=click.IntRange(min=1), metavar="PID",
              help="A live process to capture (repeatable).")
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for PID.img (raw pages) and mappings.json.")
@click.option("--all-mappings", is_flag=True,
              help="Capture every readable mapping, not only the private anonymous ones ksmd would scan.")
@click.option("--keep-going", is_flag=True, help="Skip a process that cannot be read instead of stopping.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the summary as JSON ('-' for stdout).")
@friendly
def capture(pids: tuple[int, ...], outdir: str, all_mappings: bool, keep_going: bool, json_out: str | None) -> None:
    """Write the resident memory of live processes as raw images, for shmksm run later.

    One raw image per process (the pages estimate --pid reads, in address
    order) and mappings.json: per process its command, image and, per
    mapping, the address range, permissions, path and first page in the image.

    \b
        shmksm capture --pid 1234 --pid 5678 -o snap
        shmksm run --image snap/1234.img --image snap/5678.img
    """
    import os

    from .tool.live import capture_processes

    if os.path.exists(outdir) and not os.access(outdir, os.W_OK):
        raise click.UsageError(f"cannot write into {outdir!r}")
    out = _open_output(json_out) if json_out else None
    try:
        result = capture_processes(list(pids), outdir, all_mappings, keep_going, _skipped)
    except OSError as exc:
        raise click.UsageError(f"cannot write into {outdir!r}: {exc.strerror or exc}") from None
    if out is not None:
        _write_json(out, result)
        return
    for pid, p in result["processes"].items():
        image = os.path.join(outdir, p["image"]) if p["image"] else "(no pages: no image)"
        click.echo(f"{pid:>8}  {p['comm'][:15]:<16}{p['pages']:>9} pages in {len(p['mappings'])} mappings -> {image}")
    click.echo(f"mappings: {os.path.join(outdir, 'mappings.json')}")


@main.command()
@click.option("--guests", type=int, default=4, show_default=True, callback=_positive, help="VM-like guests.")
@click.option("--memory", type=int, default=32, show_default=True, callback=_positive, help="MiB per guest.")
@click.option("--seconds", type=float, default=20, show_default=True, callback=_positive,
              help="How long the guests run.")
@click.option("--use-zero-pages", is_flag=True, help="Map empty pages to the zero page.")
@click.option("--shadows", type=click.IntRange(0, 16), default=1, show_default=True,
              help="Shadow workers (secondary MMUs) reading the guests' memory every second.")
@click.option("--era", type=click.Choice(ERAS), default="2024", show_default=True,
              help="Notifier era: what the shadows are told when ksmd or a copy-on-write changes a PTE.")
@click.option("--plot", default=None, metavar="FILE.png", help="Plot the counters over time (needs matplotlib).")
@_map_options
@friendly
def demo(guests: int, memory: int, seconds: float, use_zero_pages: bool, shadows: int, era: str,
         plot: str | None, map_path: str | None, map_every: float | None) -> None:
    """A host with VM-like guests and shadow MMUs under ksmd, a live dashboard, then what merging saved.

    On a terminal the dashboard redraws in place (counters and their change,
    memory saved, each guest's ksm_stat, shadow faults, ksmd's CPU); into a
    pipe or a file it prints a plain line a second.

    \b
        shmksm demo --guests 4 --memory 16 --seconds 10
        shmksm demo --map memory.png --map-every 2
    """
    from .tool.dashboard import Dashboard
    from .tool.demo import demo_pages_to_scan, run_demo

    if plot:
        _check_plot_path(plot)
    _check_map(map_path, map_every)
    pages = memory * 256
    _check_size(guests, pages)
    total = guests * pages
    click.echo(f"shmksm demo: {guests} guests x {memory} MiB ({total} pages), {shadows} shadow MMU(s), era {era}, "
               f"ksmd pages_to_scan {demo_pages_to_scan(total)}, sleep_millisecs 20, for {seconds:g} s")
    with Dashboard(f"shmksm demo: {guests} guests x {memory} MiB, era {era}") as board:
        out = run_demo(guests, pages, seconds, use_zero_pages=use_zero_pages, shadows=shadows, era=era,
                       on_tick=board.show, plot=plot, map_path=map_path, map_every=map_every)
    c, results, shadow_stats = out["counters"], out["guests"], out["shadows"]
    saved = c["pages_sharing"] + c["ksm_zero_pages"]
    mapped = total  # the workload writes every page of every guest
    used = mapped - saved
    click.echo("")
    click.echo(f"memory saved      {_mib(saved)} of {_mib(mapped)} "
               f"({100 * saved / mapped:.1f}%), dedup ratio {mapped / max(1, used):.2f}:1")
    mappings = c["pages_shared"] + c["pages_sharing"]
    click.echo(f"pages_shared      {c['pages_shared']} KSM pages stand for {mappings} mappings")
    click.echo(f"COW breaks        {out['cow_ksm']} writes into KSM pages got a private copy")
    if shadow_stats:
        click.echo(f"shadow faults     {sum(r['faults'] for r in shadow_stats)} (emulated vmexits) in "
                   f"{sum(r['reads'] for r in shadow_stats)} shadow reads; "
                   f"{sum(r['updated_in_place'] for r in shadow_stats)} entries updated in place by change_pte")
    click.echo(f"full scans        {c['full_scans']}, guests wrote {sum(r['writes'] for r in results)} times, "
               f"{sum(r['mismatches'] for r in results)} read-back mismatches")
    _echo_map(out["map"])
    if any(r["mismatches"] for r in results):
        raise click.ClickException("a guest read back something it did not write")


@main.group()
def experiment() -> None:
    """Experiments: the notifier eras side by side, knob sweeps, the deduplication side channel."""


@experiment.command("notifier")
@click.option("--guests", type=int, default=2, show_default=True, callback=_positive, help="Guests.")
@click.option("--pages", type=int, default=1024, show_default=True, callback=_positive, help="Pages per guest.")
@click.option("--shadows", type=int, default=2, show_default=True, callback=_positive, help="Shadow workers.")
@click.option("--era", "eras", multiple=True, type=click.Choice(ERAS),
              help="Run only these eras (repeatable); default: all four.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result as JSON ('-' for stdout).")
@click.option("--plot", default=None, metavar="FILE.png", help="Plot shadow faults per era (needs matplotlib).")
@click.option("--sync/--no-sync", default=True, show_default=True,
              help="Also run each era with synchronous shadows and report what it costs writers and ksmd.")
@friendly
def experiment_notifier(guests: int, pages: int, shadows: int, eras: tuple[str, ...], json_out: str | None,
                        plot: str | None, sync: bool) -> None:
    """The change_pte experiment: shadow faults per notifier era on one workload.

    Guests hold duplicate pages; shadow workers read every page (warm-up),
    ksmd merges, the shadows read again, the guests write into the merged
    pages (copy-on-write), the shadows read again.  2009: change_pte repoints
    the entries of merged pages in place (a read-only PTE) and drops those of
    copied ones (a writable PTE: a fault, as KVM took); 2012: change_pte inside
    invalidate_range_start/end finds nothing to update; 2024: invalidate
    only; interval: the interval notifier.
    """
    from .tool.experiments import notifier_experiment

    if shadows > 16:
        raise click.BadParameter("at most 16 shadow workers", param_hint="--shadows")
    out = _open_output(json_out) if json_out else None

    def progress(era: str, r: dict[str, Any]) -> None:
        if out is not sys.stdout:
            click.echo(f"  era {era:<9} shadow faults {r['shadow_faults']:6d}", err=out is not None)

    if plot:
        _check_plot_path(plot)
    result = notifier_experiment(guests, pages, shadows, eras or ERAS, progress, sync=sync)
    if plot:
        from .tool.plots import plot_eras

        plot_eras(result, plot)
    if out is not None:
        _write_json(out, result)
        return
    click.echo(f"\n{'era':<10}{'faults':>8}{'merge':>8}{'cow':>8}{'saved merge':>12}{'saved cow':>10}"
               f"{'in place':>10}{'messages':>10}{'broker msg/s':>14}{'lag p99 us':>12}{'lag max us':>12}")
    for era, r in result["eras"].items():
        saved = ["-" if r[k] is None else r[k] for k in ("merge_faults_avoided", "cow_faults_avoided")]
        click.echo(f"{era:<10}{r['shadow_faults']:>8}{r['merge_faults']:>8}{r['cow_faults']:>8}{saved[0]!s:>12}"
                   f"{saved[1]!s:>10}{r['updated_in_place']:>10}{r['messages']:>10}"
                   f"{r['broker_messages_per_s']!s:>14}{r['lag_p99_us']:>12}{r['lag_max_us']:>12}")
    if sync:
        click.echo(f"\nsynchronous invalidation: what the writers and ksmd pay\n"
                   f"{'era':<10}{'cow us async':>14}{'cow us sync':>13}{'merges/s async':>16}{'merges/s sync':>15}"
                   f"{'faults sync':>13}")
        for era, r in result["eras"].items():
            y = r["sync"]
            click.echo(f"{era:<10}{r['cow_break_us']:>14}{y['cow_break_us']:>13}{r['merges_per_s']!s:>16}"
                       f"{y['merges_per_s']!s:>15}{y['shadow_faults']:>13}")


def _attached(machine: str | None) -> Any:
    from ._ksm.sysfs import AttachedKsm, running_machines

    if machine is None:
        found = running_machines()
        if not found:
            raise click.ClickException("no running shmksm machine (start one with shmksm demo or the Python API)")
        if len(found) > 1:
            raise click.UsageError(f"{len(found)} machines run; choose one with --machine: {', '.join(found)}")
        machine = found[0]
    return AttachedKsm(machine)


_MACHINE_OPTION = click.option("--machine", default=None, metavar="NAME",
                               help="Which running machine (its segment prefix); needed when several run.")


@main.command()
@_MACHINE_OPTION
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result as JSON ('-' for stdout).")
@friendly
def explain(machine: str | None, json_out: str | None) -> None:
    """Why pages merge or not in a running machine: every page of every guest under exactly one reason.

    merged, zero page, unique so far, volatile, waiting for its second scan,
    skipped by smart_scan, over max_page_sharing, not mergeable, not present;
    a column per guest and the total, each summing to the guests' pages.
    ksmd publishes its rmap items' states for it between two batches.

    \b
        shmksm explain
        shmksm explain --machine shmksm_1234_abcd --json -
    """
    from .tool.explain import explain_machine, explanation_lines

    out = _open_output(json_out) if json_out else None
    with _attached(machine) as ksm:
        prefix = ksm.prefix
    result = explain_machine(prefix).as_dict()
    if out is not None:
        _write_json(out, result)
        return
    for line in explanation_lines(result):
        click.echo(line)


@main.command()
@_MACHINE_OPTION
@friendly
def stats(machine: str | None) -> None:
    """Print the knobs and counters of a running machine, like grep . /sys/kernel/mm/ksm/*."""
    with _attached(machine) as ksm:
        for line in ksm.sysfs_lines():
            click.echo(line)


@main.command()
@click.argument("settings", nargs=-1, metavar="[NAME=VALUE]...")
@_MACHINE_OPTION
@friendly
def knobs(settings: tuple[str, ...], machine: str | None) -> None:
    """Print the knobs of a running machine, or set some: shmksm knobs pages_to_scan=1000 run=1."""
    pairs = []
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.UsageError(f"{item!r} is not NAME=VALUE")
        pairs.append((name.strip(), value.strip()))
    with _attached(machine) as ksm:
        for name, value in pairs:
            ksm.set(name, value)
        for name, value in ksm.knobs().items():
            click.echo(f"{name}: {value}")


@main.command()
@click.option("--guests", type=int, default=4, show_default=True, callback=_positive, help="Guest processes.")
@click.option("--pages", type=int, default=2048, show_default=True, callback=_positive, help="Pages per guest.")
@click.option("--seconds", type=float, default=10, show_default=True, callback=_positive, help="How long to run.")
@click.option("--writes", type=int, default=None, callback=_positive,
              help="Stop each guest after this many operations instead.")
@click.option("--shadows", type=click.IntRange(0, 16), default=1, show_default=True,
              help="Shadow workers reading the guests.")
@click.option("--era", type=click.Choice(ERAS), default="2024", show_default=True,
              help="Notifier era.")
@click.option("--seed", type=int, default=1, show_default=True)
@friendly
def stress(guests: int, pages: int, seconds: float, writes: int | None, shadows: int, era: str, seed: int) -> None:
    """Guests write, ksmd merges and copy-on-write breaks, all at full speed; every guest checks its memory.

    Exits 1 if any guest read back something it did not write, a shadow read
    a reused frame, or machine.check() finds a broken invariant.
    """
    from .tool.dashboard import Dashboard
    from .tool.demo import run_stress

    _check_size(guests, pages)
    with Dashboard(f"shmksm stress: {guests} guests x {pages} pages, era {era}") as board:
        out = run_stress(guests, pages, seconds, writes=writes, shadows=shadows, era=era, seed=seed,
                         on_tick=board.show)
    c, mismatches, stale = out["counters"], out["mismatches"], out["stale_reads"]
    click.echo(f"{guests} guests x {pages} pages for {out['seconds']:.1f} s, era {era}: "
               f"{c['full_scans']} full scans, {out['cow_ksm']} COW breaks of KSM pages, "
               f"{sum(s.get('faults', 0) for s in out['shadows'])} shadow faults")
    click.echo(f"verified bytes written per second: {out['bytes_per_second'] / 1e6:.1f} MB/s "
               f"({out['bytes_written']} bytes by {guests} guests)")
    click.echo(f"mismatched bytes per guest: {mismatches}; stale shadow reads: {stale}; check() passed")
    if any(mismatches) or stale:
        raise click.ClickException("memory was not what the guests wrote")


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not values:
        raise click.BadParameter("give at least one value")
    return values


@experiment.command("sweep")
@click.option("--knob", required=True, type=click.Choice(["pages_to_scan", "sleep_millisecs", "guests",
                                                           "max_page_sharing", "use_zero_pages"]),
              help="The knob to vary.")
@click.option("--values", required=True, callback=_int_list, help="Comma-separated values, e.g. 100,1000,10000.")
@click.option("--runs", type=int, default=3, show_default=True, callback=_positive, help="Runs per value.")
@click.option("--scenario", default="default", show_default=True, help="The built-in scenario to run.")
@click.option("--guests", type=int, default=4, show_default=True, callback=_positive, help="Guests (unless swept).")
@click.option("--jobs", type=int, default=None, callback=_positive, help="Runs side by side (default: the cores).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run each run as a task on a Dask cluster (tcp://host:port) instead of here.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result as JSON ('-' for stdout).")
@click.option("--plot", default=None, metavar="FILE.png", help="Plot the sweep (needs matplotlib).")
@friendly
def experiment_sweep(knob: str, values: list[int], runs: int, scenario: str, guests: int, jobs: int | None,
                     scheduler: str | None, json_out: str | None, plot: str | None) -> None:
    """Vary one knob over values; report convergence time, scanner CPU and memory saved.

    Each run is a whole emulated machine in a process of its own: --jobs at
    a time here, or one task each on a Dask cluster with --scheduler (every
    worker needs shmksm installed), with the same table, JSON and plot.

    \b
        shmksm experiment sweep --knob pages_to_scan --values 100,1000,10000
        shmksm experiment sweep --knob pages_to_scan --values 100,1000 --scheduler tcp://10.0.0.5:8786 --json -
    """
    from ._ksm.sysfs import parse_knob
    from .tool.experiments import sweep

    for v in values:
        if knob == "guests":
            if not 1 <= v <= 64:
                raise click.BadParameter(f"guests must be 1..64, not {v}", param_hint="--values")
        elif knob == "pages_to_scan" and v <= 0:
            raise click.BadParameter(f"pages_to_scan must be positive, not {v}", param_hint="--values")
        else:
            parse_knob(knob, v)
    out = _open_output(json_out) if json_out else None
    if plot:
        _check_plot_path(plot)
    with click.progressbar(length=len(values) * runs, label=f"sweeping {knob}", file=sys.stderr) as bar:
        result = sweep(knob, values, runs, scenario, guests, jobs=jobs, progress=lambda v, r: bar.update(1),
                       scheduler=scheduler)
    if plot:
        from .tool.plots import plot_sweep

        plot_sweep(result, plot)
    if out is not None:
        _write_json(out, result)
        return
    click.echo(f"{knob:>18}{'converged s':>14}{'ksmd CPU s':>13}{'saved MiB':>12}{'full scans':>12}")
    for p in result["points"]:
        click.echo(f"{p['value']:>18}{p['converged_seconds']['mean']:>14.3f}{p['ksmd_cpu_seconds']['mean']:>13.3f}"
                   f"{p['saved_mib']['mean']:>12.1f}{p['full_scans']['mean']:>12.1f}")


@experiment.command("sidechannel")
@click.option("--trials", type=click.IntRange(min=1), default=100, show_default=True,
              help="Trials: each has its own secret page among --candidates contents.")
@click.option("--candidates", type=click.IntRange(min=2), default=16, show_default=True,
              help="Candidate contents per trial; chance is 1 / candidates.")
@click.option("--seed", type=click.IntRange(min=0), default=1, show_default=True,
              help="Seed of the contents, the secrets and the order of the timed writes.")
@click.option("--mitigation", "mitigations", multiple=True, type=click.Choice(["none", "vusion", "domains"]),
              help="Run only these mitigations (repeatable); default: all three.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result as JSON ('-' for stdout).")
@friendly
def experiment_sidechannel(trials: int, candidates: int, seed: int, mitigations: tuple[str, ...],
                           json_out: str | None) -> None:
    """The deduplication timing side channel, under each mitigation.

    A victim guest holds one secret page per trial, one of --candidates
    contents; an attacker guest plants every candidate, waits three full
    scans of ksmd, times a one-byte write to each of its pages and guesses
    the slowest.  Reports the write times of merged and unmerged pages
    (median, p5, p95), their Kolmogorov-Smirnov p-value, the success rate
    beside chance, and each mitigation's cost: faults taken by the timed
    writes, ksmd CPU to three full scans, memory saved.  Needs scipy
    (pip install 'shmksm[stats]').
    """
    from .tool.sidechannel import PolicyResult, sidechannel_experiment

    out = _open_output(json_out) if json_out else None

    def progress(r: PolicyResult) -> None:
        if out is not sys.stdout:
            click.echo(f"  {r.mitigation:<8} success {r.hits}/{r.trials}, KS p {r.ks_pvalue:.3g}", err=True)

    result = sidechannel_experiment(trials, candidates, seed, mitigations or ("none", "vusion", "domains"), progress)
    if out is not None:
        _write_json(out, result)
        return
    click.echo(f"{trials} trials, {candidates} candidates (chance {1 / candidates:.3f}), seed {seed}")
    click.echo(f"{'mitigation':<11}{'merged us p5/50/95':>22}{'unmerged us p5/50/95':>23}{'KS p':>10}"
               f"{'success':>9}{'faults':>8}{'ksmd CPU s':>12}{'saved pages':>13}")
    for name, r in result["policies"].items():
        m, u = r["merged"], r["unmerged"]
        click.echo(f"{name:<11}{m['p5_us']:>8.1f}{m['median_us']:>7.1f}{m['p95_us']:>7.1f}"
                   f"{u['p5_us']:>9.1f}{u['median_us']:>7.1f}{u['p95_us']:>7.1f}{r['ks_pvalue']:>10.2g}"
                   f"{r['success_rate']:>9.2f}{r['faults']:>8}{r['ksmd_cpu_seconds']:>12.3f}{r['pages_saved']:>13}")


def _int_list_or_none(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    return [] if value.strip().lower() in ("", "none") else _int_list(ctx, param, value)


@experiment.command("tune")
@click.option("--scenario", default=None, metavar="NAME", help="A built-in scenario (default: default).")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Memory images instead (repeatable): e.g. the processes shmksm capture wrote.")
@_FORMAT_OPTION
@click.option("--guests", type=int, default=2, show_default=True, callback=_positive, help="Guests of a --scenario.")
@click.option("--target", type=float, default=0.9, show_default=True,
              help="The share of the ideal saving to reach, in (0, 1].")
@click.option("--cpu-budget", type=float, default=None, callback=_positive, metavar="SECONDS",
              help="ksmd CPU seconds allowed to reach the target (default: no limit, the least wins).")
@click.option("--pages-to-scan", "pages_values", default="100,1000,10000", show_default=True, callback=_int_list,
              help="pages_to_scan values to try.")
@click.option("--sleep-millisecs", "sleep_values", default="0,20", show_default=True, callback=_int_list,
              help="sleep_millisecs values to try.")
@click.option("--smart-scan", "smart_values", default="1", show_default=True, callback=_int_list,
              help="smart_scan values to try (0,1 for both).")
@click.option("--advisor-target-scan-time", "advisor_values", default="1", show_default=True,
              callback=_int_list_or_none,
              help="Also try the scan-time advisor with these advisor_target_scan_time seconds ('none': not).")
@click.option("--max-page-sharing", type=click.IntRange(min=2), default=256, show_default=True,
              help="max_page_sharing of every run.")
@click.option("--use-zero-pages", is_flag=True, help="Count empty pages mapped to the zero page as saved.")
@click.option("--timeout", type=float, default=60, show_default=True, callback=_positive,
              help="Seconds a run may take at most.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result as JSON ('-' for stdout).")
@click.option("--plot", default=None, metavar="FILE.png", help="Plot saving against ksmd CPU (needs matplotlib).")
@friendly
def experiment_tune(scenario: str | None, images: tuple[str, ...], image_format: str, guests: int, target: float,
                    cpu_budget: float | None, pages_values: list[int], sleep_values: list[int],
                    smart_values: list[int], advisor_values: list[int], max_page_sharing: int,
                    use_zero_pages: bool, timeout: float, json_out: str | None, plot: str | None) -> None:
    """Find the knobs that reach a share of the ideal saving within a budget of ksmd CPU.

    Runs the workload once per setting (every combination of the values
    given, and the scan-time advisor), follows each run's saving against
    ksmd's CPU seconds, and prints the settings, the best one (the least CPU
    to the target, within the budget) and the curve of saving against CPU:
    for each share of the ideal, the least CPU any setting needed.  Exit 1
    if no setting reached the target within the budget.

    \b
        shmksm experiment tune --scenario default --target 0.9 --cpu-budget 0.5
        shmksm capture --pid 1234 --pid 5678 -o snap
        shmksm experiment tune --image snap/1234.img --image snap/5678.img --json -
    """
    import tempfile

    from .tool.images import MIXES, image_pages, write_mix
    from .tool.tune import candidates, tune

    if images and scenario:
        raise click.UsageError("give --scenario NAME or --image FILE (repeatable), not both")
    scenario = scenario or ("default" if not images else None)
    if scenario is not None and scenario not in MIXES:
        raise click.UsageError(f"unknown scenario {scenario!r}; scenarios: {', '.join(MIXES)}")
    if not 0 < target <= 1:
        raise click.BadParameter(f"a share of the ideal saving in (0, 1], not {target}", param_hint="--target")
    for name, values, low, high in (("--pages-to-scan", pages_values, 1, None), ("--sleep-millisecs", sleep_values,
                                    0, None), ("--smart-scan", smart_values, 0, 1),
                                    ("--advisor-target-scan-time", advisor_values, 1, None)):
        for v in values:
            if v < low or (high is not None and v > high):
                raise click.BadParameter(f"{v} is out of range", param_hint=name)
    for path in images:
        image_pages(path, image_format)
    if scenario is not None:
        _check_size(guests, MIXES[scenario].pages)
    out = _open_output(json_out) if json_out else None
    if plot:
        _check_plot_path(plot)
    settings = candidates(pages_values, sleep_values, smart_values, advisor_values)

    def progress(setting: Any, run: dict[str, Any]) -> None:
        if out is not sys.stdout:
            cpu = run["cpu_seconds_to_target"]
            click.echo(f"  {run['label']:<58} {'-' if cpu is None else f'{cpu:.3f}':>8} ksmd CPU-s to target, "
                       f"final {100 * run['final_share']:.1f}%", err=out is not None)

    with tempfile.TemporaryDirectory(prefix="shmksm-tune-") as tmp:
        paths = list(images) if images else write_mix(tmp, guests, MIXES[str(scenario)])
        result = tune(paths, target, cpu_budget, settings, max_page_sharing, use_zero_pages, timeout, progress)
    result["workload"] = {"scenario": scenario, "guests": guests} if scenario else {"images": list(images)}
    if plot:
        from .tool.plots import plot_tune

        plot_tune(result, plot)
    if out is not None:
        _write_json(out, result)
    else:
        _echo_tune(result)
    if result["best"] is None:
        budget = "" if cpu_budget is None else f" within {cpu_budget:g} ksmd CPU-s"
        raise click.ClickException(f"no setting reached {100 * target:g}% of the ideal saving{budget}")


def _echo_tune(result: dict[str, Any]) -> None:
    best, target = result["best"], result["target"]
    click.echo(f"ideal saving {result['ideal_pages_saved']} pages ({_mib(result['ideal_pages_saved'])}); "
               f"target {100 * target:g}%"
               + ("" if result["cpu_budget"] is None else f" within {result['cpu_budget']:g} ksmd CPU-s"))
    if best is not None:
        click.echo(f"best: {best['label']}: {100 * target:g}% at {best['cpu_seconds_to_target']:.3f} ksmd CPU-s, "
                   f"{best['seconds_to_target']:.2f} s")
    click.echo("saving against ksmd CPU (the least CPU any setting needed):")
    for point in result["frontier"]:
        cpu = "never" if point["cpu_seconds"] is None else f"{point['cpu_seconds']:.3f} s"
        click.echo(f"  {100 * point['share']:5.0f}%  {cpu:>9}  {point['setting'] or ''}")


@main.command()
@friendly
def cleanup() -> None:
    """Remove the shared-memory segments that a killed shmksm host left in /dev/shm."""
    removed = segments.cleanup_stale()
    for name in removed:
        click.echo(f"removed /dev/shm/{name}")
    click.echo(f"{len(removed)} stale segment(s) removed")



@main.command()
@click.option("--kills", type=click.IntRange(min=0), default=50, show_default=True,
              help="SIGKILL this many processes (or fewer, if --seconds passes first).")
@click.option("--seconds", type=float, default=120, show_default=True, callback=_positive,
              help="Stop killing after this many seconds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the victims, moments and workload.")
@click.option("--roles", default="all", show_default=True, metavar="ROLE[,ROLE...]",
              help="Roles to kill: guest, ksmd, broker, shadow (or all).")
@click.option("--guests", type=click.IntRange(2, 16), default=4, show_default=True,
              help="Guests writing and verifying.")
@click.option("--pages", type=click.IntRange(16, 4096), default=64, show_default=True, help="Pages per guest.")
@click.option("--hang-seconds", type=float, default=30, show_default=True, callback=_positive,
              help="The watchdog's bound: a step or a guest that makes no progress this long is a hang.")
@click.option("--scanners", type=click.IntRange(1, control.MAX_SCANNERS), default=1, show_default=True,
              help="Parallel scanners (shmksm's own knob scanners); the ksmd role kills one of them.")
@click.option("--json", "json_out", default=None, is_flag=False, flag_value="-", metavar="[FILE]",
              help="Write the report as JSON (to stdout without FILE, or with '-').")
@friendly
def chaos(kills: int, seconds: float, seed: int, roles: str, guests: int, pages: int, hang_seconds: float,
          scanners: int, json_out: str | None) -> None:
    """Fault-injection campaign: SIGKILL random processes of every role, restart them, check, verify.

    Guests write and verify shared content, ksmd merges (sleep_millisecs 0), a
    shadow MMU reads; every 0.05-0.4 s a process of a chosen role is killed and
    restarted and machine.check() runs.  At the end every guest gets a known
    content, reads it back, and ksmd must converge to its ideal counters.
    Exits 1 on any hang, failed check, lost byte or left segment.
    """
    from .tool.chaos import ChaosConfig, roles_option, run_chaos

    cfg = ChaosConfig(kills=kills, seconds=seconds, seed=seed, roles=roles_option(roles), guests=guests, pages=pages,
                      hang_seconds=hang_seconds, scanners=scanners)
    out = _open_output(json_out) if json_out else None
    report = run_chaos(cfg)
    if out is not None:
        _write_json(out, report.as_dict())
    if out is not sys.stdout:
        click.echo(report.table())
        if report.stacks:
            click.echo("\nstacks at the hang:\n" + report.stacks, err=True)
    if not report.ok:
        raise click.ClickException("the campaign failed: " + (report.errors[0] if report.errors else
                                                              ", ".join(report.failures())))


if __name__ == "__main__":
    console_main()
