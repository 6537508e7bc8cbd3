"""Guest entry point: load a raw memory image into the guest's address space.

The image is a file of 4096-byte pages.  The guest writes it page by page
(demand paging allocates a frame for each), optionally marks the whole
address space MADV_MERGEABLE, and returns the number of pages loaded.
"""

from __future__ import annotations

import os

import numpy as np

from shmksm import MADV_MERGEABLE, PAGE_SIZE, GuestView

_CHUNK_PAGES = 1024


def load_image(view: GuestView, path: str, mergeable: bool = True) -> int:
    """Copy the image at ``path`` into ``view`` from address 0; return pages loaded."""
    size = os.path.getsize(path)
    pages = size // PAGE_SIZE
    with open(path, "rb") as f:
        for start in range(0, pages, _CHUNK_PAGES):
            count = min(_CHUNK_PAGES, pages - start)
            chunk = np.fromfile(f, dtype=np.uint8, count=count * PAGE_SIZE).reshape(count, PAGE_SIZE)
            for i in range(count):
                view.write((start + i) * PAGE_SIZE, chunk[i])
    if mergeable and pages:
        view.madvise(0, pages * PAGE_SIZE, MADV_MERGEABLE)
    return pages
