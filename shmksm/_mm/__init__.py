"""The emulated memory-management core (private): segments, locks, frames, page tables, notifiers.

Imports nothing above it: neither :mod:`shmksm._ksm`, :mod:`shmksm._kvm` nor
the public face.
"""
