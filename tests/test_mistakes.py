"""A newcomer's first scripts: each mistake answered by one clear line, nothing left behind, no warnings.

Each script runs as a real ``python`` process, as a newcomer would run it;
the autouse fixture then checks that /dev/shm is as it was.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import shmksm
from shmksm.errors import HostMemoryError, UsageError

GUARD = "if __name__ == \"__main__\":"
NOISE = ("resource_tracker", "leaked", "KeyError", "RuntimeError", "bootstrapping", "Warning")

UNGUARDED = """
import shmksm

def workload(view):
    view.write(0, b"A" * view.size)

machine = shmksm.Machine(frames=1024)
guest = machine.add_guest(pages=16)
machine.spawn(workload, guest).join()
print("done", machine.ksm.counters()["pages_shared"])
machine.close()
"""

GUARDED = """
import shmksm

def workload(view):
    view.write(0, b"A" * view.size)

if __name__ == "__main__":
    with shmksm.Machine(frames=1024) as machine:
        guest = machine.add_guest(pages=16)
        machine.spawn(workload, guest).join()
        print("done")
"""

TOO_BIG = """
import shmksm

if __name__ == "__main__":
    with shmksm.Machine(frames=10**12) as machine:
        print("made")
"""

LAMBDA = """
import shmksm

if __name__ == "__main__":
    with shmksm.Machine(frames=1024) as machine:
        guest = machine.add_guest(pages=4)
        machine.spawn(lambda view: view.write(0, b"x"), guest).join()
"""


def run_script(tmp_path: Path, source: str, name: str = "first.py") -> subprocess.CompletedProcess[str]:
    script = tmp_path / name
    script.write_text(source)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)


def assert_short_and_clear(proc: subprocess.CompletedProcess[str], *fragments: str, lines: int = 10) -> str:
    """Exit 1, at most ``lines`` lines of output, every fragment said, none of the old noise."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert len(out.splitlines()) <= lines, out
    for fragment in fragments:
        assert fragment in out, out
    for noise in NOISE:
        assert noise not in out, out
    return out


def test_a_machine_at_the_top_level_of_a_script_is_refused_with_the_fix(tmp_path: Path) -> None:
    proc = run_script(tmp_path, UNGUARDED)
    out = assert_short_and_clear(proc, "UsageError", "first.py", GUARD)
    assert "done" not in out
    error_lines = [line for line in out.splitlines() if GUARD in line]
    assert len(error_lines) == 1  # one line: the host's, before any worker ran


def test_a_worker_that_imports_the_unguarded_script_says_the_same_line(tmp_path: Path) -> None:
    """Without a .py source to read, the host cannot tell in advance: the workers say it, and the host too."""
    proc = run_script(tmp_path, UNGUARDED, name="first")
    out = assert_short_and_clear(proc, "ProcessDied", GUARD, lines=12)
    said = [line for line in out.splitlines() if GUARD in line]
    assert any(line.startswith("shmksm: Machine() runs at the top level of") for line in said), out  # a worker
    assert any("exited at start" in line for line in said), out  # the host


def test_a_program_piped_to_python_is_refused_before_any_worker_fails(tmp_path: Path) -> None:
    """``python - < script``: the workers could not import the main program again (it is no file)."""
    proc = subprocess.run([sys.executable, "-"], input=GUARDED, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)
    out = assert_short_and_clear(proc, "UsageError", "standard input", "save it to a file")
    assert "done" not in out and "FileNotFoundError" not in out


def test_the_guarded_script_runs(tmp_path: Path) -> None:
    proc = run_script(tmp_path, GUARDED)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert proc.stderr == ""


def test_a_machine_larger_than_the_host_says_how_much_was_asked_and_what_there_is(tmp_path: Path) -> None:
    proc = run_script(tmp_path, TOO_BIG)
    out = assert_short_and_clear(proc, "HostMemoryError", "frames=1000000000000", "PiB", "of RAM", "/dev/shm")
    assert "made" not in out and "Errno" not in out


def test_host_memory_error_is_a_memory_error_and_a_usage_error() -> None:
    with pytest.raises(HostMemoryError, match=r"needs .* of shared memory") as caught:
        shmksm.Machine(frames=10**12)
    assert isinstance(caught.value, MemoryError) and isinstance(caught.value, UsageError)


def test_spawning_a_lambda_says_fn_must_be_a_module_level_function(tmp_path: Path) -> None:
    assert_short_and_clear(run_script(tmp_path, LAMBDA), "module-level function", "<lambda>", "new process")


def _nested_workload_factory() -> object:
    def workload(view: shmksm.GuestView) -> None:
        view.write(0, b"x")

    return workload


def _write(view: shmksm.GuestView, data: object) -> None:
    view.write(0, data)  # type: ignore[arg-type]


def test_spawn_refuses_what_a_new_process_cannot_import_and_the_machine_goes_on(machine: shmksm.Machine) -> None:
    guest = machine.add_guest(pages=2)
    with pytest.raises(UsageError, match=r"module-level function.*workload"):
        machine.spawn(_nested_workload_factory(), guest)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"arguments of .* must pickle"):
        machine.spawn(_write, guest, lambda: None)
    assert machine.spawn(_write, guest, b"ok").join() is None
    assert guest.view().read(0, 2) == b"ok"
