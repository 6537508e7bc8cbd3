"""The content key of a page: xxh3-64 of its 4 KiB, one page at a time or many at once.

:func:`checksums` hashes a batch of frames in the package's C extension when
it can: one call for the batch, the GIL released, each frame's cache lines
prefetched two frames ahead (a batch's frames lie anywhere in the pool, and
no hardware prefetcher crosses into the next page).  It calls XXH3_64bits
from xxhash's own library, so its keys are xxhash's: the extension is handed
that function's address once, after it gave the right keys on a test page.
Where the extension or the symbol is missing, the same keys come from
xxhash one page at a time.
"""

from __future__ import annotations

import ctypes
import importlib
from typing import Final

import numpy as np
import numpy.typing as npt
import xxhash

from .._mm.frames import PAGE_SIZE

checksum: Final = xxhash.xxh3_64_intdigest


def _c_checksums() -> object:
    """The extension's checksums(pool, pfns, out), set up and checked; None where it cannot be."""
    try:
        from .._mm import _robust

        _xxhash = importlib.import_module("xxhash._xxhash")

        c_checksums = _robust.checksums
        address = ctypes.cast(ctypes.CDLL(_xxhash.__file__).XXH3_64bits, ctypes.c_void_p).value
    except (ImportError, AttributeError, OSError):
        return None
    if not address:
        return None
    _robust.set_xxh3(address)
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    pool = np.frombuffer(bytes(PAGE_SIZE) + page, np.uint8)
    out = np.zeros(2, np.uint64)
    c_checksums(pool, np.array([1, 0], np.int64), out)
    if out.tolist() != [checksum(page), checksum(bytes(PAGE_SIZE))]:
        return None
    return c_checksums


_C_CHECKSUMS: Final = _c_checksums()


def checksums(pool: memoryview, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """The key of each frame ``pfns[i]`` of the frame pool ``pool`` (its flat bytes)."""
    pfns = np.ascontiguousarray(pfns, np.int64)
    if _C_CHECKSUMS is not None:
        out = np.empty(len(pfns), np.uint64)
        _C_CHECKSUMS(pool, pfns, out)  # type: ignore[operator]
        return out
    return np.fromiter((checksum(pool[p << 12:(p + 1) << 12]) for p in pfns.tolist()), np.uint64, len(pfns))
