"""``python -m shmksm``: the same as the ``shmksm`` command."""

from .cli import console_main

# Guarded: a worker process imports the main module again, and must not run the command.
if __name__ == "__main__":
    console_main()
