"""Work on a Dask cluster (the optional ``dask`` extra): one way of reaching it, for every command.

:func:`cluster` connects to the scheduler (a malformed address is a usage
error, an unreachable one a runtime error, each one line) and
:func:`map_on_cluster` runs one task per item there, turning a worker's
failure into one line too.  ``estimate --scheduler`` digests each image where
a worker can read it and merges the (digest, count) tables on the client:
memory on the client is 16 bytes per *distinct* page of the fleet.
``experiment sweep --scheduler`` runs each run of a sweep as a task.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from ..errors import ShmksmError, UsageError
from .images import Ideal, content_counts, ideal_from_counts, merge_counts

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def cluster(scheduler: str) -> Iterator[Any]:
    """A Dask client connected to ``scheduler`` (tcp://host:port), closed after."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--scheduler needs Dask: pip install 'shmksm[dask]'") from None
    try:
        client = Client(scheduler, timeout=10)  # type: ignore[no-untyped-call]
    except ValueError as exc:  # a malformed address: no port, an unknown scheme
        raise UsageError(f"bad Dask scheduler address {scheduler!r}: {exc}") from None
    except Exception as exc:  # OSError, TimeoutError: nobody answers there
        raise ShmksmError(f"cannot reach the Dask scheduler at {scheduler}: {type(exc).__name__}: {exc}") from None
    try:
        yield client
    finally:
        client.close()  # type: ignore[no-untyped-call]


def map_on_cluster(fn: Callable[[T], R], items: Sequence[T], scheduler: str,
                   done: Callable[[int, R], None] | None = None) -> list[R]:
    """``fn(item)`` for every item, one task each on the cluster; the results in order.

    ``done(index, result)`` is called as each task finishes.  A task that
    raised a ShmksmError raises it here; any other failure, ShmksmError
    naming it.
    """
    from distributed import as_completed

    with cluster(scheduler) as client:
        futures = client.map(fn, list(items), pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        try:
            for future in as_completed(futures):  # type: ignore[no-untyped-call]
                i = index[future.key]
                results[i] = future.result()
                if done is not None:
                    done(i, results[i])
        except ShmksmError:
            raise
        except Exception as exc:  # a worker's error, as the worker raised it
            raise ShmksmError(f"a Dask worker failed: {type(exc).__name__}: {exc}") from None
        return results


def _counts_of(job: tuple[str, str]) -> Any:
    path, format = job
    return content_counts([path], format)


def ideal_on_cluster(paths: Sequence[str], scheduler: str, max_page_sharing: int = 256,
                     format: str = "auto") -> Ideal:
    """images.ideal() with one task per image on the Dask cluster at ``scheduler``."""
    jobs = [(os.path.abspath(p), format) for p in paths]  # the workers do not share our working directory
    return ideal_from_counts(*merge_counts(map_on_cluster(_counts_of, jobs, scheduler)), max_page_sharing)
