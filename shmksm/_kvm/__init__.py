"""Secondary MMUs (private): the notifier broker, the shadow worker's algorithm, and the host's handle on it.

Imports only :mod:`shmksm._mm` and :mod:`shmksm.errors`.
"""
