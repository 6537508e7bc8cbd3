"""Memory images: synthetic mixes for experiments, and the ideal dedup of any set of images.

A raw image is a file of 4096-byte pages.  :func:`write_mix` writes one image
per guest with a known mix of page kinds; :func:`ideal` counts, by brute
force, what an ideal merger would reach on a set of images — the figures KSM
converges to: pages_shared and pages_sharing under a max_page_sharing cap,
and the pages of zeros (ksm_zero_pages with use_zero_pages).  It streams the
images a chunk at a time and keeps a 16-byte digest per page.  Images are raw
files or ELF core files (gdb's ``gcore``, QEMU's ``dump-guest-memory``), whose
PT_LOAD segments are the memory.

Which one a file is, its ``format`` says: ``auto`` takes an ELF file of type
ET_CORE as a core and anything else whose size is a multiple of 4096 as raw
memory (a raw dump of a process or of mapped libraries begins with an ELF
header, and is still raw); ``core`` insists on a core; ``raw`` never parses.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import xxhash

from .._mm.frames import PAGE_SIZE
from ..errors import UsageError

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


class ImageError(UsageError):
    """An image that cannot be read as guest memory."""


_ELF_MAGIC = b"\x7fELF"
_ET_CORE = 4
FORMATS: Final = ("auto", "raw", "core")


def _elf_type(head: bytes) -> int | None:
    """e_type of an ELF header's first 18 bytes (in the byte order EI_DATA names), None if not ELF."""
    if len(head) < 18 or not head.startswith(_ELF_MAGIC):
        return None
    return int.from_bytes(head[16:18], "big" if head[5] == 2 else "little")


def _elf_segments(path: str) -> list[tuple[int, int]]:
    """(file offset, bytes) of the PT_LOAD segments of an ELF core file."""
    try:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
    except ImportError:  # pragma: no cover - pyelftools is a dependency
        raise ImageError(f"image {path!r} is an ELF file, and reading one needs pyelftools") from None
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if elf.header["e_type"] != "ET_CORE":
                raise ImageError(f"image {path!r}: an ELF {elf.header['e_type']} file, not a core dump")
            size = os.path.getsize(path)
            out = []
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_LOAD" or not seg["p_filesz"]:
                    continue
                if seg["p_offset"] + seg["p_filesz"] > size:
                    raise ImageError(f"image {path!r}: corrupt ELF core: "
                                     "a PT_LOAD segment runs past the end of the file")
                out.append((seg["p_offset"], seg["p_filesz"]))
            return out
    except ELFError as exc:
        raise ImageError(f"image {path!r}: corrupt ELF core: {exc}") from None
    except (ValueError, KeyError, AssertionError, Exception) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"image {path!r}: corrupt ELF core: {type(exc).__name__}: {exc}") from None


def image_layout(path: str, format: str = "auto") -> list[tuple[int, int]]:
    """(file offset, bytes) of the guest memory in ``path``: a raw file, or an ELF core's PT_LOAD segments.

    ``format`` is ``auto``, ``raw`` or ``core`` (see the module's text).
    ImageError for a missing or unreadable file, an empty one, a raw file
    whose size is not a multiple of 4096, or a corrupt ELF core.
    """
    if format not in FORMATS:
        raise ImageError(f"image format must be one of {', '.join(FORMATS)}, not {format!r}")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(18)
    except OSError as exc:
        raise ImageError(f"image {path!r}: {exc.strerror or exc}") from None
    e_type = _elf_type(head)
    if format == "core" or (format == "auto" and e_type == _ET_CORE):
        if not head.startswith(_ELF_MAGIC):
            raise ImageError(f"image {path!r}: not an ELF file, so not a core dump")
        segments = _elf_segments(path)
        if not segments:
            raise ImageError(f"image {path!r}: an ELF core with no memory (no PT_LOAD data)")
        return segments
    if size == 0 or size % PAGE_SIZE:
        what = f"raw memory, and an ELF file of e_type {e_type}, not a core dump" if e_type is not None else \
            "raw memory (nor an ELF core file)"
        raise ImageError(f"image {path!r}: size {size} is not a positive multiple of {PAGE_SIZE}, as for {what}")
    return [(0, size)]


