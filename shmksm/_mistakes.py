"""First-day mistakes, caught before they turn into pages of tracebacks.

Three things a newcomer's first script gets wrong, each answered with one
line that says what to do instead:

* A ``Machine`` made at the top level of the main script, without
  ``if __name__ == "__main__":``.  Workers start by the forkserver or spawn
  method, so each worker imports the main script again (as ``__mp_main__``)
  and would make a machine of its own, which starts workers of its own...
  The host sees it in the script's source before it creates anything
  (:func:`refuse_unguarded_main`); a worker that gets there anyway (no source
  to read) says the same line and exits with :data:`REIMPORTED_MAIN_EXIT`
  before it creates anything (:func:`refuse_in_reimported_main`), and the
  host names the reason from that exit code.
* A machine larger than the host: the figures asked and had, instead of
  ``OSError: [Errno 12]`` (:func:`check_host_memory`).
* ``machine.spawn(lambda view: ...)``: ``fn`` must be a function that a new
  process can find by module and name (:func:`check_spawnable`).
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from ._mm.frames import PAGE_SIZE, meta_size
from .errors import HostMemoryError, UsageError

REIMPORTED_MAIN_EXIT = 86  # a worker's exit status: it found its main script making a Machine


def _main_frame(name: str) -> FrameType | None:
    """The outermost frame running the top level of the module called ``name`` (``__main__``,
    ``__mp_main__``), if any: the script's own, not that of code it exec'd."""
    frame: FrameType | None = sys._getframe(1)
    found = None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == name:
            found = frame
        frame = frame.f_back
    return found


def reimported_main_message(script: str) -> str:
    """The one line for a Machine made while ``script`` runs at its top level."""
    return (f"Machine() runs at the top level of {script}, and each worker process imports that file again: "
            f"put the code that makes and uses the machine under 'if __name__ == \"__main__\":'")


def refuse_in_reimported_main() -> None:
    """In a worker importing the main script again: say the one line and exit before creating anything."""
    frame = _main_frame("__mp_main__")  # the name multiprocessing imports the main script under in a worker
    if frame is None:
        return
    sys.stderr.write(f"shmksm: {reimported_main_message(frame.f_code.co_filename)}\n")
    sys.stderr.flush()
    os._exit(REIMPORTED_MAIN_EXIT)


def _guarded(statements: list[ast.stmt], line: int) -> bool | None:
    """Whether ``line`` of these statements runs under an ``if`` that tests ``__name__`` (None: not found)."""
    for stmt in statements:
        if not stmt.lineno <= line <= (stmt.end_lineno or stmt.lineno):
            continue
        if isinstance(stmt, ast.If) and any(isinstance(n, ast.Name) and n.id == "__name__"
                                            for n in ast.walk(stmt.test)):
            return True
        bodies = [getattr(stmt, field, None) for field in ("body", "orelse", "finalbody")]
        bodies += [h.body for h in getattr(stmt, "handlers", [])]
        for body in bodies:
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                inner = _guarded(body, line)
                if inner is not None:
                    return inner
        return False
    return None


def refuse_unguarded_main(start_method: str | None) -> None:
    """In the host: UsageError if a Machine is being made by the main script's unguarded top level.

    Only where workers import the main script again (not ``fork``), and only
    when its source says so for sure: a guard of any shape that tests
    ``__name__`` counts.
    """
    if start_method == "fork" or multiprocessing.parent_process() is not None:
        return
    main = sys.modules.get("__main__")
    main_path = getattr(main, "__file__", None)
    if getattr(getattr(main, "__spec__", None), "name", None) is None and main_path is not None:
        # What multiprocessing's spawn gives each worker to import again: a path that is no file
        # ("<stdin>": a program piped to python) makes every worker fail as it starts.
        full = os.path.join(multiprocessing.process.ORIGINAL_DIR or "", main_path)  # type: ignore[attr-defined]
        if not os.path.isfile(full):
            raise UsageError(f"Machine() runs in a program that is not a file ({main_path!r}, as python reads "
                             f"standard input): each worker process imports the main program again and could "
                             f"not; save it to a file, with the machine under 'if __name__ == \"__main__\":'")
    frame = _main_frame("__main__")
    path = frame.f_code.co_filename if frame is not None else ""
    if frame is None or not path.endswith(".py"):
        return
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return
    if _guarded(tree.body, frame.f_lineno) is False:
        raise UsageError(reimported_main_message(path))


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the figure at or above 1."""
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def check_host_memory(frames: int) -> None:
    """HostMemoryError if a pool of ``frames`` cannot fit in /dev/shm or in the host's memory."""
    need = frames * PAGE_SIZE + meta_size(frames)
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > min(free, ram):
        raise HostMemoryError(host_memory_message(frames))


def host_memory_message(frames: int) -> str:
    """How much a machine of ``frames`` asks and what this host has."""
    need = frames * PAGE_SIZE + meta_size(frames)
    try:
        free = _size(shutil.disk_usage("/dev/shm").free)
    except OSError:
        free = "unknown"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (f"Machine(frames={frames}) needs {_size(need)} of shared memory ({PAGE_SIZE} bytes a frame and its "
            f"metadata), but this host has {_size(ram)} of RAM and {free} free in /dev/shm: give fewer frames")


def check_spawnable(fn: Callable[..., Any]) -> None:
    """UsageError unless a new process can find ``fn`` by its module and name (as pickle does)."""
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        raise UsageError(f"spawn: fn must be a module-level function of a file, not {fn.__qualname__} of "
                         "python -c or an interactive session: the worker is a new process that imports fn "
                         "by its module and name, and this __main__ has no file to import")
    try:
        pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError):
        name = getattr(fn, "__qualname__", repr(fn))
        raise UsageError(f"spawn: fn must be a module-level function (a def at the top level of a module), not "
                         f"{name}: the worker is a new process that imports fn by its module and name, and a "
                         "lambda or a nested function has none") from None
