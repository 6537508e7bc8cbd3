"""Which of the parallel scanners owns a content: the first to meet it claims it.

Parallel scanners (the ``scanners`` knob) keep their own trees, so every page
of one content must go to one scanner: a page goes to the owner of its
checksum at the last visit.  The owner of a checksum is whoever *claimed*
its bucket first, in a table shared by the scanners (in the frame metadata
segment): the scanner that records a page's new checksum claims the bucket
if nobody has, and a page never hashed goes by its page-table run.

That is first touch, as a NUMA kernel places a page on the node of the CPU
that touched it first.  A content met first in a scanner's own runs stays
with it, so the frames a scanner hashes on a page's first visit are mostly
the ones it reads again to merge them: each process maps and reads its own
part of the pool, in order, instead of every frame being read by two
processes.  (Routed by a hash of the checksum instead, two scanners each
mapped nearly all of the pool and hashed scattered frames, which cost about
a fifth more CPU than one scanner on the 1M-page benchmark.)

An entry is ``count << 8 | (owner + 1)``: claims are made for one number of
scanners, and when ``scanners`` changes they are stale and claimed anew.  A
claim is one compare-and-swap in the package's C extension: of two scanners
claiming a bucket at once one wins, and both see its owner.  A scanner
killed at any instant leaves every entry whole, and its successor has its
index, so its claims.  Without the extension nothing is claimed and
:attr:`AVAILABLE` is False: the scanners then route by a hash of the
checksum, as before.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

try:
    from .._mm import _robust

    _c_claim: Any = _robust.claim
    _c_give: Any = _robust.give
    _c_owners: Any = _robust.owners
except (ImportError, AttributeError):  # pragma: no cover - no extension, or one built from older source
    _c_claim = _c_give = _c_owners = None

AVAILABLE: Final = _c_claim is not None
_MULT: Final = np.uint64(0x9E3779B97F4A7C15)


class Claims:
    """The shared claim table, as one scanner uses it."""

    def __init__(self, table: npt.NDArray[np.uint16]) -> None:
        size = len(table)
        if size & (size - 1):
            raise ValueError(f"the claim table has {size} entries, not a power of two")
        self.table = table
        self.claimed = 0  # buckets the last claim() claimed
        self._shift = np.uint64(64 - (size.bit_length() - 1))

    def buckets(self, sums: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
        """The bucket of each checksum (its top bits, after a multiplicative hash)."""
        out: npt.NDArray[np.int64] = ((sums.astype(np.uint64) * _MULT) >> self._shift).astype(np.int64)
        return out

    def owners(self, sums: npt.NDArray[np.uint32], count: int) -> npt.NDArray[np.int64]:
        """The owner of each checksum among ``count`` scanners, -1 where nobody claimed it."""
        entries = self.table[self.buckets(sums)].astype(np.int64)
        valid = (entries >> 8 == count) & (entries & 0xFF != 0)
        out: npt.NDArray[np.int64] = np.where(valid, (entries & 0xFF) - 1, -1)
        return out

    def page_owners(self, checksums: npt.NDArray[np.uint32], pages: npt.NDArray[np.intp],
                    count: int) -> npt.NDArray[np.int64]:
        """The owner of each of ``pages`` among ``count`` scanners, by its checksum at the last visit
        (``checksums``: a guest's, by page): :meth:`owners` of the checksum, -1 where nobody
        claimed it; a page never hashed (checksum 0) by its run of 512 pages, spread by hash.
        One pass in the extension over what every scanner walks on every page."""
        out = np.empty(len(pages), np.int64)
        assert _c_owners is not None
        _c_owners(self.table, int(self._shift), checksums, np.ascontiguousarray(pages, np.int64), count, out)
        return out

    def claim(self, sums: npt.NDArray[np.uint32], count: int, want: int) -> npt.NDArray[np.int64]:
        """The owner of each checksum, claiming for ``want`` those nobody claimed (how many:
        :attr:`claimed`)."""
        out = np.empty(len(sums), np.int64)
        self.claimed = 0
        if len(sums):
            assert _c_claim is not None
            self.claimed = _c_claim(self.table, self.buckets(sums), want, count, out)
        return out

    def give(self, buckets: npt.NDArray[np.int64], count: int, giver: int, taker: int) -> int:
        """Hand the ``buckets`` that ``giver`` owns to ``taker``; how many changed hands."""
        if not len(buckets):
            return 0
        assert _c_give is not None
        given: int = _c_give(self.table, np.ascontiguousarray(buckets, np.int64), count, giver, taker)
        return given
