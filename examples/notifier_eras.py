"""The notifier eras side by side: what change_pte was for, and how it silently stopped working.

The same workload runs under each era: two guests with duplicate pages, two
shadow workers (secondary MMUs, like KVM's) that read every page, ksmd
merging, then copy-on-write breaks.  The 2009 change_pte updates the shadow
entries in place; from 2012 it is bracketed by invalidate_range_start/end and
finds nothing left to update, so the shadow faults exactly as if there were
no change_pte at all (2024).

    python examples/notifier_eras.py
"""

from shmksm.tool.experiments import notifier_experiment

if __name__ == "__main__":
    result = notifier_experiment(guests=2, pages=512, shadows=2)
    print(f"{'era':<10}{'shadow faults':>14}{'updated in place':>18}{'messages':>10}{'lag p99 (us)':>14}")
    for era, r in result["eras"].items():
        print(f"{era:<10}{r['shadow_faults']:>14}{r['updated_in_place']:>18}{r['messages']:>10}{r['lag_p99_us']:>14}")
    e = result["eras"]
    if e["2012"]["shadow_faults"] == e["2024"]["shadow_faults"] and e["2009"]["shadow_faults"] == 0:
        print("\n2009: no faults; 2012: as many faults as without change_pte — the 2021 finding, reproduced.")
