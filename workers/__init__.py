"""Process entry points: guest workloads, ksmd, the broker and the shadow workers (``shmksm.workers``)."""
