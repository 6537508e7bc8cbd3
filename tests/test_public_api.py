"""The package's shape: layers that import only downwards, no cycles, a documented public face."""

from __future__ import annotations

import ast
import inspect
import itertools
import re
import tomllib
from pathlib import Path

import pytest

import shmksm

ROOT = Path(__file__).resolve().parent.parent

# Each module's layer; a module imports only from lower layers, or from its own package.
LAYERS: list[tuple[str, int]] = [
    ("shmksm.errors", 0),
    ("shmksm._mm", 1),
    ("shmksm._ksm", 2),
    ("shmksm._kvm", 2),
    ("shmksm.workers.ksmd", 3),
    ("shmksm.workers.broker", 3),
    ("shmksm.workers.shadow", 3),
    ("shmksm.guest", 4),
    ("shmksm._mistakes", 4),  # first-day mistakes, which the machine checks
    ("shmksm.machine", 5),
    ("shmksm", 6),
    ("shmksm.tool.images", 7),  # image formats: the guests' image loader reads them too
    ("shmksm.workers", 8),  # the guests' workloads
    ("shmksm.tool", 9),
    ("shmksm.testing", 9),
    ("shmksm.cli", 10),
    ("shmksm.__main__", 11),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "shmksm").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__")] = path
    for path in sorted((ROOT / "workers").glob("*.py")):
        name = "shmksm.workers" if path.stem == "__init__" else f"shmksm.workers.{path.stem}"
        out[name] = path
    return out


def _layer(module: str) -> tuple[int, str]:
    best = max((prefix for prefix, _ in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return dict(LAYERS)[best], best


def _imports(module: str, path: Path) -> set[str]:
    """The shmksm modules that ``module`` imports, at any depth of its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    modules = _modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from package import module" imports the module; "from module import name", the module.
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {name for name in found if name in modules and name != module}


def test_imports_only_go_down() -> None:
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        mine, my_package = _layer(module)
        for target in _imports(module, path):
            theirs, their_package = _layer(target)
            if theirs > mine or (theirs == mine and their_package != my_package):
                wrong.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: _imports(m, p) for m, p in modules.items()}
    # Importing a package runs its __init__: a submodule implies its parents.
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycle = [*stack[stack.index(node):], node]
            if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in itertools.pairwise(cycle)):
                pytest.fail("import cycle: " + " -> ".join(cycle))
            return
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node])
        done.add(node)

    for module in graph:
        visit(module, [])


def test_only_shmksm_is_installed_at_the_top_level() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "shmksm" or p.startswith("shmksm.") for p in config["packages"])
    assert config["package-dir"] == {"shmksm.workers": "workers"}


def test_every_public_name_is_documented() -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", api))
    assert set(shmksm.__all__) <= listed, f"not in docs/api.md: {sorted(set(shmksm.__all__) - listed)}"
    for name in shmksm.__all__:
        obj = getattr(shmksm, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"shmksm.{name} has no docstring"


@pytest.mark.parametrize("cls", [shmksm.Machine, shmksm.Guest, shmksm.GuestView, shmksm.Worker],
                         ids=lambda c: c.__name__)
def test_every_public_method_has_a_docstring(cls: type) -> None:
    missing = [name for name, member in vars(cls).items()
               if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property))
               and not inspect.getdoc(member)]
    assert not missing, f"{cls.__name__}: {missing}"


def test_examples_use_only_the_public_api() -> None:
    for path in sorted((ROOT / "examples").glob("*.py")):
        private = [m for m in _imports_of_file(path) if any(part.startswith("_") for part in m.split("."))]
        assert not private, f"{path.name} imports the private core: {private}"


def _imports_of_file(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {m for m in found if m == "shmksm" or m.startswith("shmksm.")}
