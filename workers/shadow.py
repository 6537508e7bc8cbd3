"""Shadow worker entry point: one secondary MMU and its vCPU.

The host starts it with ``machine.add_shadow()``; the algorithm — shadow
tables, callbacks in bulk, the fault path — is :mod:`shmksm._kvm.shadow`.
"""

from __future__ import annotations

from shmksm._kvm.shadow import shadow

__all__ = ["shadow"]
