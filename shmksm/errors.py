"""The exceptions of shmksm.

Every error that shmksm raises on purpose derives from :class:`ShmksmError`,
and also from the builtin exception a Python programmer would expect, so that
``except MemoryError`` or ``except ValueError`` keep working::

    ShmksmError
     ├── UsageError (ValueError)             bad argument: size, advice, data
     │    ├── HostMemoryError (MemoryError)  a machine larger than the host's memory
     │    ├── AddressError (IndexError)      address outside the guest
     │    ├── KnobError                      a knob value the kernel refuses (EINVAL)
     │    └── DataTypeError (TypeError)      data that is not bytes-like
     ├── SegmentationFault (IndexError)      access to an unmapped range
     ├── KnobBusyError (OSError)             a knob the kernel refuses now (EBUSY)
     ├── OutOfFrames (MemoryError)           the frame pool is exhausted
     ├── ProcessDied (ChildProcessError)     a worker process died
     ├── LockTimeout (TimeoutError)          a host call waited its bound for a lock (a stopped holder)
     ├── CheckError (AssertionError)         machine.check() found a broken invariant
     └── InternalError (RuntimeError)        "this should never happen"

Errors that reach a user of the command line print as one line and carry the
exit code: 2 for usage errors, 1 for everything else (click's convention).
"""

from __future__ import annotations

import errno


class ShmksmError(Exception):
    """Root of every error shmksm raises on purpose."""

    exit_code = 1


class UsageError(ShmksmError, ValueError):
    """An argument that can never be right (the kernel's EINVAL)."""

    exit_code = 2


class HostMemoryError(UsageError, MemoryError):
    """A machine whose frame pool the host cannot hold (its RAM, or /dev/shm)."""


class AddressError(UsageError, IndexError):
    """An address or length outside the guest's address space."""


class KnobError(UsageError):
    """A knob value that the kernel refuses with EINVAL."""


class DataTypeError(UsageError, TypeError):
    """Data that is not bytes-like (bytes, bytearray, memoryview, ndarray)."""


class SegmentationFault(ShmksmError, IndexError):
    """An access to a range that was unmapped (the kernel sends SIGSEGV)."""


class KnobBusyError(ShmksmError, OSError):
    """A knob that cannot change now, as the kernel's EBUSY."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)

    def __str__(self) -> str:
        return str(self.args[1])


class OutOfFrames(ShmksmError, MemoryError):
    """No free frame is left in the pool, even after reclamation.

    ``written``: for a guest's write that ran out part way, how many of its
    bytes landed, as a short write(2) reports: every byte before
    ``addr + written``, none after.  None when nothing was being written.
    """

    def __init__(self, message: str, written: int | None = None) -> None:
        super().__init__(message)
        self.written = written

    def __reduce__(self) -> tuple[type[OutOfFrames], tuple[str, int | None]]:
        return type(self), (str(self), self.written)


class ProcessDied(ShmksmError, ChildProcessError):
    """A worker process of the machine died or failed."""


class LockTimeout(ShmksmError, TimeoutError):
    """A host call did not get a lock within its bound: its holder does not go on (stopped, not dead)."""


class CheckError(ShmksmError, AssertionError):
    """machine.check() found a broken invariant; the message names the first."""


class InternalError(ShmksmError, RuntimeError):
    """An invariant of shmksm itself is broken: this should never happen."""
