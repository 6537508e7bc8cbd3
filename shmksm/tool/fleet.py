"""The ideal dedup of a fleet's memory images, on a Dask cluster (the optional ``dask`` extra).

Each image is digested where a worker can read it; the workers return
(digest, count) tables, merged on the client.  Memory on the client is 16
bytes per *distinct* page of the fleet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import ShmksmError, UsageError
from .images import Ideal, content_counts, ideal_from_counts, merge_counts


def ideal_on_cluster(paths: Sequence[str], scheduler: str, max_page_sharing: int = 256,
                     format: str = "auto") -> Ideal:
    """images.ideal() with one task per image on the Dask cluster at ``scheduler``."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--scheduler needs Dask: pip install 'shmksm[dask]'") from None
    paths = [os.path.abspath(p) for p in paths]  # the workers do not share our working directory
    try:
        client = Client(scheduler, timeout=10)  # type: ignore[no-untyped-call]
    except ValueError as exc:  # a malformed address: no port, an unknown scheme
        raise UsageError(f"bad Dask scheduler address {scheduler!r}: {exc}") from None
    except Exception as exc:  # OSError, TimeoutError: nobody answers there
        raise ShmksmError(f"cannot reach the Dask scheduler at {scheduler}: {type(exc).__name__}: {exc}") from None
    try:
        futures = client.map(lambda p: content_counts([p], format), paths, pure=False)
        try:
            parts = client.gather(futures)  # type: ignore[no-untyped-call]
        except ShmksmError:
            raise
        except Exception as exc:  # a worker's error, as the worker raised it
            raise ShmksmError(f"a Dask worker failed: {type(exc).__name__}: {exc}") from None
        return ideal_from_counts(*merge_counts(parts), max_page_sharing)
    finally:
        client.close()  # type: ignore[no-untyped-call]
