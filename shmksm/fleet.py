"""The ideal dedup of a fleet's memory images, on a Dask cluster (the optional ``dask`` extra).

Each image is digested where a worker can read it; the workers return
(digest, count) tables, merged on the client.  Memory on the client is 16
bytes per *distinct* page of the fleet.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ShmksmError, UsageError
from .images import Ideal, content_counts, ideal_from_counts, merge_counts


def ideal_on_cluster(paths: Sequence[str], scheduler: str, max_page_sharing: int = 256) -> Ideal:
    """images.ideal() with one task per image on the Dask cluster at ``scheduler``."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--scheduler needs Dask: pip install 'shmksm[dask]'") from None
    try:
        client = Client(scheduler, timeout=10)
    except (OSError, TimeoutError) as exc:
        raise ShmksmError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    try:
        futures = client.map(lambda p: content_counts([p]), list(paths), pure=False)
        return ideal_from_counts(*merge_counts(client.gather(futures)), max_page_sharing)
    finally:
        client.close()
