"""A compact hash table from 64-bit content keys to int32 values, with batch operations.

The scanner's trees are keyed by page checksum.  A Python dict costs about
100 bytes an entry; this table costs 12 bytes a slot (a uint64 key and an
int32 value) at a load of at most 0.7, and looks up or inserts a whole batch
of keys with a few numpy operations.  Keys are xxh3 checksums, uniformly
distributed, so their low bits are the home slot.  Open addressing with
linear probing; a deleted slot keeps a tombstone until the next rehash.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

EMPTY: Final = -1
TOMBSTONE: Final = -2
_MAX_LOAD: Final = 0.7


class KeyTable:
    """uint64 key → int32 value (values are never negative)."""

    def __init__(self, capacity: int = 1024) -> None:
        cap = 1 << max(4, (capacity - 1).bit_length())
        self._alloc(cap)

    def _alloc(self, cap: int) -> None:
        self.keys: npt.NDArray[np.uint64] = np.zeros(cap, np.uint64)
        self.values: npt.NDArray[np.int32] = np.full(cap, EMPTY, np.int32)
        self.mask = cap - 1
        self.used = 0  # live entries and tombstones
        self.live = 0
        self._kv = self.keys.data
        self._vv = self.values.data

    def __len__(self) -> int:
        return self.live

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)

    def clear(self) -> None:
        self.values.fill(EMPTY)
        self.used = self.live = 0

    # -- scalar operations (the merge path) ---------------------------------------------

    def get(self, key: int) -> int:
        """The value of ``key``, or -1."""
        kv, vv, mask = self._kv, self._vv, self.mask
        pos = key & mask
        while True:
            v = vv[pos]
            if v == EMPTY:
                return -1
            if v >= 0 and kv[pos] == key:
                return int(v)
            pos = (pos + 1) & mask

    def set(self, key: int, value: int) -> None:
        """Insert ``key`` or overwrite its value."""
        kv, vv, mask = self._kv, self._vv, self.mask
        pos = key & mask
        free = -1
        while True:
            v = vv[pos]
            if v == EMPTY:
                break
            if v == TOMBSTONE:
                if free < 0:
                    free = pos
            elif kv[pos] == key:
                vv[pos] = value
                return
            pos = (pos + 1) & mask
        if free < 0:
            free = pos
            self.used += 1
        kv[free] = key
        vv[free] = value
        self.live += 1
        if self.used > _MAX_LOAD * len(self.keys):
            self._rehash(len(self.keys))

    def delete(self, key: int) -> bool:
        """Remove ``key``; return whether it was there."""
        kv, vv, mask = self._kv, self._vv, self.mask
        pos = key & mask
        while True:
            v = vv[pos]
            if v == EMPTY:
                return False
            if v >= 0 and kv[pos] == key:
                vv[pos] = TOMBSTONE
                self.live -= 1
                return True
            pos = (pos + 1) & mask

    # -- batch operations ---------------------------------------------------------------------

    def lookup(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.int32]:
        """The value of every key, -1 where absent."""
        out = np.full(len(keys), EMPTY, np.int32)
        pending = np.arange(len(keys))
        pos = (keys & np.uint64(self.mask)).astype(np.int64)
        want = keys
        while len(pending):
            v = self.values[pos]
            hit = (v >= 0) & (self.keys[pos] == want)
            out[pending[hit]] = v[hit]
            more = ~(hit | (v == EMPTY))
            pending, pos, want = pending[more], (pos[more] + 1) & self.mask, want[more]
        return out

    def insert_new(self, keys: npt.NDArray[np.uint64], values: npt.NDArray[np.int32]) -> None:
        """Insert keys that are absent from the table and distinct from each other."""
        if self.used + len(keys) > _MAX_LOAD * len(self.keys):
            self._rehash(len(self.keys), extra=len(keys))
        pending = np.arange(len(keys))
        pos = (keys & np.uint64(self.mask)).astype(np.int64)
        reused = 0
        while len(pending):
            v = self.values[pos]
            free = v < 0
            slots, first = np.unique(pos[free], return_index=True)
            if len(slots):
                winners = pending[free][first]
                reused += int(np.count_nonzero(self.values[slots] == TOMBSTONE))
                self.keys[slots] = keys[winners]
                self.values[slots] = values[winners]
                won = np.zeros(len(keys), np.bool_)
                won[winners] = True
                more = ~won[pending]
            else:
                more = np.ones(len(pending), np.bool_)
            pending, pos = pending[more], (pos[more] + 1) & self.mask
        self.live += len(keys)
        self.used += len(keys) - reused

    def _rehash(self, cap: int, extra: int = 0) -> None:
        while (self.live + extra) > _MAX_LOAD * cap:
            cap *= 2
        live = self.values >= 0
        keys, values = self.keys[live], self.values[live]
        self._alloc(cap)
        if len(keys):
            self.insert_new(keys, values)
