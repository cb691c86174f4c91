"""Every module of lav2 imports on its own, every third-party module lav2 and its tests import is declared in
setup.py, and lav2's imports, lazy ones included, form no circle (DESIGN.md §2).

A module imports in a fresh interpreter, so what another module happened to import first cannot hide a missing
dependency or a circle. Modules are found with pkgutil and imports read with ast: a new module or import is
covered with no change here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lav2

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(lav2.__path__, "lav2."))
LOCAL = {"lav2", "tests", "conftest"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


def _distribution(requirement: str) -> str:
    return _normal(re.match(r"[A-Za-z0-9._-]+", requirement)[0])


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    """install_requires and extras_require of setup.py, as normalised distribution names, read without running it."""
    call = next(node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires",
                                                                                      "extras_require")}
    extras = {name: {_distribution(r) for r in reqs} for name, reqs in keywords.get("extras_require", {}).items()}
    return {_distribution(r) for r in keywords.get("install_requires", [])}, extras


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(module, lazy, line) for every import in `path` that can run; lazy means inside a function.

    Relative imports and those under `if TYPE_CHECKING:` (never run) are skipped.
    """
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(ast.Module(body=child.orelse, type_ignores=[]), lazy)
            elif isinstance(child, ast.Import):
                found.extend((alias.name, lazy, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, lazy, child.lineno))
                # `from lav2 import download`: the imported names may be submodules
                found.extend((f"{child.module}.{alias.name}", lazy, child.lineno) for alias in child.names)
            else:
                visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _third_party(path: Path) -> list[tuple[str, bool, int]]:
    top = {(name.split(".")[0], lazy, line) for name, lazy, line in _imports(path)}
    return sorted(t for t in top if t[0] not in sys.stdlib_module_names and t[0] not in LOCAL)


@pytest.mark.parametrize("module", ["lav2", *MODULES])
def test_module_imports_alone_in_a_fresh_interpreter(module: str):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]


def test_every_third_party_import_is_declared_in_setup_py():
    required, extras = _declared()
    optional = set().union(*(reqs for name, reqs in extras.items() if name != "test"))
    owners = {module: {_normal(d) for d in dists}
              for module, dists in importlib.metadata.packages_distributions().items()}
    problems = []
    for path in sorted((ROOT / "lav2").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        in_tests = path.parent.name == "tests"
        for module, lazy, line in _third_party(path):
            allowed = required | (set().union(*extras.values()) if in_tests else optional if lazy else set())
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if module not in owners:
                problems.append(f"{where}, which no installed distribution provides")
            elif not owners[module] & allowed:
                need = "install_requires" if not lazy and not in_tests else "install_requires or an extra"
                problems.append(f"{where} ({', '.join(sorted(owners[module]))}): declare it in setup.py {need}")
    assert not problems, problems


def test_lav2_imports_form_no_circle():
    """Module-level and lazy imports alike: data flows one way, cli -> workflows -> checkpoint/data -> model."""
    graph = {module: {name for name, _, _ in _imports(Path(importlib.util.find_spec(module).origin))
                      if name in MODULES and name != module} for module in MODULES}
    done: set[str] = set()

    def circle(module: str, trail: list[str]) -> list[str] | None:
        if module in trail:
            return trail[trail.index(module):] + [module]
        if module not in done:
            for target in sorted(graph[module]):
                if found := circle(target, trail + [module]):
                    return found
            done.add(module)
        return None

    for module in MODULES:
        if found := circle(module, []):
            pytest.fail("import circle: " + " -> ".join(found))
