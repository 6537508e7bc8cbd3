"""KSM (private): the merge primitives, ksmd's scanner and its tables, the sysfs knobs and counters.

Imports only :mod:`shmksm._mm` and :mod:`shmksm.errors`.
"""
