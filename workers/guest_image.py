"""Guest entry point: load a raw memory image into the guest's address space.

The image is a raw file of 4096-byte pages or an ELF core file.  The guest writes it a chunk of
pages at a time (demand paging allocates a frame for each page, a run of 512 at once), optionally
marks the whole address space MADV_MERGEABLE, and returns the number of pages loaded.
"""

from __future__ import annotations

from shmksm import MADV_MERGEABLE, PAGE_SIZE, GuestView
from shmksm.tool.images import iter_chunks


def load_image(view: GuestView, path: str, mergeable: bool = True, format: str = "auto") -> int:
    """Copy the memory of the image at ``path`` into ``view`` from address 0; return pages loaded.

    Raw images are copied whole; ELF core files, their PT_LOAD segments one
    after the other; ``format`` (auto, raw, core) says which ``path`` is.
    """
    page = 0
    for chunk in iter_chunks([path], 1024, format):
        view.write(page * PAGE_SIZE, chunk)
        page += len(chunk)
    if mergeable and page:
        view.madvise(0, page * PAGE_SIZE, MADV_MERGEABLE)
    return page