def image_pages(path: str, format: str = "auto") -> int:
    """Pages of guest memory in an image (a partial last page of a segment counts as one)."""
    return sum(-(-n // PAGE_SIZE) for _, n in image_layout(path, format))


def iter_chunks(paths: Iterable[str], chunk_pages: int = _CHUNK_PAGES, format: str = "auto") -> Iterable[np.ndarray]:
    """The pages of every image, ``chunk_pages`` at a time, as (n, 4096) uint8 arrays."""
    for path in paths:
        layout = image_layout(path, format)
        with open(path, "rb") as f:
            for offset, length in layout:
                f.seek(offset)
                left = length
                while left > 0:
                    want = min(left, chunk_pages * PAGE_SIZE)
                    # Ask the kernel to read the next chunks while this one is hashed.
                    with contextlib.suppress(OSError, AttributeError):
                        os.posix_fadvise(f.fileno(), f.tell() + want, 4 * want, os.POSIX_FADV_WILLNEED)
                    data = f.read(want)
                    if len(data) < want:
                        raise ImageError(f"image {path!r}: truncated while reading")
                    left -= want
                    if len(data) % PAGE_SIZE:
                        data += bytes(PAGE_SIZE - len(data) % PAGE_SIZE)
                    yield np.frombuffer(data, np.uint8).reshape(-1, PAGE_SIZE)


def digests(chunk: np.ndarray) -> npt.NDArray[np.uint64]:
    """A 128-bit xxh3 digest of every page of a (pages, 4096) uint8 array, as (pages, 2) uint64."""
    h = xxhash.xxh3_128_digest
    return np.frombuffer(b"".join([h(row) for row in chunk]), np.uint64).reshape(-1, 2)


def content_counts(paths: Sequence[str], format: str = "auto",
                   ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """Every distinct page digest of ``paths`` and how many pages have it.

    Streams the images; keeps 16 bytes a page (the digests), not the pages.
    """
    parts = [digests(chunk) for chunk in iter_chunks(paths, format=format)]
    return count_digests(np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64))


def count_digests(d: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """Distinct rows of a (n, 2) digest array, with their counts."""
    if not len(d):
        return d, np.zeros(0, np.int64)
    order = np.lexsort((d[:, 1], d[:, 0]))
    d = d[order]
    new = np.ones(len(d), np.bool_)
    new[1:] = (d[1:] != d[:-1]).any(axis=1)
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(d)))
    return d[starts], counts


def merge_counts(parts: Iterable[tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]]
                 ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """Combine (digests, counts) of several image sets into one."""
    parts = list(parts)
    if not parts:
        return np.zeros((0, 2), np.uint64), np.zeros(0, np.int64)
    d = np.concatenate([p[0] for p in parts])
    c = np.concatenate([p[1] for p in parts])
    if not len(d):
        return d, c
    order = np.lexsort((d[:, 1], d[:, 0]))
    d, c = d[order], c[order]
    new = np.ones(len(d), np.bool_)
    new[1:] = (d[1:] != d[:-1]).any(axis=1)
    starts = np.flatnonzero(new)
    return d[starts], np.add.reduceat(c, starts)


ZERO_DIGEST: Final = np.frombuffer(xxhash.xxh3_128_digest(bytes(PAGE_SIZE)), np.uint64)


def ideal(paths: Sequence[str], max_page_sharing: int = 256, format: str = "auto") -> Ideal:
    """Count the ideal dedup of ``paths`` by content (a 128-bit digest per page); ``format`` as image_layout's."""
    if max_page_sharing < 2:
        raise UsageError(f"max_page_sharing must be at least 2, not {max_page_sharing}")
    return ideal_from_counts(*content_counts(paths, format), max_page_sharing)


def ideal_from_counts(uniq: npt.NDArray[np.uint64], counts: npt.NDArray[np.int64], m: int) -> Ideal:
    """The ideal from per-content counts.

    A content of n pages takes ceil(n/m) KSM pages, except that a last dup of
    a single page cannot pair and stays unshared (the selftest's N % M == 1).
    """
    zero_rows = (uniq == ZERO_DIGEST).all(axis=1) if len(uniq) else np.zeros(0, np.bool_)
    zero_pages = int(counts[zero_rows].sum()) if zero_rows.any() else 0

    def shared_sharing(n: npt.NDArray[np.int64]) -> tuple[int, int]:
        n = n[n > 1]
        lone = (n % m) == 1
        k = -(-n // m) - lone
        return int(k.sum()), int((n - k - lone).sum())

    shared, sharing = shared_sharing(counts)
    zshared, zsharing = shared_sharing(counts[zero_rows])
    return Ideal(pages=int(counts.sum()), distinct=len(counts), zero_pages=zero_pages,
                 pages_shared=shared, pages_sharing=sharing,
                 pages_shared_zero=shared - zshared, pages_sharing_zero=sharing - zsharing,
                 max_page_sharing=m)
