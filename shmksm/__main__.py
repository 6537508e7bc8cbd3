"""``python -m shmksm``: the same as the ``shmksm`` command."""

from .cli import console_main

console_main()
