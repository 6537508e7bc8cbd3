"""Overcommit: more guest memory than the machine has frames, which fits only because of merging.

Eight guests of 4 MiB each boot the same "image" (identical pages) into a
machine of 12 MiB of frames.  Each guest loads its memory in two halves; ksmd
merges the first half before the second is written, so the frames freed by
merging make room for it.  Without ksmd, the last guests would run out of
frames (shmksm.OutOfFrames, a MemoryError).

    python examples/overcommit.py
"""

import numpy as np

import shmksm

PAGES = 1024  # 4 MiB per guest
GUESTS = 8
FRAMES = 3072  # 12 MiB: room for three guests' worth of private pages


def boot(view, half):
    """Write one half of the same guest image that every guest boots."""
    image = np.random.default_rng(42).integers(0, 256, (PAGES, shmksm.PAGE_SIZE), dtype=np.uint8)
    start = 0 if half == 0 else PAGES // 2
    for page in range(start, start + PAGES // 2):
        view.write(page * shmksm.PAGE_SIZE, image[page])
    view.set_memory_merge(True)  # prctl(PR_SET_MEMORY_MERGE)


if __name__ == "__main__":
    with shmksm.Machine(frames=FRAMES, overcommit=True, pages_to_scan=4000, sleep_millisecs=0) as machine:
        machine.ksm.run = 1
        guests = [machine.add_guest(pages=PAGES) for _ in range(GUESTS)]
        for half in (0, 1):
            for guest in guests:
                machine.spawn(boot, guest, half).join()
                machine.wait_full_scans(2)  # let ksmd merge what was just written
                machine.reclaim()
        machine.wait_full_scans(2)
        c = machine.ksm.counters()
        used = machine.frames - 1 - machine.free_frames()
        print(f"{GUESTS} guests x {PAGES * 4 // 1024} MiB = {GUESTS * PAGES * 4 // 1024} MiB of guest memory "
              f"in a machine of {FRAMES * 4 // 1024} MiB")
        print(f"frames in use: {used} of {FRAMES - 1}; pages_shared {c['pages_shared']}, "
              f"pages_sharing {c['pages_sharing']}")
        machine.check()
