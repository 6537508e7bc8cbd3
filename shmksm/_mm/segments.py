"""Shared-memory segments: one owner creates and unlinks, everyone else attaches.

Segment names are ``shmksm_<hostpid>_<token>_<what>``: the host's pid lets
:func:`cleanup_stale` tell a dead host's leftovers from a live machine's.

Python before 3.13 registers even an *attach* with the resource tracker
(CPython gh-82300): a process that merely attached, and whose tracker is not
the creator's, would unlink the segment at exit while others still use it.
:func:`attach` therefore keeps attaches out of the tracker on every Python.
The creator's registration is kept on purpose: if the host is killed with
SIGKILL, its resource tracker (which outlives it) unlinks what it created.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker, shared_memory

PREFIX = "shmksm_"
SHM_DIR = "/dev/shm"


def create(name: str, size: int) -> shared_memory.SharedMemory:
    """Create a new segment of ``size`` bytes, mode 0600, zero-filled.

    It is registered with the resource tracker once it exists: a creation
    that fails (ENOMEM) would otherwise unregister a name never registered,
    and the tracker print a KeyError traceback at exit.
    """
    with _untracked():
        segment = shared_memory.SharedMemory(name=name, create=True, size=max(size, 1))
    resource_tracker.register(segment._name, "shared_memory")  # type: ignore[attr-defined]
    return segment


@contextmanager
def _untracked() -> Iterator[None]:
    noop = types.SimpleNamespace(register=lambda *a: None, unregister=lambda *a: None)
    setattr(shared_memory, "resource_tracker", noop)  # noqa: B010 - the stubs do not list it
    try:
        yield
    finally:
        setattr(shared_memory, "resource_tracker", resource_tracker)  # noqa: B010


def attach(name: str) -> shared_memory.SharedMemory:
    """Attach to an existing segment without registering it for unlinking."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    with _untracked():
        return shared_memory.SharedMemory(name=name)


def unlink(segment: shared_memory.SharedMemory) -> None:
    """Close and unlink a segment this process created; a missing one is fine."""
    try:
        segment.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and is not a zombie (a killed child not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stale_segments() -> list[str]:
    """Names in /dev/shm left by shmksm hosts that no longer run."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    stale = []
    for entry in entries:
        if not entry.startswith(PREFIX):
            continue
        pid_text = entry[len(PREFIX):].split("_", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            stale.append(entry)
    return sorted(stale)


def cleanup_stale() -> list[str]:
    """Unlink the segments of dead hosts; return the names removed."""
    removed = []
    for name in stale_segments():
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed
