"""The control segment: knobs, counters, allocator heads and process tables.

The segment is one array of int64 words, shared by every process of a machine.
It is organized as follows (word offsets)::

    [0, NFIELDS)                      named fields, see FIELDS below
    [PART_BASE, +2*MAX_PARTICIPANTS)  reclamation participants: (pid, acked epoch)
    [GUEST_BASE, +4*MAX_GUESTS)       guest table: (state, pages, generation, merge_any)
    [NODE_BASE, +8*MAX_NODES)         NUMA nodes: free list head and count, numastat counters
    [SCANNER_BASE, +16*MAX_SCANNERS)  each scanner's own words (SCANNER_FIELDS), summed into the named ones
    [FAULT_BASE, +8*FAULT_SLOTS)      fault-injection points (shmksm._mm.faults)
    [DEFERRED_BASE, +DEFERRED_SLOTS)  deferred puts: a ring of pfns (frames.Frames.defer_put)
    [LOAD_BASE, +MAX_SCANNERS**2)     parallel scanners' loads: row h, pages scanner h hashed this
                                      pass, by the scanner that owns their content (_ksm.claims)
    [PASS_LOAD_BASE, +MAX_SCANNERS**2) the same rows as of each scanner's last full pass

A knob has exactly one writer at a time (the host, under the stat lock) and
is read without a lock: a word-sized store is atomic on every platform numpy
runs on.  The KSM counters are written by the scanner alone.
"""

from __future__ import annotations

from typing import Final

# Knobs of /sys/kernel/mm/ksm with the kernel's defaults.
KNOB_DEFAULTS: Final[dict[str, int]] = {
    "run": 0,
    "pages_to_scan": 100,
    "sleep_millisecs": 20,
    "max_page_sharing": 256,
    "use_zero_pages": 0,
    "merge_across_nodes": 1,
    "smart_scan": 1,
    "stable_node_chains_prune_millisecs": 2000,
    "advisor_mode": 0,  # 0 = "none", 1 = "scan-time"
    "advisor_target_scan_time": 200,
    "advisor_max_cpu": 70,
    "advisor_min_pages_to_scan": 500,
    "advisor_max_pages_to_scan": 30000,
    # shmksm's own, not the kernel's: ksmd processes scanning in parallel.
    "scanners": 1,
    # shmksm's own: the defence against the deduplication timing side channel,
    # an index into MITIGATIONS.  "none": the kernel's KSM.  "vusion": every
    # page the scanner considers loses write access, so a write to it faults
    # and copies as a write to a KSM page does: merged and unmerged pages
    # behave the same.  "domains": merge only within a guest's security
    # domain; across domains, only empty pages.
    "mitigation": 0,
}
# Knobs the kernel does not have: not shown as /sys/kernel/mm/ksm files.
OWN_KNOBS: Final = ("scanners", "mitigation")
ADVISOR_MODES: Final = ("none", "scan-time")
MITIGATIONS: Final = ("none", "vusion", "domains")
MITIGATION_NONE: Final = 0
MITIGATION_VUSION: Final = 1
MITIGATION_DOMAINS: Final = 2
# Knobs whose values are words: the word of each stored number, in order.
WORD_KNOBS: Final[dict[str, tuple[str, ...]]] = {"advisor_mode": ADVISOR_MODES, "mitigation": MITIGATIONS}

# Counters of /sys/kernel/mm/ksm, written by the scanner.
COUNTERS: Final = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
    "general_profit",
)

# Counters of /proc/vmstat that the emulation keeps (machine.vmstat()).
VMSTAT: Final = ("cow_ksm",)

_INTERNAL: Final = (
    "rmap_items",  # the scanner's rmap items, for pages_volatile and general_profit
    "cow_ksm",  # copies made by writes into KSM pages (the kernel's vmstat cow_ksm)
    "cow_faults",  # copies made by writes into private write-protected pages (mitigation vusion)
    "free_count",  # allocator: free frames of every node (each node's list is in the node area)
    "wait_head",  # frames dropped but maybe still reachable by a participant
    "wait_tail",
    "wait_count",
    "epoch",  # reclamation epoch, bumped by every reclaim pass
    "scanner_pid",
    "scanner_batches",  # batches done: a heartbeat
    "scanner_cpu_ns",  # the scanner's CPU time since its first batch
    "scanner_startup_ns",  # the scanner's start-up: spawned to ready to scan
    "scanner_rss_kb",  # the peak of the scanner's private resident memory (RssAnon), sampled
    "notifier_era",
    "scanner_stop",  # the host asks the scanner to exit
    "scanner_unmerges",  # run=2 passes the scanner finished
    # The full scan (1-based) during which pages_shared, pages_sharing or
    # ksm_zero_pages last changed, as the scanner saw it after each batch.
    "scanner_settled_scan",
    "nodes",  # emulated NUMA nodes the frame pool is split into (fixed at creation)
    "explain_request",  # a request for ksmd's rmap items' states: requester pid << 20 | number (_ksm.explain)
    "explain_answer",  # scanner 0's last answer; a request is answered when every scanner's entry says so
    "faults_armed",  # fault-injection points armed (shmksm._mm.faults): 0 costs one test per point
    # The ring of deferred puts: positions ever queued and ever done (the
    # entries between them are pending), under the allocator lock.
    "deferred_head",
    "deferred_tail",
    # 1 once KSM has mapped the zero page anywhere (use_zero_pages), set before
    # the first such PTE: until then ksm_zero_pages is 0 without reading a PTE.
    "ksm_zero_used",
)

