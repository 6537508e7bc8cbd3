"""ksmd: the scanner that finds identical pages and merges them.

DOC: Overview (after mm/ksm.c)
------------------------------
The scanner walks the mergeable pages of every guest, round robin over the
guests ("mm slots"), ``pages_to_scan`` pages per batch, sleeping
``sleep_millisecs`` between batches.  For each page it runs
:meth:`Scanner.cmp_and_merge_page`, which uses two trees:

* the **stable tree** holds KSM pages: merged, write-protected, never changing,
  so a lookup by content is always right.  It is never emptied;
* the **unstable tree** holds pages that did not change since the previous
  visit, as candidates.  Their content may change at any time, so the tree is
  only a hint; it is emptied at the start of every full scan and rebuilt.

Three techniques keep the unstable tree useful, as in the kernel: a page
enters it only if its checksum did not change since the previous visit (so a
new page needs two visits: merging happens on the second full scan); it is
rebuilt every full scan; and nothing is merged before a full byte comparison
under the page-table lock (:mod:`shmksm.ksm`).

What is emulated, and how
-------------------------
* Trees keyed by content: both trees are keyed by a 64-bit xxh3 checksum of
  the page instead of by memcmp order (the rmap item keeps its low 32 bits,
  the kernel's ``oldchecksum``, to see whether the page changed).  A key is
  only a hint, exactly as a tree position is: every merge compares the bytes.
  Two different contents with one key (an xxh3 collision) can only cost a
  missed merge.  A batch's keys are taken in one call (:mod:`.checksum`:
  xxhash's own XXH3_64bits from the C extension, frames prefetched).
* The rmap items are per-guest numpy arrays (state, checksum, stable node,
  smart-scan age and skips): ``RMAP_ITEM_BYTES`` bytes per page.
* Stable node chains: one content with more than ``max_page_sharing``
  mappings gets several KSM pages ("dups"); a content with more than one dup
  is a chain.  A dup is picked while it has room; when none has, the page
  goes to the unstable tree and pairs with the next duplicate into a new dup.
* Counters are updated as lazily as the kernel's: a page that was
  copied-on-write leaves ``pages_sharing`` when the scanner next visits it.
* ``smart_scan`` uses the kernel's ages and skip counts (should_skip_rmap_item);
  the scan-time advisor adapts ``pages_to_scan`` after every full scan.
* A KSM page in no node (after a restart of the scanner) gets one when the
  new scanner's first pass begins, and each of its mappings joins it on its
  first visit, so a new scanner carries on where a killed one stopped.

* Partitions: the trees are kept per partition (:func:`partition_of` decides
  a guest's), and pages of two partitions are never merged.  With
  ``merge_across_nodes=0`` a guest's partition is its NUMA node: one stable
  and one unstable tree per node, as the kernel's ``root_stable_tree[nid]``.
  The kernel takes the node of each physical page; here it is the node of the
  guest, whose frames come from that node first.  With shmksm's
  ``mitigation = "domains"``, its security domain too; empty pages, the one
  content shared across domains, then go to the zero page.
* ``mitigation = "vusion"``: every page considered loses write access and
  moves to a frame taken at random (:func:`ksm.write_protect_pages`), merged
  or not, and KSM pages are read at each visit like the others.

* Parallel scanners (shmksm's own knob ``scanners``, not the kernel's): each
  scanner process runs a whole :class:`Scanner` on the pages it owns
  (:meth:`Scanner._owns`): those of its nodes with merge_across_nodes=0 and
  enough nodes, else those whose checksum at the last visit routes to it
  (the oldchecksums are in the guest's segment, shared).  Pages that can
  merge have one owner, so no tree is shared; the counters of the
  scanners are folded into the named words (:class:`ScannerWords`).  The
  scanners go from one full scan to the next together
  (:meth:`Scanner._wait_for_others`).  See docs/architecture.md for the
  convergence argument and the lock order.

Left out: migration, swap, huge pages, and the pruning timer of stable node
chains (a chain with a single dup collapses at once).

Invariants relied on: a KSM page's content never changes while mapped (every
PTE mapping it is read-only); a KSM page is named by (pfn, generation), so a
freed and reused frame is never taken for the page it was.
"""

from __future__ import annotations

import random
import time
from typing import Final

import numpy as np
import numpy.typing as npt

from .._mm import control
from .._mm.control import MITIGATION_DOMAINS, MITIGATION_VUSION
from .._mm.frames import KSM as FRAME_KSM
from .._mm.frames import PAGE_SIZE, ZERO_PFN, with_frames
from .._mm.pagetable import (
    FRAME_MASK,
    H_DOMAIN,
    H_KSM_STAT,
    KSM,
    PFN_MASK,
    PRESENT,
    ZERO,
    PageTable,
    is_private,
)
from .._mm.segments import pid_alive
from .._mm.system import System
from . import claims, ksm
from .checksum import checksum as _checksum
from .checksum import checksums
from .keytable import KeyTable
from .ksm import RMAP_ITEM_BYTES, break_ksm, unmerge_range

# An unstable tree entry names its page as gid << REF_SHIFT | page, in an int32.
REF_SHIFT: Final = 25
REF_PAGE_MASK: Final = (1 << REF_SHIFT) - 1
MAX_GUEST_PAGES: Final = 1 << REF_SHIFT

# rmap item states
NONE: Final = 0  # no rmap item
ITEM: Final = 1  # an item on no tree (new: its checksum taken once)
UNSTABLE: Final = 2  # on the unstable tree (counted in pages_unshared)
STABLE: Final = 3  # on a stable node (pages_shared or pages_sharing)
# Items on no tree too, as ITEM for the algorithm; they say why, for explain.
VOLATILE: Final = 4  # its checksum changed at its last visit
SKIPPED: Final = 5  # smart_scan skipped it at its last visit

ZERO_CHECKSUM: Final = _checksum(bytes(PAGE_SIZE))
_ANON_MASK: Final = np.uint64(FRAME_MASK)
_ANON: Final = np.uint64(PRESENT)
_KSM: Final = np.uint64(KSM)
_PFN: Final = np.uint64(PFN_MASK)
_ZERO: Final = np.uint64(ZERO)
_CHUNK: Final = 1 << 16
OVER_MAX_SHARING: Final = 8  # item_states: a flag beside the state
_MERGE_CHUNK: Final = 2048  # pages merged into stable dups per replace_pages call, at most
_PAGE_BY_PAGE: Final = 256  # batches up to this many pages are scanned page by page (_scan_page_by_page)
_OWNER_MULT: Final = np.uint64(0x9E3779B97F4A7C15)  # spreads checksums (and page numbers) over the scanners
_OWNER_SHIFT: Final = np.uint64(32)
_FIRST_VISIT_SHIFT: Final = 9  # a page never hashed goes by its page-table run: its scanner hashes whole runs
WAIT_LIMIT: Final = 1.0  # seconds a scanner waits for the others between passes, at least (_wait_for_others)
# What a page costs its owner in the merging pass, as the parallel scanners' loads count
# it: a content's first page 1 (it may be unique: a checksum and an insertion into the
# unstable tree, 0.5 CPU-us), each page after it _REPEAT_COST (compared and merged, 2.2-2.5).
_REPEAT_COST: Final = 4


