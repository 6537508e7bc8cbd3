"""Broker entry point: the notifier broker, fanning events out to shadow workers.

The host starts it with ``machine.start_broker()`` (``add_shadow`` does it
too); the algorithm is :mod:`shmksm._kvm.broker`.
"""

from __future__ import annotations

from shmksm._kvm.broker import broker

__all__ = ["broker"]
