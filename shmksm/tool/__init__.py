"""The engines of the ``shmksm`` command: image reading, runs, experiments, plots, clusters.

Built on the public API (:class:`shmksm.Machine`); the command line itself is
:mod:`shmksm.cli`.
"""
