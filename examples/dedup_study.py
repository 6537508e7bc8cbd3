"""A dedup-ratio study of memory images: the ideal count, then ksmd reaching it.

Give it raw images (pages of 4096 bytes) or ELF core files (gcore of a
process, QEMU's dump-guest-memory); with no arguments it writes a synthetic
set.  It prints the ideal dedup for several max_page_sharing values, then runs
ksmd on the images and shows how fast it gets there.

    python examples/dedup_study.py [IMAGE ...]
"""

import sys
import tempfile

from shmksm.tool.images import MIXES, ideal, write_mix
from shmksm.tool.runner import run_images


def study(paths):
    for m in (2, 16, 256):
        best = ideal(paths, max_page_sharing=m)
        ratio = best.pages / max(1, best.pages - best.pages_sharing)
        print(f"max_page_sharing {m:>4}: pages_shared {best.pages_shared:>6}, pages_sharing {best.pages_sharing:>6}, "
              f"dedup ratio {ratio:.2f}:1")
    report = run_images(paths, knobs={"pages_to_scan": 2000, "sleep_millisecs": 0})
    c, k = report["converged"], report["ksm"]
    print(f"ksmd: pages_shared {k['pages_shared']}, pages_sharing {k['pages_sharing']} "
          f"at full scan {c['full_scans']}, {c['seconds']} s, {c['ksmd_cpu_seconds']} scanner CPU-s")


if __name__ == "__main__":
    if sys.argv[1:]:
        study(sys.argv[1:])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            study(write_mix(tmp, guests=4, mix=MIXES["default"]))
