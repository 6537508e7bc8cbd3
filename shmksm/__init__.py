"""shmksm: Linux KSM and MMU notifiers, emulated with real processes and real shared memory."""

from ._ksm.explain import Explanation
from ._mm.frames import PAGE_SIZE
from .errors import (
                     AddressError,
                     CheckError,
                     DataTypeError,
                     HostMemoryError,
                     InternalError,
                     KnobBusyError,
                     KnobError,
                     LockTimeout,
                     OutOfFrames,
                     ProcessDied,
                     SegmentationFault,
                     ShmksmError,
                     UsageError,
)
from .guest import MADV_MERGEABLE, MADV_UNMERGEABLE, GuestView
from .machine import Death, Guest, Machine, Worker

__version__ = "0.1.0"

__all__ = [
    "AddressError", "CheckError", "DataTypeError", "Death", "Explanation", "Guest", "GuestView",
    "HostMemoryError", "InternalError",
    "KnobBusyError", "KnobError", "LockTimeout", "MADV_MERGEABLE", "MADV_UNMERGEABLE", "Machine", "OutOfFrames",
    "PAGE_SIZE", "ProcessDied", "SegmentationFault", "ShmksmError", "UsageError", "Worker",
]
