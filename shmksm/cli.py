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

from . import segments
from .errors import ShmksmError, UsageError

F = TypeVar("F", bound=Callable[..., Any])


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def friendly(fn: F) -> F:
    """Turn shmksm errors into click errors: one line, the right exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, _sigterm)
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
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be positive, not {value}")
    return value


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


@main.command()
@click.option("--image", "images", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Raw memory image (pages of 4096 bytes); one guest per image. Repeat for more guests.")
@click.option("--pages-to-scan", type=int, default=100, show_default=True, callback=_positive,
              help="Pages per ksmd batch (pages_to_scan).")
@click.option("--sleep-millisecs", type=click.IntRange(min=0), default=20, show_default=True,
              help="Sleep between batches (sleep_millisecs).")
@click.option("--max-page-sharing", type=click.IntRange(min=2), default=256, show_default=True,
              help="Mappings per KSM page (max_page_sharing).")
@click.option("--use-zero-pages", is_flag=True, help="Map empty pages to the zero page (use_zero_pages=1).")
@click.option("--smart-scan/--no-smart-scan", default=True, show_default=True, help="smart_scan.")
@click.option("--stable-scans", type=int, default=3, show_default=True, callback=_positive,
              help="Full scans without a change of pages_shared, pages_sharing, ksm_zero_pages that mean converged.")
@click.option("--scans", type=int, default=None, callback=_positive, help="Stop after this many full scans.")
@click.option("--seconds", type=float, default=None, callback=_positive, help="Stop after this many seconds.")
@click.option("--timeout", type=float, default=600, show_default=True, callback=_positive, help="Give up after this long.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the report as JSON ('-' for stdout).")
@friendly
def run(images: tuple[str, ...], pages_to_scan: int, sleep_millisecs: int, max_page_sharing: int,
        use_zero_pages: bool, smart_scan: bool, stable_scans: int, scans: int | None, seconds: float | None,
        timeout: float, json_out: str | None) -> None:
    """Run memory images under ksmd until the counters settle; report like realksm.py."""
    from .runner import image_pages, run_images

    for path in images:
        image_pages(path)
    out = _open_output(json_out) if json_out else None
    knobs = {"pages_to_scan": pages_to_scan, "sleep_millisecs": sleep_millisecs,
             "max_page_sharing": max_page_sharing, "use_zero_pages": int(use_zero_pages),
             "smart_scan": int(smart_scan)}
    report = run_images(list(images), knobs=knobs, stable_scans=stable_scans, max_scans=scans,
                        max_seconds=seconds, timeout=timeout)
    if out is not None:
        json.dump(report, out, indent=1)
        out.write("\n")
        if out is not sys.stdout:
            out.close()
    else:
        ksm = report["ksm"]
        for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
                     "stable_node_chains", "stable_node_dups", "full_scans", "general_profit"):
            click.echo(f"{name}: {ksm[name]}")
        c = report["converged"]
        click.echo(f"converged at full scan {c['full_scans']} after {c['seconds']} s "
                   f"({c['ksmd_cpu_seconds']} ksmd CPU-s)")


@main.command()
@friendly
def cleanup() -> None:
    """Remove the shared-memory segments that a killed shmksm host left in /dev/shm."""
    removed = segments.cleanup_stale()
    for name in removed:
        click.echo(f"removed /dev/shm/{name}")
    click.echo(f"{len(removed)} stale segment(s) removed")


if __name__ == "__main__":
    main()
