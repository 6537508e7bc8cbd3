"""A copy-on-write storm: every guest writes into pages that ksmd just merged.

Four guests hold the same 2,048 pages; ksmd merges them into KSM pages
shared by all four; then every guest rewrites all of them at once.  Each
first write into a merged page takes a copy-on-write fault: a new frame, a
copy, a remap (the kernel counts these as cow_ksm).  The script measures the
write time into merged pages against writes into the same pages once they
are private again, and checks that no guest ever saw another's data.

    python examples/cow_storm.py
"""

import time

import numpy as np

import shmksm

PAGES = 2048
GUESTS = 4


def fill(view):
    content = np.random.default_rng(7).integers(0, 256, (PAGES, shmksm.PAGE_SIZE), dtype=np.uint8)
    for page in range(PAGES):
        view.write(page * shmksm.PAGE_SIZE, content[page])
    view.madvise(0, view.size, shmksm.MADV_MERGEABLE)


def storm(view, tag):
    """Write 8 bytes into every page twice: first into KSM pages (COW), then into private pages."""
    stamp = np.full(8, tag, np.uint8)
    timings = []
    for _ in range(2):
        t0 = time.perf_counter()
        for page in range(PAGES):
            view.write(page * shmksm.PAGE_SIZE, stamp)
        timings.append((time.perf_counter() - t0) / PAGES)
    wrong = sum(view.read(p * shmksm.PAGE_SIZE, 8) != stamp.tobytes() for p in range(PAGES))
    return timings, wrong


if __name__ == "__main__":
    with shmksm.Machine(frames=GUESTS * PAGES * 2, pages_to_scan=8000, sleep_millisecs=0) as machine:
        guests = [machine.add_guest(pages=PAGES) for _ in range(GUESTS)]
        for g in guests:
            machine.spawn(fill, g).join()
        machine.ksm.run = 1
        machine.wait_full_scans(3)
        machine.ksm.run = 0
        before = machine.ksm.counters()
        print(f"merged: pages_shared {before['pages_shared']}, pages_sharing {before['pages_sharing']}")
        cow0 = machine.vmstat()["cow_ksm"]
        workers = [machine.spawn(storm, g, i + 1) for i, g in enumerate(guests)]
        results = [w.join() for w in workers]
        cows = machine.vmstat()["cow_ksm"] - cow0
        merged_us = np.mean([r[0][0] for r in results]) * 1e6
        private_us = np.mean([r[0][1] for r in results]) * 1e6
        print(f"{cows} copy-on-write breaks of KSM pages (cow_ksm)")
        print(f"8-byte write into a merged page: {merged_us:.2f} us; into a private page: {private_us:.2f} us "
              f"({merged_us / private_us:.1f}x)")
        print(f"pages that read back wrong: {sum(r[1] for r in results)}")
        machine.check()