FIELDS: Final[tuple[str, ...]] = tuple(KNOB_DEFAULTS) + COUNTERS + _INTERNAL
INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(FIELDS)}

MAX_PARTICIPANTS: Final = 32
MAX_SCANNERS: Final = 16
MAX_NODES: Final = 16
MAX_GUESTS: Final = 64
PART_BASE: Final = 128
GUEST_BASE: Final = PART_BASE + 2 * MAX_PARTICIPANTS
GUEST_WORDS: Final = 4
# The words of a guest's entry.
G_STATE: Final = 0
G_PAGES: Final = 1
G_GENERATION: Final = 2  # bumped by every guest made in the slot: workers' cached page tables know theirs
G_MERGE_ANY: Final = 3
NODE_BASE: Final = GUEST_BASE + GUEST_WORDS * MAX_GUESTS
NODE_WORDS: Final = 8
# The words of a node's entry: its free list, and its numastat counters
# (/sys/devices/system/node/nodeN/numastat), kept by the allocator.
N_FREE_HEAD: Final = 0  # first free frame of the node, -1 if none
N_FREE_COUNT: Final = 1
N_NUMA_HIT: Final = 2  # frames allocated here for a guest of this node
N_NUMA_MISS: Final = 3  # frames allocated here for a guest of another node (its node had none)
N_NUMA_FOREIGN: Final = 4  # frames a guest of this node got from another node
N_LOCAL_NODE: Final = 5  # frames allocated here by a process running on this node
N_OTHER_NODE: Final = 6  # frames allocated here by a process running on another node
NUMASTAT: Final = {"numa_hit": N_NUMA_HIT, "numa_miss": N_NUMA_MISS, "numa_foreign": N_NUMA_FOREIGN,
                   "local_node": N_LOCAL_NODE, "other_node": N_OTHER_NODE}
SCANNER_BASE: Final = NODE_BASE + NODE_WORDS * MAX_NODES
# Each scanner process writes these words of its own entry; after every batch
# it folds every entry into the named word of the same name, under the stat
# lock: a sum, except as SCANNER_FOLD says.
SCANNER_FIELDS: Final = (
    "scanner_pid", "scanner_batches", "scanner_cpu_ns", "scanner_startup_ns", "scanner_rss_kb",
    "scanner_unmerges", "scanner_settled_scan", "full_scans", "pages_shared", "pages_sharing",
    "pages_unshared", "pages_scanned", "pages_skipped", "stable_node_chains", "stable_node_dups", "rmap_items",
    "explain_answer",  # the explain request this scanner answered last (its own entry's word is the answer)
)
SCANNER_WORDS: Final = len(SCANNER_FIELDS)
SCANNER_INDEX: Final = {name: i for i, name in enumerate(SCANNER_FIELDS)}
SCANNER_FOLD: Final = {
    "scanner_pid": "first",  # scanner 0's
    "scanner_startup_ns": "max",
    "scanner_unmerges": "min",  # a run=2 is done once every scanner has unmerged
    "scanner_settled_scan": "max",  # the counters settle when the last scanner's do
    "full_scans": "min",  # a full scan is done once every scanner has done it
    "explain_answer": "first",
}
FAULT_BASE: Final = SCANNER_BASE + SCANNER_WORDS * MAX_SCANNERS


def scanner_word(index: int, name: str) -> int:
    """The control word ``name`` (of SCANNER_FIELDS) in the entry of scanner ``index``."""
    return SCANNER_BASE + SCANNER_WORDS * index + SCANNER_INDEX[name]


FAULT_SLOTS: Final = 8
FAULT_WORDS: Final = 8
DEFERRED_BASE: Final = FAULT_BASE + FAULT_SLOTS * FAULT_WORDS
DEFERRED_SLOTS: Final = 4096  # a power of two: positions wrap with DEFERRED_MASK
DEFERRED_MASK: Final = DEFERRED_SLOTS - 1
LOAD_BASE: Final = DEFERRED_BASE + DEFERRED_SLOTS
PASS_LOAD_BASE: Final = LOAD_BASE + MAX_SCANNERS * MAX_SCANNERS
WORDS: Final = PASS_LOAD_BASE + MAX_SCANNERS * MAX_SCANNERS

# Guest table states.
GUEST_FREE: Final = 0
GUEST_LIVE: Final = 1
GUEST_GONE: Final = 2  # torn down; reused once no slot is free, by the next generation

assert len(FIELDS) <= PART_BASE
