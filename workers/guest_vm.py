"""Guest entry point: a VM-like workload for demos.

The address space is laid out like a small virtual machine's memory:

    kernel   the "kernel and shared libraries": identical in every guest
    cache    page cache: files drawn from a pool that all guests read from
    zero     memory the guest cleared: pages of zeros
    heap     private anonymous memory: unique to this guest
    churn    a region the workload keeps rewriting: volatile pages

It loads that image, marks it mergeable, then keeps rewriting random pages
of ``churn`` and a few of ``cache`` (which breaks copy-on-write of merged
pages) until ``seconds`` pass, verifying a sample of what it reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from shmksm import MADV_MERGEABLE, PAGE_SIZE, GuestView

# Fractions of the address space, in layout order.
LAYOUT = (("kernel", 0.30), ("cache", 0.20), ("zero", 0.15), ("heap", 0.25), ("churn", 0.10))
_CACHE_POOL = 4  # the shared file pool is this many times one guest's cache region


@dataclass(frozen=True)
class Region:
    name: str
    start: int  # first page
    pages: int


def layout(pages: int) -> list[Region]:
    """The regions of a guest of ``pages`` pages."""
    out, start = [], 0
    for i, (name, share) in enumerate(LAYOUT):
        n = pages - start if i == len(LAYOUT) - 1 else int(pages * share)
        out.append(Region(name, start, n))
        start += n
    return out


def _page_of(seed: int, index: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).integers(0, 256, PAGE_SIZE, dtype=np.uint8)


def run_vm(view: GuestView, guest_index: int, seconds: float, seed: int = 7) -> dict[str, int]:
    """Load the VM image, then churn for ``seconds``; return what was done."""
    regions = {r.name: r for r in layout(view.pages)}
    rng = np.random.default_rng([seed, guest_index])
    kernel = regions["kernel"]
    # Each region in one write: its page-table runs faulted in together, its bytes scattered by numpy.
    base = np.random.default_rng([seed, 0]).integers(0, 256, (kernel.pages, PAGE_SIZE), dtype=np.uint8)
    view.write(kernel.start * PAGE_SIZE, base)
    cache = regions["cache"]
    pool_size = max(1, cache.pages * _CACHE_POOL // 4)
    files = rng.integers(0, pool_size, cache.pages)
    view.write(cache.start * PAGE_SIZE, np.array([_page_of(seed + 1, f) for f in files.tolist()], np.uint8))
    zero = regions["zero"]
    view.write(zero.start * PAGE_SIZE, np.zeros((zero.pages, PAGE_SIZE), np.uint8))  # memory the guest kernel cleared
    heap = regions["heap"]
    view.write(heap.start * PAGE_SIZE, rng.integers(0, 256, (heap.pages, PAGE_SIZE), dtype=np.uint8))
    churn = regions["churn"]
    view.write(churn.start * PAGE_SIZE, rng.integers(0, 256, (churn.pages, PAGE_SIZE), dtype=np.uint8))
    view.madvise(0, view.pages * PAGE_SIZE, MADV_MERGEABLE)

    writes = cache_writes = mismatches = 0
    deadline = time.monotonic() + seconds
    stamp = np.zeros(64, np.uint8)
    while time.monotonic() < deadline:
        page = churn.start + int(rng.integers(0, churn.pages))
        stamp[:] = writes & 0xFF
        view.write(page * PAGE_SIZE, stamp)
        writes += 1
        if view.read(page * PAGE_SIZE, 64) != stamp.tobytes():
            mismatches += 1
        if writes % 50 == 0:
            # Rewrite a cached file page with its own content: breaks COW, content unchanged.
            i = int(rng.integers(0, cache.pages))
            view.write((cache.start + i) * PAGE_SIZE, _page_of(seed + 1, int(files[i])))
            cache_writes += 1
        time.sleep(0.0005)
    return {"writes": writes, "cache_writes": cache_writes, "mismatches": mismatches}