def _merge_cost(pages: npt.NDArray[np.int64], first: bool | npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """The loads' measure of contents of ``pages`` pages each, ``first`` where their first page is among them."""
    out: npt.NDArray[np.int64] = pages * _REPEAT_COST - (_REPEAT_COST - 1) * np.asarray(first, np.int64)
    return out


def _skip_age_scalar(age: int) -> int:
    """The kernel's skip_age: scans to skip a page that failed to merge ``age`` times."""
    if age <= 3:
        return 1
    if age <= 5:
        return 2
    if age <= 8:
        return 4
    return 8


_SKIP_AGE: Final = np.array([_skip_age_scalar(a) for a in range(256)], np.uint8)


def skip_age(age: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """skip_age for an array of ages (a table lookup)."""
    return _SKIP_AGE[age]


# A partition of the trees: pages of two different partitions are never merged.
Partition = tuple[int, ...]
ALL_NODES: Final = -1  # the node component with merge_across_nodes=1


def _water_fill(load: npt.NDArray[np.float64], pages: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Scanners for contents of ``pages`` each (in order; in the loads' unit), filling the least
    loaded first: they end as level as whole contents allow."""
    total = float(pages.sum())
    ranked = np.argsort(load, kind="stable")
    levels = load[ranked]
    # The water level: the k least loaded, raised to one level, take in all the pages.
    k = len(levels)
    for k in range(1, len(levels) + 1):
        if k == len(levels) or levels[k] * k - levels[:k].sum() >= total:
            break
    level = (levels[:k].sum() + total) / k
    room = np.cumsum(np.maximum(0.0, level - levels[:k]))
    middle = np.cumsum(pages) - pages / 2
    out: npt.NDArray[np.int64] = ranked[np.minimum(np.searchsorted(room, middle), k - 1)].astype(np.int64)
    return out


def _spread(keys: npt.NDArray[np.uint64], count: int) -> npt.NDArray[np.uint64]:
    """The scanner each key (a checksum or a page-table run) goes to by hash, of ``count``."""
    out: npt.NDArray[np.uint64] = ((keys * _OWNER_MULT) >> _OWNER_SHIFT) % np.uint64(count)
    return out


def partition_of(system: System, gid: int) -> Partition:
    """The partition of guest ``gid``: which stable and unstable tree its pages go on.

    Pages of two partitions are never compared, so never merged.  This is the
    one place that decides it.  A partition is a tuple with one component per
    reason to keep guests apart, each in its own position:

    0. the NUMA node: with ``merge_across_nodes=0`` the guest's node (one
       stable and one unstable tree per node, as the kernel's); with 1,
       ALL_NODES, the same for every guest.
    1. the security domain, only with ``mitigation = "domains"``: the
       guest's (``add_guest(domain=)``), so that guests of two domains never
       share a tree.  Empty pages are the one content merged across domains:
       under that mitigation they go to the zero page, as with
       ``use_zero_pages`` (:meth:`Scanner._use_zero_pages`), outside any tree.

    A further reason to keep guests apart appends its component to the tuple; the trees, the scanners' ownership and the
    counters take the tuple whole, so nothing else needs to change.  A guest
    whose partition changed (a knob was written) is moved by the scanner at
    the start of its next full scan: its rmap items leave the old trees, and
    its pages are merged again in the new ones.  Reads knobs and the guest's
    page-table header; takes no lock.
    """
    node = ALL_NODES if system.get("merge_across_nodes") else system.table(gid).node
    if system.get("mitigation") == MITIGATION_DOMAINS:
        return (node, int(system.table(gid).header[H_DOMAIN]))
    return (node,)


class MmSlot:
    """The scanner's rmap items for one guest (the kernel's ksm_mm_slot and its rmap_list)."""

    def __init__(self, table: PageTable, partition: Partition, trees: Trees) -> None:
        n = table.pages
        self.table = table
        self.gid = table.gid
        self.partition = partition  # partition_of(gid) when its items were made
        self.trees = trees  # that partition's trees: every item of this slot is on them or on none
        self.state = np.zeros(n, np.uint8)
        # The kernel's u32 oldchecksum, in the guest's segment: every scanner
        # reads it to know which pages are its own (Scanner._owns).
        self.checksum = table.oldchecksums
        self.node = np.full(n, -1, np.int32)
        self.age = np.zeros(n, np.uint8)
        self.skips = np.zeros(n, np.uint8)
        # Scalar access through memoryviews is several times faster than numpy's.
        self.state_v = self.state.data
        self.checksum_v = self.checksum.data
        self.node_v = self.node.data
        self.cursor = 0
        self.items = 0
        self.merging = 0

    def publish(self, index: int) -> None:
        """Write this guest's ksm_stat counters, those of scanner ``index``."""
        self.table.header[H_KSM_STAT + 2 * index] = self.items
        self.table.header[H_KSM_STAT + 2 * index + 1] = self.merging


class StableTree:
    """Stable nodes ("dups") by content key.

    Per node id: ``kpfn`` and ``kgen`` name its KSM page, ``count`` is its
    rmap_hlist_len, ``key`` its content key, ``next_dup`` the next older dup
    of the same content (-1 ends), ``chain_len`` the number of dups (valid at
    the newest dup, the chain's head).  ``heads`` maps a key to its newest dup;
    ``node_of_pfn`` maps a KSM page's frame to its node.
    """

    def __init__(self, nframes: int) -> None:
        self.heads = KeyTable()
        self.node_of_pfn = np.full(nframes, -1, np.int32)
        self.node_of_pfn_v = self.node_of_pfn.data
        self.free_ids: list[int] = []
        self.next_id = 0
        self.chains = 0  # contents with more than one dup
        self.dups = 0  # dups under those contents
        self.kpfn = np.full(0, -1, np.int32)
        self.kgen = np.zeros(0, np.uint32)
        self.count = np.zeros(0, np.int32)
        self.key = np.zeros(0, np.uint64)
        self.next_dup = np.zeros(0, np.int32)
        self.chain_len = np.zeros(0, np.int32)
        self._grow(1024)

    def _grow(self, size: int) -> None:
        def grown(a: npt.NDArray, fill: int) -> npt.NDArray:  # type: ignore[type-arg]
            out = np.full(size, fill, a.dtype)
            out[:len(a)] = a
            return out

        self.kpfn, self.kgen, self.count = grown(self.kpfn, -1), grown(self.kgen, 0), grown(self.count, 0)
        self.key, self.next_dup, self.chain_len = grown(self.key, 0), grown(self.next_dup, -1), grown(self.chain_len, 0)
        self.kpfn_v, self.kgen_v, self.count_v = self.kpfn.data, self.kgen.data, self.count.data
        self.key_v, self.next_v = self.key.data, self.next_dup.data
        self.len_v = self.chain_len.data

    def new_node(self, key: int, kpfn: int, kgen: int) -> int:
        """A new dup for KSM page (kpfn, kgen) of content ``key``: the newest of its chain."""
        if self.free_ids:
            nid = self.free_ids.pop()
        else:
            nid = self.next_id
            self.next_id += 1
            if nid >= len(self.kpfn):
                self._grow(2 * len(self.kpfn))
        head = self.heads.get(key)
        n = self.len_v[head] if head >= 0 else 0
        self.kpfn_v[nid] = kpfn
        self.kgen_v[nid] = kgen
        self.count_v[nid] = 0
        self.key_v[nid] = key
        self.next_v[nid] = head
        self.len_v[nid] = n + 1
        self.heads.set(key, nid)
        self._chain_changed(n, n + 1)
        self.node_of_pfn_v[kpfn] = nid
        return nid

    def new_nodes(self, keys: list[int], kpfns: list[int], kgens: list[int]) -> list[int]:
        """new_node for each of several distinct keys, in numpy; the node ids."""
        n = len(keys)
        reuse = min(n, len(self.free_ids))
        ids = [self.free_ids.pop() for _ in range(reuse)]
        ids += range(self.next_id, self.next_id + n - reuse)
        self.next_id += n - reuse
        while self.next_id > len(self.kpfn):
            self._grow(2 * len(self.kpfn))
        nid = np.array(ids, np.intp)
        key = np.array(keys, np.uint64)
        head = self.heads.lookup(key)
        had = head >= 0
        before = np.where(had, self.chain_len[head], 0)
        self.kpfn[nid] = kpfns
        self.kgen[nid] = kgens
        self.count[nid] = 0
        self.key[nid] = key
        self.next_dup[nid] = head
        self.chain_len[nid] = before + 1
        self.node_of_pfn[kpfns] = nid
        self.heads.insert_new(key[~had], nid[~had].astype(np.int32))
        for k in np.flatnonzero(had).tolist():
            self.heads.set(keys[k], ids[k])
        # _chain_changed(before, before + 1) for each
        self.chains += int(np.count_nonzero(before == 1))
        self.dups += 2 * int(np.count_nonzero(before == 1)) + int(np.count_nonzero(before > 1))
        return ids

    def _chain_changed(self, before: int, after: int) -> None:
        if before > 1:
            self.chains -= 1
            self.dups -= before
        if after > 1:
            self.chains += 1
            self.dups += after

    def unlink(self, nid: int) -> None:
        """Take node ``nid`` off the tree (its KSM page is gone); its id is reused once empty."""
        kpfn = self.kpfn_v[nid]
        if kpfn < 0:
            return  # unlinked already
        key = self.key_v[nid]
        head = self.heads.get(key)
        n = self.len_v[head] if head >= 0 else 0
        prev, cur = -1, head
        while cur >= 0 and cur != nid:
            prev, cur = cur, self.next_v[cur]
        if cur == nid:
            after = self.next_v[nid]
            if prev >= 0:
                self.next_v[prev] = after
                self.len_v[head] = n - 1
            elif after >= 0:
                self.len_v[after] = n - 1
                self.heads.set(key, after)
            else:
                self.heads.delete(key)
            self._chain_changed(n, n - 1)
        if self.node_of_pfn_v[kpfn] == nid:
            self.node_of_pfn_v[kpfn] = -1
        self.kpfn_v[nid] = -1


class Trees:
    """The stable and the unstable tree of one partition."""

    def __init__(self, nframes: int) -> None:
        self.stable = StableTree(nframes)
        self.unstable = KeyTable()  # key → gid << REF_SHIFT | page


def _fold_columns(how: str) -> npt.NDArray[np.intp]:
    return np.array([i for i, name in enumerate(control.SCANNER_FIELDS) if control.SCANNER_FOLD.get(name) == how],
                    np.intp)


# How ScannerWords.fold folds each column of the scanners' entries (control.SCANNER_FOLD).
_NAMED_WORDS: Final = np.array([control.INDEX[name] for name in control.SCANNER_FIELDS], np.intp)
_MIN_COLS: Final = _fold_columns("min")
_MAX_COLS: Final = _fold_columns("max")
_FIRST_COLS: Final = _fold_columns("first")
_UNMERGES_COL: Final = control.SCANNER_INDEX["scanner_unmerges"]
_FULL_SCANS_COL: Final = control.SCANNER_INDEX["full_scans"]
_PID_COL: Final = control.SCANNER_INDEX["scanner_pid"]
_UNMERGES_WORD: Final = control.INDEX["scanner_unmerges"]
_SCANNERS_WORD: Final = control.INDEX["scanners"]


class ScannerWords:
    """One scanner's entry in the control segment (control.SCANNER_FIELDS), and the fold
    of every entry into the named words that /sys/kernel/mm/ksm shows."""

    def __init__(self, system: System, index: int) -> None:
        self.system = system
        self.index = index
        base = control.SCANNER_BASE + control.SCANNER_WORDS * index
        self.words = system.ctl[base:base + control.SCANNER_WORDS]
        self.v = self.words.data.cast("B").cast("q")  # scalar stores, as Frames.cv

    def get(self, name: str) -> int:
        return int(self.v[control.SCANNER_INDEX[name]])

    def set(self, name: str, value: int) -> None:
        self.v[control.SCANNER_INDEX[name]] = value

    def slowest_full_scans(self, own: int) -> int:
        """The full scans every scanner has done: ``own`` (this one's, published or not) and the
        published counts, the least (what the folded full_scans will say).  This one's published
        count is never above ``own``."""
        ctl = self.system.ctl
        n = max(1, min(int(ctl[_SCANNERS_WORD]), control.MAX_SCANNERS))
        if n == 1:
            return own
        cols = control.SCANNER_BASE + control.SCANNER_WORDS * np.arange(n) + _FULL_SCANS_COL
        return min(own, int(ctl[cols].min()))

    def others_running(self) -> dict[int, int]:
        """The full scans of every other scanner that runs (its pid in its entry, alive), by index.
        One killed keeps its last count until restarted; one not started yet has no pid."""
        ctl = self.system.ctl
        n = max(1, min(int(ctl[_SCANNERS_WORD]), control.MAX_SCANNERS))
        out = {}
        for i in range(n):
            base = control.SCANNER_BASE + control.SCANNER_WORDS * i
            if i != self.index and (pid := int(ctl[base + _PID_COL])) and pid_alive(pid):
                out[i] = int(ctl[base + _FULL_SCANS_COL])
        return out

    def others_full_scans(self) -> list[int]:
        """The full scans of every other scanner that runs (others_running)."""
        return list(self.others_running().values())

    def behind(self, own: int) -> bool:
        """Has another scanner that runs done fewer full scans than ``own``?"""
        return any(full < own for full in self.others_full_scans())

    def fold(self) -> None:
        """Write every named scanner word from the entries of scanners 0..scanners-1.

        Takes the stat lock when several scanners fold (a knob write holds it
        too).  ``scanner_unmerges`` never goes down (with no ksmd, the host
        counts its own unmerge there).
        """
        ctl = self.system.ctl
        n = max(1, min(int(ctl[_SCANNERS_WORD]), control.MAX_SCANNERS))
        area = ctl[control.SCANNER_BASE:control.SCANNER_BASE + control.SCANNER_WORDS * n]
        if n == 1:
            out = area.copy()
            out[_UNMERGES_COL] = max(out[_UNMERGES_COL], ctl[_UNMERGES_WORD])
            ctl[_NAMED_WORDS] = out
            return
        with self.system.locks.stat:
            area = area.reshape(n, control.SCANNER_WORDS)
            out = area.sum(axis=0)
            out[_MIN_COLS] = area[:, _MIN_COLS].min(axis=0)
            out[_MAX_COLS] = area[:, _MAX_COLS].max(axis=0)
            out[_FIRST_COLS] = area[0, _FIRST_COLS]
            out[_UNMERGES_COL] = max(out[_UNMERGES_COL], ctl[_UNMERGES_WORD])
            ctl[_NAMED_WORDS] = out


class Scanner:
    """ksmd's state and algorithm, in the scanner process (or a test's).

    ``index`` is this scanner's among the ``scanners`` that run in parallel:
    it merges the pages it owns (:meth:`_owns`).  ``pid``: the process it runs
    in, published in its entry as it starts (ksmd's; a test driving scanners
    itself leaves it 0, and no scanner waits for another).
    """

    def __init__(self, system: System, index: int = 0, pid: int = 0) -> None:
        self.system = system
        self.index = index
        self.count = 1  # scanners running, as of the last batch
        self.by_node = False  # ownership by node rather than by checksum (see _owns)
        self.words = ScannerWords(system, index)
        self.frames = system.frames
        # Who owns each content: first touch (claims), or without the extension a hash of it.
        self.claims = claims.Claims(self.frames.claims) if claims.AVAILABLE else None
        # Pages this scanner hashed in this pass, by the owner of their content
        # (control.LOAD_BASE, row ``index``): what each scanner has to merge.
        self.loads = system.ctl[control.LOAD_BASE:control.LOAD_BASE + control.MAX_SCANNERS ** 2].reshape(
            control.MAX_SCANNERS, control.MAX_SCANNERS)
        self.loads[index] = 0
        self.pass_loads = system.ctl[control.PASS_LOAD_BASE:control.PASS_LOAD_BASE + control.MAX_SCANNERS ** 2].reshape(
            control.MAX_SCANNERS, control.MAX_SCANNERS)
        self.claimed = False  # contents claimed in this pass (_rebalance)
        self.by_gid: dict[int, MmSlot] = {}
        self.trees: dict[Partition, Trees] = {}  # by partition_of
        self.rng = random.Random()  # where mitigation "vusion" places the pages it considers
        self.seqnr = 0
        self.pages_shared = 0
        self.pages_sharing = 0
        self.pages_unshared = 0
        self.pages_scanned = 0
        self.pages_skipped = 0
        self.zero_merges = 0  # pages mapped to the zero page (use_zero_pages)
        # A new scanner (or one restarted after a kill) starts from empty trees:
        # its entry starts there too, in the pass the others that run are in.
        words = self.words
        self.full_scans = min(words.others_full_scans(), default=system.get("full_scans"))
        for name in control.SCANNER_FIELDS:
            if name not in ("scanner_unmerges", "scanner_startup_ns"):
                words.set(name, 0)
        words.set("full_scans", self.full_scans)
        if pid:
            # Running from now on: the others wait for it between passes.  Until its pid
            # shows, they do not, and with passes of a few hundred pages they could be
            # many passes ahead by the time it does; it would then catch up pass after
            # pass while they wait, and each of those would count as a full scan of the
            # machine (the folded full_scans is the slowest scanner's) in which they
            # looked at nothing.  So it takes their pass again once it shows.
            words.set("scanner_pid", pid)
            self.full_scans = max(self.full_scans, min(words.others_full_scans(), default=self.full_scans))
            words.set("full_scans", self.full_scans)
        words.set("scanner_unmerges", max(words.get("scanner_unmerges"), system.get("scanner_unmerges")))
        self.rmap_items = 0
        self.scan_started = time.monotonic()
        self.scan_cpu_started = time.process_time()
        self.advisor_scan_time_ewma = 100
        self.slots: list[MmSlot] = []
        self.slot_index = 0
        # A pass takes its guests when it begins — at the first batch after the
        # previous one ended — so a guest made mergeable in between is in it,
        # as an mm added to the kernel's list while the cursor is at its head.
        self.pass_pending = True
        self.waiting = False  # for another scanner to finish its part of the pass (_wait_for_others)
        self.wait_started = 0.0
        self.last_pass_seconds = 0.0
        # KSM pages a killed scanner made are in no tree yet: adopted before
        # the first pass merges anything (see _adopt_orphans).
        self.adopt_pending = True

    # -- mm slots --------------------------------------------------------------------------

    def _trees(self, partition: Partition) -> Trees:
        trees = self.trees.get(partition)
        if trees is None:
            trees = self.trees[partition] = Trees(self.frames.nframes)
        return trees

    def _slot(self, gid: int) -> MmSlot:
        """The mm slot of guest ``gid``, made on first use, on the trees of its partition now."""
        partition = partition_of(self.system, gid)
        slot = self.by_gid.get(gid)
        if slot is None:
            slot = self.by_gid[gid] = MmSlot(self.system.table(gid), partition, self._trees(partition))
        elif slot.partition != partition:
            # Its items are on the old partition's trees: they leave them, and
            # its pages start again (on their second visit) in the new ones.
            self._remove_items(slot, np.flatnonzero(slot.state))
            slot.partition, slot.trees = partition, self._trees(partition)
        return slot

    def _wait_for_others(self) -> bool:
        """Should this scanner, between two passes, wait for the others (:attr:`waiting`)?

        Parallel scanners go from one full scan to the next together: one
        that finished its part of a pass waits until every running scanner
        has finished its own, instead of scanning its settled pages again
        (CPU spent for nothing, as the counters wait for the slowest).  The
        wait is bounded: after twice this scanner's last pass, and at least
        WAIT_LIMIT seconds, it goes on, so a stopped scanner (SIGSTOP) slows
        the others down but does not stop them.  A killed one is not waited
        for (ScannerWords.behind).
        """
        waited = self.waiting
        self.waiting = self.count > 1 and self.words.behind(self.full_scans)
        if self.waiting:
            now = time.monotonic()
            if not waited:
                self.wait_started = now
            elif now - self.wait_started > max(WAIT_LIMIT, 2 * self.last_pass_seconds):
                self.waiting = False
        return self.waiting

    def _new_full_scan(self) -> None:
        """Begin a pass: empty the unstable trees, take the guests that have mergeable memory."""
        live = set(self.system.live_guests())
        for gid in [g for g in self.by_gid if g not in live or not self.system.current(self.by_gid[g].table)]:
            self._drop_slot(self.by_gid[gid])
        self.slots = []
        for gid in sorted(live):
            try:
                table = self.system.table(gid)
            except FileNotFoundError:
                continue  # removed since live_guests() looked: its segment is unlinked already
            if table.mergeable_ranges() or gid in self.by_gid:
                slot = self._slot(gid)
                slot.cursor = 0
                self.slots.append(slot)
        # Trees of partitions left without guests go; the others' unstable trees are emptied.
        used = {slot.partition for slot in self.by_gid.values()}
        self.trees = {p: t for p, t in self.trees.items() if p in used}
        for trees in self.trees.values():
            trees.unstable.clear()
        self._rebalance()
        self.loads[self.index] = 0
        if self.count > 1:
            # Parallel scanners start their passes at different guests: two
            # scanners in one guest would wait on each other's mm lock.
            k = len(self.slots) * self.index // self.count
            self.slots = self.slots[k:] + self.slots[:k]
        self.slot_index = 0
        self.pass_pending = not self.slots
        if self.adopt_pending:
            self.adopt_pending = False
            for slot in self.slots:
                self._adopt_orphans(slot)
        self.scan_started = time.monotonic()
        self.scan_cpu_started = time.process_time()

    def _rebalance(self) -> None:
        """At the start of a pass: hand contents to a scanner that owned many fewer of the pages
        hashed in the pass both just finished.

        First touch leaves a content with the scanner that met it first, also when the
        other scanners meet more of its pages (a small workload: one scanner's first
        batch can meet every content).  So a scanner that owned more of them than the
        least busy one, by more than a slack (1/16 of both, 32 pages to merge at least;
        counted as :meth:`_claim` counts them), hands it contents worth half the gap,
        those with the most of their pages in the other scanners' runs first (what it
        owns in its own runs it read already).  Only contents that are on none of its
        trees: the unstable
        ones are empty as a pass begins, and a content with a KSM page stays, so that
        no content ever has pages on two scanners' trees.  The taker merges them from
        its next visit on, as pages whose content changed.  Only after a pass in which
        this scanner claimed contents: ownership settles with the workload, and a
        scanner's share of the work, which smart_scan's skips move from pass to pass,
        does not hand its pages to and fro.
        """
        count, claimed = self.count, self.claimed
        self.claimed = False
        if self.claims is None or count == 1 or self.by_node or not claimed:
            return
        peers = [j for j, full in self.words.others_running().items() if full >= self.full_scans]
        if not peers:
            return
        owned = self.pass_loads[:count, :count].sum(axis=0)  # each one's contents, the pass just done (_claim)
        taker = min(peers, key=lambda j: int(owned[j]))
        done, least = int(owned[self.index]), int(owned[taker])
        gap = done - least
        if gap <= max(32 * _REPEAT_COST, (done + least) // 16):
            return
        buckets, local, merged = [], [], []
        for slot in self.by_gid.values():
            pages = np.flatnonzero(slot.checksum)
            if not len(pages):
                continue
            sums = slot.checksum[pages]
            mine = self.claims.owners(sums, count) == self.index
            pages, sums = pages[mine], sums[mine]
            b = self.claims.buckets(sums)
            ksm_page = (slot.table.ptes[pages] & _KSM) != 0
            merged.append(b[ksm_page])
            runs = (pages >> _FIRST_VISIT_SHIFT).astype(np.uint64)
            buckets.append(b[~ksm_page])
            local.append((_spread(runs, count) == self.index)[~ksm_page])
        for trees in self.trees.values():
            st = trees.stable
            live = st.kpfn[:st.next_id] >= 0
            merged.append(self.claims.buckets(st.key[:st.next_id][live].astype(np.uint32)))
        if not buckets:
            return
        b, at_home = np.concatenate(buckets), np.concatenate(local)
        cand, inverse, pages_of = np.unique(b, return_inverse=True, return_counts=True)
        home = np.bincount(inverse, weights=at_home, minlength=len(cand))
        keep = ~np.isin(cand, np.concatenate(merged))
        cand, pages_of, home = cand[keep], pages_of[keep], home[keep]
        order = np.lexsort((pages_of, home / pages_of))  # most of their pages away first, then the small
        take = order[np.cumsum(_merge_cost(pages_of, True)[order]) <= gap // 2]
        self.claims.give(cand[take], count, self.index, taker)

    def _drop_slot(self, slot: MmSlot) -> None:
        """A guest is gone: forget its items (their mappings were torn down)."""
        items = np.flatnonzero(slot.state)
        self._remove_items(slot, items)
        del self.by_gid[slot.gid]
        self.system.forget_guest(slot.gid, slot.table)

    # -- rmap items -----------------------------------------------------------------------------

    def _remove_items(self, slot: MmSlot, pages: npt.NDArray[np.intp], checksums: bool = True) -> None:
        """Free the rmap items of ``pages`` (remove_rmap_item_from_tree + free_rmap_item), and
        their checksums unless ``checksums`` is False (the pages went to another scanner)."""
        if not len(pages):
            return
        self._remove_from_tree(slot, pages)
        had = slot.state[pages] != NONE
        n = int(had.sum())
        slot.state[pages] = NONE
        if checksums:
            slot.checksum[pages] = 0
        slot.age[pages] = 0
        slot.skips[pages] = 0
        slot.items -= n
        self.rmap_items -= n

    def _remove_from_tree(self, slot: MmSlot, pages: npt.NDArray[np.intp]) -> None:
        """Take the items of ``pages`` off whichever tree they are on (remove_rmap_item_from_tree)."""
        state = slot.state[pages]
        unstable = state == UNSTABLE
        if unstable.any():
            self.pages_unshared -= int(unstable.sum())
        stable = pages[state == STABLE]
        for page in stable.tolist():
            self._leave_node(slot, page)
        slot.state[pages[unstable | (state == STABLE)]] = ITEM

    def _leave_node(self, slot: MmSlot, page: int) -> None:
        nid = slot.node_v[page]
        st = slot.trees.stable
        left = st.count_v[nid] - 1
        st.count_v[nid] = left
        if left == 0:
            self.pages_shared -= 1
            st.unlink(nid)
            st.free_ids.append(nid)
        else:
            self.pages_sharing -= 1
        slot.node_v[page] = -1
        slot.state_v[page] = ITEM
        slot.merging -= 1

    def _append(self, slot: MmSlot, page: int, nid: int) -> None:
        """stable_tree_append: the item of ``page`` joins node ``nid``."""
        self._append_many(slot, [page], [nid])

    def _append_many(self, slot: MmSlot, pages: list[int], nids: list[int]) -> None:
        """stable_tree_append for each (page, node) pair."""
        count = slot.trees.stable.count_v
        state, node = slot.state_v, slot.node_v
        first = 0  # pages that made their node's KSM page shared
        for page, nid in zip(pages, nids, strict=True):
            if not count[nid]:
                first += 1
            count[nid] += 1
            state[page] = STABLE
            node[page] = nid
        self.pages_shared += first
        self.pages_sharing += len(pages) - first
        slot.merging += len(pages)

    # -- the scan ---------------------------------------------------------------------------------

    def do_scan(self, scan_npages: int, publish: bool = True) -> int:
        """ksm_do_scan: process up to ``scan_npages`` pages; return how many.

        A batch ends early at the end of a full scan, as in the kernel.  The
        counters are published at its end unless ``publish`` is False (the
        caller publishes them with its own words).
        """
        done = 0
        get = self.system.get
        self.count = max(1, min(get("scanners"), control.MAX_SCANNERS))
        self.by_node = not get("merge_across_nodes") and get("nodes") >= self.count
        if self.pass_pending:
            if self._wait_for_others():
                return 0
            self._new_full_scan()
            if not self.slots:
                return 0  # no full scan over nothing (the kernel's empty mm list)
        while done < scan_npages:
            if self.slot_index >= len(self.slots):
                self._end_full_scan()
                break
            slot = self.slots[self.slot_index]
            if not self.system.current(slot.table):
                self.slot_index += 1
                continue
            pages = self._next_pages(slot, scan_npages - done)
            if len(pages):
                self._scan_pages(slot, pages)
                done += len(pages)
            if slot.cursor >= slot.table.pages:
                self.slot_index += 1
        self.pages_scanned += done
        if publish:
            self.publish()
        return done

    def do_scan_batches(self, scan_npages: int, batches: int) -> int:
        """Up to ``batches`` batches of ksm_do_scan(scan_npages) back to back, scanned as one:
        return how many of them ran.

        What those batches would scan, in the same order: a batch that meets
        the end of a full scan ends there (with the pages it scanned, none if
        the previous batch scanned the last page), so the pages after it are
        the next batch's, in the next full scan — this scan stops at that
        end, and the caller runs the batches left.  Run as one, they take
        the vectorized path of a large batch instead of paying, batch by
        batch, the fixed part of a small one.  An empty mm list scans
        nothing: every batch runs and does nothing.  None runs while this
        scanner waits for the others to end a pass (:attr:`waiting`).  The
        counters are not published (the caller does, once).
        """
        full = self.full_scans
        done = self.do_scan(scan_npages * batches, publish=False)
        if self.waiting:
            return 0  # none ran: this scanner waits for the others to end the pass
        if self.full_scans == full:
            return batches
        return done // scan_npages + 1

    def _end_full_scan(self) -> None:
        self.last_pass_seconds = time.monotonic() - self.scan_started
        self.pass_loads[self.index] = self.loads[self.index]
        self.full_scans += 1
        self.seqnr += 1
        for slot in self.slots:
            slot.publish(self.index)
        if self.system.get("advisor_mode"):
            self._scan_time_advisor()
        self.pass_pending = True

    def _next_pages(self, slot: MmSlot, budget: int) -> npt.NDArray[np.intp]:
        """The next pages of ``slot`` to process, at most ``budget`` of them (scan_get_next_rmap_item).

        Walks the PTEs from the cursor: anonymous pages of mergeable ranges get
        an rmap item; items of addresses that have none any more are freed;
        smart_scan skips (and does not count) pages that keep failing to merge.
        """
        table = slot.table
        with table.mm_lock:
            ranges = table.mergeable_ranges()
        smart = self.system.get("smart_scan")
        out: list[npt.NDArray[np.intp]] = []
        pos = slot.cursor
        chunk = 2 * budget + 64
        while budget > 0 and pos < table.pages:
            end = min(pos + chunk, table.pages)
            chunk = min(2 * chunk, _CHUNK)
            eligible = np.zeros(end - pos, np.bool_)
            for a, b in ranges:
                if b > pos and a < end:
                    eligible[max(a, pos) - pos:min(b, end) - pos] = True
            ptes = table.ptes[pos:end]
            eligible &= (ptes & _ANON_MASK) == _ANON
            idx = np.flatnonzero(eligible) + pos
            if self.count > 1 and len(idx):
                mine = self._owns(slot, idx)
                theirs = idx[~mine]
                # Their items leave this scanner's trees; their checksums stay, their owner's.
                self._remove_items(slot, theirs[slot.state[theirs] != NONE], checksums=False)
                idx = idx[mine]
            skip: npt.NDArray[np.bool_] | None = None
            counted: npt.NDArray[np.intp]
            if smart and len(idx):
                skip = self._would_skip(slot, idx, ptes[idx - pos])
                counted = np.cumsum(~skip)
            else:
                counted = np.arange(1, len(idx) + 1)
            if len(idx) and counted[-1] > budget:
                cut = int(np.searchsorted(counted, budget)) + 1
                idx = idx[:cut]
                if skip is not None:
                    skip = skip[:cut]
                end = int(idx[-1]) + 1
            # Items of pages in [pos, end) that are not taken are freed.
            span_state = slot.state[pos:end]
            taken = np.zeros(end - pos, np.bool_)
            taken[idx - pos] = True
            stale = np.flatnonzero((span_state != NONE) & ~taken) + pos
            self._remove_items(slot, stale)
            new = idx[slot.state[idx] == NONE]
            if len(new):
                slot.state[new] = ITEM
                slot.items += len(new)
                self.rmap_items += len(new)
            if skip is not None and len(idx):
                self._apply_skip(slot, idx, ptes[idx - pos])
                idx = idx[~skip]
            out.append(idx)
            budget -= len(idx)
            pos = end
        slot.cursor = pos
        return np.concatenate(out) if out else np.zeros(0, np.intp)

    def owns(self, gid: int, pages: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        """Which of these pages of guest ``gid`` this scanner merges now (:meth:`_owns`), as of the
        number of scanners at its last batch; all of them when it runs alone."""
        slot = self.by_gid.get(gid)
        if self.count == 1 or slot is None:
            return np.full(len(pages), slot is not None)
        return self._owns(slot, pages)

    def _owns(self, slot: MmSlot, pages: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        """Which of these present pages of ``slot`` this scanner merges.

        Two pages that can merge always have one owner: with
        merge_across_nodes=0 and at least as many nodes as scanners, the
        owner of their partition's node; else the owner of their checksum at
        the last visit (the shared oldchecksum): the scanner that claimed it
        (:mod:`.claims`; without the extension, a hash of the checksum picks
        it).  A page never hashed (checksum 0) goes by its page-table run, so
        that a scanner's first visits hash whole runs of frames in order, and
        claim what they meet.  A page is only merged at a visit that finds
        its checksum unchanged: then identical pages have one checksum, so
        one owner.  When a page's content changes, its owner hashes it,
        records (and claims) the new checksum, and the page goes to the new
        checksum's owner from then on.  Ownership reads the checksums and the
        claims, not the frames: what every scanner repeats for the pages of
        the others is a walk of PTEs and checksums, in numpy.
        """
        if self.by_node:
            return np.full(len(pages), slot.partition[0] % self.count == self.index)
        if self.claims is None:
            sums = slot.checksum[pages]
            runs = (pages >> _FIRST_VISIT_SHIFT).astype(np.uint64)
            key = np.where(sums != 0, sums.astype(np.uint64), runs)
            mine: npt.NDArray[np.bool_] = _spread(key, self.count) == self.index
            return mine
        owner = self.claims.page_owners(slot.checksum, pages, self.count)
        free = np.flatnonzero(owner < 0)
        if len(free):
            # A checksum nobody claimed (recorded before the number of scanners
            # changed): the scanner of the page's run claims it now.
            runs = (pages[free] >> _FIRST_VISIT_SHIFT).astype(np.uint64)
            free = free[_spread(runs, self.count) == self.index]
            owner[free] = self.claims.claim(slot.checksum[pages[free]], self.count, self.index)
        out: npt.NDArray[np.bool_] = owner == self.index
        return out

    def _claim(self, sums: npt.NDArray[np.uint32], unchanged: int = 0) -> None:
        """Claim the contents of the checksums this scanner just recorded that nobody owns yet,
        and count them, with ``unchanged`` pages of its own, in its row of the loads.

        First touch: a scanner claims what it meets for itself (which leaves its load as
        it is: it merges what it hashed).  A scanner's load is what it is to merge of the
        pages the others met, less what they are to merge of its own, counted as the
        merging pass costs them: a content's first page 1, each further page
        _REPEAT_COST.  When its load is more than a slack (1/64 of the pass's, 64 pages
        to merge at least) above the least loaded's, it claims for the others, least
        loaded first, up to half the gap, contents met more than once in this batch,
        those of most pages first.  A content of many pages (the empty page) thus weighs
        on the scanner that owns it, and the others take more of the rest.
        """
        count = self.count
        if self.claims is None or count == 1 or self.by_node:
            return
        row = self.loads[self.index]
        row[self.index] += unchanged
        if not len(sums):
            return
        # What each scanner is to merge beyond what it hashed: what it owns of the
        # pages the others met.  First touch alone keeps that near 0 for everyone.
        rows = self.loads[:count, :count]
        load = (rows.sum(axis=0) - rows.sum(axis=1)).astype(np.float64)
        others = load.copy()
        others[self.index] = np.inf
        gap = load[self.index] - others.min()
        if gap <= max(64.0 * _REPEAT_COST, float(rows.sum()) / 64):
            owners = self.claims.claim(sums, count, self.index)  # all for itself
            self.claimed |= self.claims.claimed > 0
            row[:count] += np.bincount(owners, minlength=count)[:count] * _REPEAT_COST
            row[self.index] -= self.claims.claimed * (_REPEAT_COST - 1)  # the first page of each
            return
        uniq, pages = np.unique(sums, return_counts=True)
        owners = self.claims.owners(uniq, count)
        free = np.flatnonzero(owners < 0)
        cost = _merge_cost(pages, owners < 0)
        if len(free):
            # Only contents met more than once here, most pages first: work to merge for
            # certain, whose pages lie apart.  A content met once may be unique (its page,
            # read by the taker, would cost more than it levels), or the first of copies
            # in this scanner's own runs (every one of them the taker's to read).
            order = free[np.argsort(-pages[free], kind="stable")]
            want = np.full(len(order), self.index, np.int64)
            # Half the gap to the least loaded levels the two.
            give = np.flatnonzero(np.cumsum(cost[order]) <= gap / 2)
            give = give[pages[order[give]] >= 2]
            if len(give):
                want[give] = _water_fill(others, cost[order[give]])
            for j in np.unique(want).tolist():
                at = order[want == j]
                owners[at] = self.claims.claim(uniq[at], count, j)
            self.claimed = True
        row[:count] += np.bincount(owners, weights=cost, minlength=count).astype(np.int64)[:count]

    def _would_skip(self, slot: MmSlot, idx: npt.NDArray[np.intp],
                    ptes: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        """should_skip_rmap_item's verdict, without its side effects."""
        not_ksm = (ptes & _KSM) == 0
        verdict: npt.NDArray[np.bool_] = (not_ksm & (slot.age[idx] >= 3) & (slot.skips[idx] > 0)
                                          & (slot.state[idx] != NONE))
        return verdict

    def _apply_skip(self, slot: MmSlot, idx: npt.NDArray[np.intp], ptes: npt.NDArray[np.uint64]) -> None:
        """should_skip_rmap_item's side effects on the pages actually taken."""
        idx = idx[(ptes & _KSM) == 0]
        age = slot.age[idx]
        slot.age[idx] = np.where(age < 255, age + 1, age)
        old = age >= 3
        zero_skips = old & (slot.skips[idx] == 0)
        skipping = old & ~zero_skips
        slot.skips[idx[zero_skips]] = skip_age(age[zero_skips])
        skipped = idx[skipping]
        slot.skips[skipped] -= 1
        self.pages_skipped += len(skipped)
        self._remove_from_tree(slot, skipped)
        slot.state[skipped] = SKIPPED

    def _scan_pages(self, slot: MmSlot, pages: npt.NDArray[np.intp]) -> None:
        """cmp_and_merge_page for a batch of pages of one guest, vectorized where it can be."""
        mitigation = self.system.get("mitigation")
        if len(pages) <= _PAGE_BY_PAGE and mitigation != MITIGATION_VUSION:
            self._scan_page_by_page(slot, pages.tolist(), mitigation)
            return
        vusion = mitigation == MITIGATION_VUSION
        ptes = slot.table.ptes[pages]
        is_ksm = (ptes & _KSM) != 0
        if vusion:
            # Every page considered loses write access, merged or not (KSM pages
            # have none), and moves to a frame taken at random.
            ksm.write_protect_pages(slot.table, pages[~is_ksm], self.rng)
            ptes = slot.table.ptes[pages]
        pfns = (ptes & _PFN).astype(np.int64)
        st = slot.trees.stable
        # A KSM page whose item already hangs on its node: nothing to do.
        nodes = slot.node[pages]
        settled = is_ksm & (slot.state[pages] == STABLE) & (nodes >= 0)
        if settled.any():
            sel = np.flatnonzero(settled)
            settled[sel] = st.kpfn[nodes[sel]] == pfns[sel]
        for i in np.flatnonzero(is_ksm & ~settled).tolist():
            self._adopt_ksm_page(slot, int(pages[i]), int(pfns[i]))
        plain = ~is_ksm
        # Under vusion, KSM pages are read in their place in the batch as every
        # other page is (their checksums are not needed): not even what the
        # caches hold may tell merged pages from the others.
        sums = checksums(self.frames.flat, pfns if vusion else pfns[plain])
        if vusion:
            sums = sums[plain]
        pages, pfns = pages[plain], pfns[plain]
        if not len(pages):
            return
        self._remove_from_tree(slot, pages)
        low = sums.astype(np.uint32)
        old = slot.checksum[pages]
        steady = np.flatnonzero(old == low)
        changed = old != low
        slot.state[pages[changed & (old != 0)]] = VOLATILE  # 0: a new item's, as the kernel's oldchecksum
        slot.checksum[pages] = low
        if self.count > 1:
            self._claim(low[changed], len(pages) - int(changed.sum()))
        if not len(steady):
            return
        use_zero = self._use_zero_pages(mitigation)
        max_sharing = self.system.get("max_page_sharing")
        keys = sums[steady]
        # The common case, unique content: a key on neither tree and not twice
        # in this batch can only be inserted into the unstable tree.  Do those
        # in bulk; everything else goes through cmp_and_merge_page in order.
        unstable = slot.trees.unstable
        heads = st.heads.lookup(keys)
        _, inverse, repeats = np.unique(keys, return_inverse=True, return_counts=True)
        repeats = repeats[inverse]  # pages of each page's content in the batch
        zero = keys == np.uint64(ZERO_CHECKSUM) if use_zero else np.zeros(len(keys), np.bool_)  # their own path
        slow = (heads >= 0) | (unstable.lookup(keys) >= 0) | (repeats > 1) | zero
        if use_zero and zero.any():
            # use_zero_pages: empty pages go to the zero page together; one that
            # did not (its content changed) goes on through cmp_and_merge_page.
            at = np.flatnonzero(zero)
            done = np.array(self._merge_into_zero(slot, pages[steady[at]].tolist(), pfns[steady[at]].tolist()))
            slow[at[done]] = False
        # A content whose newest dup is live, with room for every page of it in
        # the batch: that is the dup cmp_and_merge_page would take for each in
        # turn, and nothing else in the batch changes it.  Merged in bulk.
        into = np.flatnonzero((heads >= 0) & ~zero)
        if len(into):
            nids = heads[into]
            kpfns = st.kpfn[nids]
            mappings = np.maximum(st.count[nids], self.frames.mapcount[kpfns])  # as _stable_dup counts them
            into_ok = ((mappings + repeats[into] <= max_sharing) & (self.frames.gen[kpfns] == st.kgen[nids])
                       & (self.frames.flags[kpfns] & FRAME_KSM != 0))
            into, nids = into[into_ok], nids[into_ok]
            slow[into] = False
            at = steady[into]
            self._merge_into_stable_bulk(slot, pages[at], pfns[at], nids)
        fast = np.flatnonzero(~slow & (heads < 0) & ~zero)
        if len(fast):
            fast_pages = pages[steady[fast]]
            unstable.insert_new(keys[fast], (fast_pages | (slot.gid << REF_SHIFT)).astype(np.int32))
            slot.state[fast_pages] = UNSTABLE
            self.pages_unshared += len(fast)
        self._merge_slow(slot, pages[steady[slow]].tolist(), pfns[steady[slow]].tolist(),
                         keys[slow], use_zero, max_sharing)

    def _scan_page_by_page(self, slot: MmSlot, pages: list[int], mitigation: int) -> None:
        """_scan_pages for a small batch, one page after the other, in scalar operations.

        The default knobs scan 100 pages every 20 ms.  After each sleep every
        distinct numpy operation meets cold caches and costs tens of
        microseconds whatever its size, which made a batch's fixed part the
        bulk of its cost; a hundred pages of the interpreter's scalar steps
        cost less.  The same steps as the vectorized path, page by page, as
        the kernel's cmp_and_merge_page: adopt a KSM page whose item is not on
        its node, take the item off its tree, gate on the checksum, merge.
        """
        pv = slot.table.pv
        st = slot.trees.stable
        state, node, old_sums = slot.state_v, slot.node_v, slot.checksum_v
        flat = self.frames.flat
        use_zero = max_sharing = -1
        recorded: list[int] | None = [] if self.count > 1 else None  # checksums recorded, claimed at the end
        for page in pages:
            pte = pv[page]
            pfn = pte & PFN_MASK
            s = state[page]
            if pte & KSM:
                nid = node[page]
                if s != STABLE or nid < 0 or st.kpfn_v[nid] != pfn:
                    self._adopt_ksm_page(slot, page, pfn)
                continue
            if s == UNSTABLE:
                self.pages_unshared -= 1
                state[page] = ITEM
            elif s == STABLE:
                self._leave_node(slot, page)
            key = _checksum(flat[pfn << 12:(pfn + 1) << 12])
            low = key & 0xFFFFFFFF
            old = old_sums[page]
            if old != low:
                old_sums[page] = low
                if recorded is not None:
                    recorded.append(low)
                if old:  # 0: a new item's, as the kernel's oldchecksum
                    state[page] = VOLATILE
                continue
            if use_zero < 0:
                use_zero = self._use_zero_pages(mitigation)
                max_sharing = self.system.get("max_page_sharing")
            self.cmp_and_merge_page(slot, page, pfn, key, use_zero, max_sharing)
        if recorded is not None:
            self._claim(np.array(recorded, np.uint32), len(pages) - len(recorded))

    def _use_zero_pages(self, mitigation: int) -> int:
        """Whether empty pages go to the zero page: use_zero_pages, or mitigation "domains".

        Under "domains" the trees are per domain, and the zero page is the one
        page every domain may share: merging empty pages tells nobody anything
        (Windows merges only those across its domains).
        """
        return self.system.get("use_zero_pages") or int(mitigation == MITIGATION_DOMAINS)

    def _merge_slow(self, slot: MmSlot, pages: list[int], pfns: list[int], keys: npt.NDArray[np.uint64],
                    use_zero: int, max_sharing: int) -> None:
        """cmp_and_merge_page for each page, content by content; pages that hit a stable dup with
        room are merged into it together (ksm.replace_pages): at the end of the batch when the
        dup has room for every page of their content left in it (nothing else in the
        batch can change that dup), else as soon as the first is met.

        The pages of one content go in their order.  Contents go one after the other, in
        the order of their first pages: what is done for one content (its dups, its
        unstable tree entry, its pages) is nothing another content reads, so that is the
        order of the pages as far as any outcome can tell, without a step per page for a
        content of many (the empty page's: thousands a batch)."""
        trees = slot.trees
        st = trees.stable
        _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
        by_content = np.argsort(inverse, kind="stable")
        ends = np.cumsum(counts)
        key_list = keys.tolist()
        end_index: list[int] = []  # pages merged at the end of the batch, and their nodes
        end_nid: list[int] = []
        pairs: list[tuple[int, int, int, MmSlot, int, int]] = []
        for u in np.argsort(first, kind="stable").tolist():
            indices = by_content[ends[u] - counts[u]:ends[u]].tolist()
            key = key_list[indices[0]]
            zero = use_zero and key == ZERO_CHECKSUM
            at, n = 0, len(indices)
            while at < n:
                nid = -1 if zero else self._stable_dup(st, key, max_sharing)
                if nid < 0:
                    i = indices[at]
                    at += 1
                    # Alone in the batch with a partner on the unstable tree: paired with
                    # the batch's other pairs at its end (no other page here has the content).
                    partner = self._unstable_partner(trees, key, pfns[i]) if n == 1 and not zero else None
                    if partner is not None:
                        pairs.append((pages[i], pfns[i], key, *partner))
                    else:
                        self.cmp_and_merge_page(slot, pages[i], pfns[i], key, use_zero, max_sharing)
                    continue
                group = indices[at:at + max_sharing - max(st.count_v[nid], self.frames.mc[st.kpfn_v[nid]])]
                at += len(group)
                if at == n:
                    end_index += group
                    end_nid += [nid] * len(group)
                else:
                    self._merge_into_stable(slot, [pages[j] for j in group], [pfns[j] for j in group],
                                            [nid] * len(group))
        if end_index:
            index = np.array(end_index, np.intp)
            order = np.argsort(index)
            index = index[order]
            self._merge_into_stable_bulk(slot, np.array(pages, np.int64)[index], np.array(pfns, np.int64)[index],
                                         np.array(end_nid, np.int64)[order])
        if pairs:
            self._merge_pairs(slot, pairs)

    def _unstable_partner(self, trees: Trees, key: int, pfn: int) -> tuple[MmSlot, int, int] | None:
        """The unstable tree's page for ``key``, if it can pair with frame ``pfn``: (slot, page, pfn)."""
        ref = trees.unstable.get(key)
        if ref < 0:
            return None
        tree_slot = self.by_gid.get(ref >> REF_SHIFT)
        tree_page = ref & REF_PAGE_MASK
        if tree_slot is None or tree_slot.state_v[tree_page] != UNSTABLE:
            return None
        tree_pte = tree_slot.table.pv[tree_page]
        tree_pfn = tree_pte & PFN_MASK
        if not is_private(tree_pte) or tree_pfn == pfn:
            return None
        return tree_slot, tree_page, tree_pfn

    def _merge_pairs(self, slot: MmSlot, pairs: list[tuple[int, int, int, MmSlot, int, int]]) -> None:
        """try_to_merge_two_pages for a batch's pairs (page, pfn, key, tree slot, tree page, tree pfn).

        The same steps, each pair on its own, grouped: every scanned page is
        made a KSM page in place under its guest's mm lock; then each tree
        guest's pages are merged into theirs (ksm.replace_pages) under its mm
        lock; a scanned page whose partner did not merge is unshared again.
        """
        table = slot.table
        kgens = [-1] * len(pairs)
        with table.mm_lock:
            ks = table.mergeable_indices([pair[0] for pair in pairs])
            gens = ksm.make_ksm_pages(table, [pairs[k][0] for k in ks], [pairs[k][1] for k in ks])
        for k, gen in zip(ks, gens, strict=True):
            kgens[k] = gen
        merged = [False] * len(pairs)
        by_tree: dict[int, list[int]] = {}
        for k, (_, pfn, key, tree_slot, _, _) in enumerate(pairs):
            if kgens[k] >= 0 and self._holds(pfn, key):
                by_tree.setdefault(tree_slot.gid, []).append(k)
        for group in by_tree.values():
            tree_table = pairs[group[0]][3].table
            group.sort(key=lambda k: pairs[k][4])
            with tree_table.mm_lock:
                ks = [group[i] for i in tree_table.mergeable_indices([pairs[k][4] for k in group])]
                done = ksm.replace_pages(tree_table, [pairs[k][4] for k in ks], [pairs[k][5] for k in ks],
                                         [pairs[k][1] for k in ks], [kgens[k] for k in ks])
            for k, ok in zip(ks, done, strict=True):
                merged[k] = ok
        done_ks = [k for k in range(len(pairs)) if merged[k]]
        nids = slot.trees.stable.new_nodes([pairs[k][2] for k in done_ks], [pairs[k][1] for k in done_ks],
                                     [kgens[k] for k in done_ks])
        self._append_many(slot, [pairs[k][0] for k in done_ks], nids)
        # The tree's entries stay: their items are not UNSTABLE any more, so a
        # lookup takes them for stale, and the contents are on the stable tree now.
        self.pages_unshared -= len(done_ks)
        appends: dict[int, tuple[MmSlot, list[int], list[int]]] = {}
        for k, nid in zip(done_ks, nids, strict=True):
            tree_slot = pairs[k][3]
            _, tree_pages, tree_nids = appends.setdefault(tree_slot.gid, (tree_slot, [], []))
            tree_pages.append(pairs[k][4])
            tree_nids.append(nid)
        for tree_slot, tree_pages, tree_nids in appends.values():
            self._append_many(tree_slot, tree_pages, tree_nids)
        for k, (page, *_) in enumerate(pairs):
            if kgens[k] >= 0 and not merged[k]:
                with table.mm_lock:
                    with_frames(break_ksm, table, page)

    def _merge_into_zero(self, slot: MmSlot, pages: list[int], pfns: list[int]) -> list[bool]:
        """replace_with_zero_page for pages (ascending) still mergeable; which merged."""
        table = slot.table
        merged = [False] * len(pages)
        with table.mm_lock:  # find_mergeable_vma
            keep = table.mergeable_indices(pages)
            done = ksm.replace_pages(table, [pages[k] for k in keep], [pfns[k] for k in keep],
                                     [ZERO_PFN] * len(keep), [0] * len(keep))
        for k, ok in zip(keep, done, strict=True):
            merged[k] = ok
        self.zero_merges += sum(done)
        return merged

    def _merge_into_stable_bulk(self, slot: MmSlot, pages: npt.NDArray[np.int64], pfns: npt.NDArray[np.int64],
                                nids: npt.NDArray[np.int64]) -> None:
        """_merge_into_stable for many pages (ascending), in chunks: lists of Python ints
        cost 36 bytes an element while they live, and the scanner's memory peaks here."""
        for c in range(0, len(pages), _MERGE_CHUNK):
            self._merge_into_stable(slot, pages[c:c + _MERGE_CHUNK].tolist(), pfns[c:c + _MERGE_CHUNK].tolist(),
                                    nids[c:c + _MERGE_CHUNK].tolist())

    def _merge_into_stable(self, slot: MmSlot, pages: list[int], pfns: list[int], nids: list[int]) -> None:
        """Merge pages[k] (ascending, mapping pfns[k]) into the KSM page of node nids[k]; append those that merged."""
        st = slot.trees.stable
        table = slot.table
        with table.mm_lock:  # merge only what is still mergeable (find_mergeable_vma)
            keep = table.mergeable_indices(pages)
            if len(keep) != len(pages):
                pages, pfns, nids = [pages[k] for k in keep], [pfns[k] for k in keep], [nids[k] for k in keep]
            merged = ksm.replace_pages(table, pages, pfns, [st.kpfn_v[nid] for nid in nids],
                                       [st.kgen_v[nid] for nid in nids])
        self._append_many(slot, [p for p, ok in zip(pages, merged, strict=True) if ok],
                          [nid for nid, ok in zip(nids, merged, strict=True) if ok])

    def cmp_and_merge_page(self, slot: MmSlot, page: int, pfn: int, key: int, use_zero: int, max_sharing: int) -> None:
        """The checksum of ``page`` is unchanged since the last visit: try to merge it."""
        table = slot.table
        if use_zero and key == ZERO_CHECKSUM:
            with ksm.mergeable_vma(table, page) as mergeable, table.ptl(page):
                if mergeable and ksm.replace_with_zero_page(table, page, pfn):
                    self.zero_merges += 1
                    return
        trees = slot.trees
        st = trees.stable
        if st.heads.get(key) >= 0:
            nid = self._stable_dup(st, key, max_sharing)
            if nid >= 0:
                if ksm.try_to_merge_one_page(table, page, pfn, st.kpfn_v[nid], st.kgen_v[nid], check_vma=True):
                    self._append(slot, page, nid)
                return
        ref = trees.unstable.get(key)
        if ref >= 0:
            tree_slot = self.by_gid.get(ref >> REF_SHIFT)
            tree_page = ref & REF_PAGE_MASK
            if tree_slot is not None and tree_slot.state_v[tree_page] == UNSTABLE:
                tree_pte = tree_slot.table.pv[tree_page]
                tree_pfn = tree_pte & PFN_MASK
                if not is_private(tree_pte) or tree_pfn == pfn:
                    return
                kpfn, kgen = ksm.try_to_merge_two_pages(table, page, pfn, tree_slot.table, tree_page, tree_pfn,
                                                        check_vma=True)
                if kpfn >= 0 and not self._holds(kpfn, key):
                    for t, p in ((table, page), (tree_slot.table, tree_page)):
                        with t.mm_lock:
                            with_frames(break_ksm, t, p)
                    return
                if kpfn >= 0:
                    # The tree's entry stays: its item is not UNSTABLE any more, so a
                    # lookup takes it for stale, and the content is on the stable tree now.
                    self.pages_unshared -= 1
                    tree_slot.state_v[tree_page] = ITEM
                    nid = st.new_node(key, kpfn, kgen)
                    self._append(tree_slot, tree_page, nid)
                    self._append(slot, page, nid)
                return
        trees.unstable.set(key, slot.gid << REF_SHIFT | page)
        slot.state_v[page] = UNSTABLE
        self.pages_unshared += 1

    def _holds(self, kpfn: int, key: int) -> bool:
        """Does the new KSM page ``kpfn`` (write-protected now) hold the content of ``key``?

        Its pages were hashed to ``key`` before they were write-protected: a
        guest may have written both to another content in between, equal
        still.  The kernel inserts a new KSM page by what it holds; here its
        node's key, and its mappings' owner (their checksums), would say
        ``key``, so such a pair is not merged: its pages go on as changed.
        """
        return _checksum(self.frames.flat[kpfn << 12:(kpfn + 1) << 12]) == key

    def _stable_dup(self, st: StableTree, key: int, max_sharing: int) -> int:
        """A live dup of content ``key`` with room for one more mapping, or -1.

        Walks the chain newest first (dups fill one at a time, so the newest is
        the one likely to have room) and prunes dups whose KSM page was freed.
        Room counts the KSM page's mappings too: after a restart, those not yet
        adopted into the node are mappings all the same.
        """
        gn, fl, mc = self.frames.gn, self.frames.fl, self.frames.mc
        kpfn_of, kgen_of, count, nxt = st.kpfn_v, st.kgen_v, st.count_v, st.next_v
        nid = st.heads.get(key)
        while nid >= 0:
            after = nxt[nid]
            if count[nid] < max_sharing:
                kpfn = kpfn_of[nid]
                if not (gn[kpfn] == kgen_of[nid] and fl[kpfn] & FRAME_KSM):
                    st.unlink(nid)  # its KSM page was freed; items leave when visited
                elif mc[kpfn] < max_sharing:
                    return nid
            nid = after
        return -1

    def _adopt_orphans(self, slot: MmSlot) -> None:
        """Give every KSM page this scanner owns in ``slot``, and that no node holds, its node now.

        A scanner restarted after a kill finds the KSM pages the dead one
        made in no tree.  Adopted only when first visited, a content whose
        unmerged pages came first would get a new KSM page beside the old
        one, and both would keep their mappings for good: more KSM pages
        than one scanner makes.  One mapping per page is adopted here; the
        others join its node when visited (room counts them already).
        """
        ptes = slot.table.ptes
        pages = np.flatnonzero((ptes & (_KSM | _ANON | _ZERO)) == (_KSM | _ANON))  # not the zero page
        if not len(pages):
            return
        pages = pages[self._owns(slot, pages)]
        # One mapping each: a page another guest's slot adopted already just gains that mapping.
        pfns, first = np.unique(ptes[pages] & _PFN, return_index=True)
        for page, pfn in zip(pages[first].tolist(), pfns.tolist(), strict=True):
            self._adopt_ksm_page(slot, page, pfn)

    def _adopt_ksm_page(self, slot: MmSlot, page: int, pfn: int) -> None:
        """A KSM mapping whose item is not on the page's node: append it there."""
        self._remove_from_tree(slot, np.array([page]))
        st = slot.trees.stable
        nid = st.node_of_pfn_v[pfn]
        if nid >= 0 and (self.frames.gn[pfn] != st.kgen_v[nid] or st.kpfn_v[nid] != pfn):
            st.unlink(nid)
            nid = -1
        if nid < 0:
            with slot.table.ptl(page):
                if slot.table.pv[page] & PFN_MASK != pfn:
                    return
                key = _checksum(self.frames.flat[pfn << 12:(pfn + 1) << 12])
                gen = int(self.frames.gn[pfn])
            nid = st.new_node(key, pfn, gen)
        self._append(slot, page, nid)

    # -- explain ------------------------------------------------------------------------------------

    def item_states(self, gid: int) -> npt.NDArray[np.uint8]:
        """Per page of guest ``gid``: its rmap item's state, with OVER_MAX_SHARING added to an
        unstable page whose content has KSM pages already, all full (it waits to pair into a new dup)."""
        slot = self.by_gid.get(gid)
        if slot is None:
            return np.zeros(self.system.table(gid).pages, np.uint8)
        states = slot.state.copy()
        waiting = np.flatnonzero(states == UNSTABLE)
        if len(waiting):
            ptes = slot.table.ptes[waiting]
            plain = (ptes & (_ANON_MASK | _KSM)) == _ANON
            waiting = waiting[plain]
            keys = checksums(self.frames.flat, (ptes[plain] & _PFN).astype(np.int64))
            heads = slot.trees.stable.heads.lookup(keys)
            full = [k for k in np.flatnonzero(heads >= 0).tolist()
                    if self._chain_full(slot.trees.stable, int(heads[k]))]
            states[waiting[full]] |= OVER_MAX_SHARING
        return states

    def _chain_full(self, st: StableTree, nid: int) -> bool:
        """Has every live dup of the chain from ``nid`` of ``st`` max_page_sharing mappings (and one at least)?"""
        max_sharing = self.system.get("max_page_sharing")
        live = False
        while nid >= 0:
            kpfn = st.kpfn_v[nid]
            if self.frames.gn[kpfn] == st.kgen_v[nid] and self.frames.fl[kpfn] & FRAME_KSM:
                if st.count_v[nid] < max_sharing:
                    return False
                live = True
            nid = st.next_v[nid]
        return live

    # -- run = 2 ------------------------------------------------------------------------------------

    def unmerge_all(self) -> int:
        """run=2: break every KSM mapping of every guest and free every rmap item; return mappings broken."""
        broken = 0
        for gid in self.system.live_guests():
            table = self.system.table(gid)
            with table.mm_lock:
                broken += unmerge_range(table, 0, table.pages)
        for slot in list(self.by_gid.values()):
            self._remove_items(slot, np.flatnonzero(slot.state))
            slot.publish(self.index)
        self.trees = {}
        for slot in self.by_gid.values():
            slot.trees = self._trees(slot.partition)
        self.pages_shared = self.pages_sharing = self.pages_unshared = 0
        self.full_scans = 0
        self.slots = []
        self.pass_pending = True
        self.publish()
        return broken

    # -- the scan-time advisor -----------------------------------------------------------------------

    def _scan_time_advisor(self) -> None:
        """Adapt pages_to_scan so a full scan takes advisor_target_scan_time (scan_time_advisor)."""
        get = self.system.get
        scan_time = max(1e-3, time.monotonic() - self.scan_started)
        cpu = time.process_time() - self.scan_cpu_started
        cpu_percent = max(1.0, 100.0 * cpu / scan_time)
        factor = max(1.0, get("advisor_target_scan_time") * 100.0 / scan_time)
        change = self.advisor_scan_time_ewma
        pages = get("pages_to_scan") * 100.0 / factor * change / 100.0
        per_page_cost = max(1.0, get("pages_to_scan") / cpu_percent)
        pages = min(pages, per_page_cost * get("advisor_max_cpu"))
        pages = max(pages, per_page_cost * 10, get("advisor_min_pages_to_scan"))
        pages = min(pages, get("advisor_max_pages_to_scan"))
        self.system.set("pages_to_scan", int(pages))

    # -- counters -------------------------------------------------------------------------------------

    def publish(self) -> None:
        """Write the counters to this scanner's entry and fold the entries into the
        named words (the scanners are their only writers).  Takes the stat lock."""
        w = self.words
        # full_scans first: a reader never sees a pass's last merges under the
        # previous pass number (the kernel counts the pass after its last page).
        w.set("full_scans", self.full_scans)
        w.set("pages_shared", self.pages_shared)
        w.set("pages_sharing", self.pages_sharing)
        w.set("pages_unshared", self.pages_unshared)
        w.set("pages_scanned", self.pages_scanned)
        w.set("pages_skipped", self.pages_skipped)
        w.set("stable_node_chains", sum(t.stable.chains for t in self.trees.values()))
        w.set("stable_node_dups", sum(t.stable.dups for t in self.trees.values()))
        w.set("rmap_items", self.rmap_items)
        w.fold()
        for slot in self.slots:
            slot.publish(self.index)


__all__ = ["RMAP_ITEM_BYTES", "ZERO_CHECKSUM", "Scanner"]
