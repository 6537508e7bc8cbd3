"""The notifier eras side by side: what change_pte was for, and how it silently stopped working.

The same workload runs under each era: two guests with duplicate pages, two
shadow workers (secondary MMUs, like KVM's) that read every page, ksmd
merging, then copy-on-write breaks.  The 2009 change_pte repoints the entries
of merged pages in place (a read-only PTE), while KVM dropped those of copied
pages (a writable PTE): it saved the merges' faults, never the copy-on-write
ones.  From 2012 it is bracketed by invalidate_range_start/end and finds
nothing left to update, so the shadows fault exactly as if there were no
change_pte at all (2024).

    python examples/notifier_eras.py
"""

from shmksm.tool.experiments import notifier_experiment

if __name__ == "__main__":
    result = notifier_experiment(guests=2, pages=512, shadows=2, sync=False)
    print(f"{'era':<10}{'merge faults':>13}{'cow faults':>11}{'updated in place':>18}{'messages':>10}"
          f"{'lag p99 (us)':>14}")
    for era, r in result["eras"].items():
        print(f"{era:<10}{r['merge_faults']:>13}{r['cow_faults']:>11}{r['updated_in_place']:>18}"
              f"{r['messages']:>10}{r['lag_p99_us']:>14}")
    e = result["eras"]
    if (e["2012"]["shadow_faults"] == e["2024"]["shadow_faults"] and e["2009"]["merge_faults"] == 0
            and e["2009"]["cow_faults"] == e["2024"]["cow_faults"]):
        print("\n2009: no fault for a merge, one for each copy-on-write; 2012: as many faults as without"
              " change_pte — the 2021 finding, reproduced.")
