"""Memory images: synthetic mixes for experiments, and the ideal dedup of any set of images.

A raw image is a file of 4096-byte pages.  :func:`write_mix` writes one image
per guest with a known mix of page kinds; :func:`ideal` counts, by brute
force, what an ideal merger would reach on a set of images — the figures KSM
converges to: pages_shared and pages_sharing under a max_page_sharing cap,
and the pages of zeros (ksm_zero_pages with use_zero_pages).  It streams the
images a chunk at a time and keeps one 16-byte digest per distinct page.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import xxhash

from .errors import UsageError
from .frames import PAGE_SIZE

_ZERO_PAGE = bytes(PAGE_SIZE)
_CHUNK_PAGES = 4096


@dataclass(frozen=True)
class Mix:
    """Pages per guest of each kind, in layout order (the mkimages.py convention)."""

    common: int = 4096  # identical in every guest
    zero: int = 1024  # all zeros
    unique: int = 1024  # random, private to the guest
    intra: int = 2048  # drawn from ``intra_distinct`` contents private to the guest
    intra_distinct: int = 64

    @property
    def pages(self) -> int:
        return self.common + self.zero + self.unique + self.intra


MIXES: dict[str, Mix] = {
    "default": Mix(),
    "zero-heavy": Mix(common=1024, zero=4096, unique=1024, intra=1024, intra_distinct=16),
    "mostly-unique": Mix(common=512, zero=256, unique=6144, intra=1280, intra_distinct=320),
    "one-content": Mix(common=0, zero=0, unique=0, intra=8192, intra_distinct=1),
}


def write_mix(outdir: str, guests: int, mix: Mix, seed: int = 1) -> list[str]:
    """Write one image per guest into ``outdir``; return their paths."""
    os.makedirs(outdir, exist_ok=True)
    common = np.random.default_rng(seed).integers(0, 256, size=(mix.common, PAGE_SIZE), dtype=np.uint8)
    paths = []
    for g in range(guests):
        rng = np.random.default_rng(seed * 1000 + g + 1)
        distinct = rng.integers(0, 256, size=(max(1, mix.intra_distinct), PAGE_SIZE), dtype=np.uint8)
        parts = [common, np.zeros((mix.zero, PAGE_SIZE), np.uint8),
                 rng.integers(0, 256, size=(mix.unique, PAGE_SIZE), dtype=np.uint8),
                 distinct[rng.integers(0, max(1, mix.intra_distinct), size=mix.intra)]]
        path = os.path.join(outdir, f"guest{g}.img")
        np.concatenate(parts).tofile(path)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Ideal:
    """What an ideal merger reaches on a set of images."""

    pages: int
    distinct: int
    zero_pages: int
    pages_shared: int  # with max_page_sharing
    pages_sharing: int
    pages_shared_zero: int  # the same with use_zero_pages: zero pages leave both counts
    pages_sharing_zero: int
    max_page_sharing: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def page_digests(chunk: np.ndarray) -> list[bytes]:
    """16-byte digests of the rows of a (pages, 4096) uint8 array."""
    h = xxhash.xxh3_128_digest
    return [h(row) for row in chunk]


def iter_chunks(paths: Iterable[str]) -> Iterable[np.ndarray]:
    """The pages of every image, ``_CHUNK_PAGES`` at a time, as (n, 4096) uint8 arrays."""
    for path in paths:
        with open(path, "rb") as f:
            while True:
                data = f.read(_CHUNK_PAGES * PAGE_SIZE)
                if not data:
                    break
                if len(data) % PAGE_SIZE:
                    raise UsageError(f"image {path!r}: size is not a multiple of {PAGE_SIZE}")
                yield np.frombuffer(data, np.uint8).reshape(-1, PAGE_SIZE)


def ideal(paths: Sequence[str], max_page_sharing: int = 256) -> Ideal:
    """Count the ideal dedup of ``paths`` by content (a 128-bit digest per page)."""
    if max_page_sharing < 2:
        raise UsageError(f"max_page_sharing must be at least 2, not {max_page_sharing}")
    counts: Counter[bytes] = Counter()
    for chunk in iter_chunks(paths):
        counts.update(page_digests(chunk))
    zero_key = xxhash.xxh3_128_digest(_ZERO_PAGE)
    return from_counts(counts, counts.get(zero_key, 0), zero_key, max_page_sharing)


def from_counts(counts: Counter[bytes], zero_pages: int, zero_key: bytes, m: int) -> Ideal:
    """The ideal from per-content counts; the cap splits a content of n pages into ceil(n/m) KSM pages."""
    shared = sharing = 0
    for n in counts.values():
        if n > 1:
            k = -(-n // m)
            # A last dup of one page cannot pair: it stays unshared (the selftest's N % M == 1).
            if n % m == 1:
                k -= 1
            shared += k
            sharing += n - k - (1 if n % m == 1 else 0)
    zshared = zsharing = 0
    if zero_pages > 1:
        zshared = -(-zero_pages // m) - (1 if zero_pages % m == 1 else 0)
        zsharing = zero_pages - zshared - (1 if zero_pages % m == 1 else 0)
    return Ideal(pages=sum(counts.values()), distinct=len(counts), zero_pages=zero_pages,
                 pages_shared=shared, pages_sharing=sharing,
                 pages_shared_zero=shared - zshared, pages_sharing_zero=sharing - zsharing,
                 max_page_sharing=m)
