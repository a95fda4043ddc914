"""The compiled hot path (setup.py, lb/compiled.py): built, used, and left for the .py
files when they changed or when PYLB_PURE=1 asks for them.

`make test` also runs the data-plane tests a second time with PYLB_PURE=1 (see the
Makefile), so the pure-Python fallback stays tested end to end.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lb import compiled

REPO = Path(__file__).resolve().parent.parent
LB = REPO / "lb"


def _pxd_fields(name: str) -> dict[str, set[str]]:
    """Fields each cdef class of lb/NAME.pxd declares (its own, not its bases')."""
    fields: dict[str, set[str]] = {}
    current = None
    for line in (LB / f"{name}.pxd").read_text().splitlines():
        match = re.match(r"cdef class (\w+)", line)
        if match:
            current = fields.setdefault(match.group(1), set())
            continue
        match = re.match(r"    cdef (?:public |readonly )?[\w\[\]: ]+ (\w+)\s*(#.*)?$", line)
        if match and current is not None:
            current.add(match.group(1))
    return fields


def _assigned(name: str) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """Attributes each class of lb/NAME.py assigns on self or lists in __slots__, and the
    bases of each class."""
    tree = ast.parse((LB / f"{name}.py").read_text())
    assigned: dict[str, set[str]] = {}
    bases: dict[str, list[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        names = assigned.setdefault(node.name, set())
        bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
        for item in ast.walk(node):
            targets: list[ast.expr] = []
            if isinstance(item, ast.Assign):
                targets = item.targets
            elif isinstance(item, (ast.AnnAssign, ast.AugAssign)):
                targets = [item.target]
            for target in targets:
                for element in ast.walk(target):
                    if (
                        isinstance(element, ast.Attribute)
                        and isinstance(element.value, ast.Name)
                        and element.value.id == "self"
                    ):
                        names.add(element.attr)
            if (
                isinstance(item, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets)
            ):
                try:
                    names.update(ast.literal_eval(item.value))
                except ValueError:  # computed (`(*FIELDS, ...)`): ask the module itself
                    names.update(getattr(_from_source(name), node.name).__slots__)
    return assigned, bases


def _from_source(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_from_source", LB / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", compiled.HOT)
def test_every_attribute_is_declared_for_the_compiled_build(name: str) -> None:
    """An attribute added to a hot class must be declared in its .pxd too (the compiled
    build would fail on it), and a declared one must still exist."""
    declared = _pxd_fields(name)
    assigned, bases = _assigned(name)

    def inherited(cls: str) -> set[str]:
        own = set(declared.get(cls, set()))
        for base in bases.get(cls, []):
            own |= inherited(base)
        return own

    for cls in declared:
        assert cls in assigned, f"lb/{name}.pxd declares {cls}, which lb/{name}.py lacks"
        missing = assigned[cls] - inherited(cls)
        assert not missing, f"lb/{name}.pxd: {cls} lacks {sorted(missing)}"
        family = {cls} | {c for c in assigned if cls in bases.get(c, [])}
        used = set().union(*(assigned[c] for c in family))
        assert declared[cls] <= used, f"lb/{name}.pxd: {cls} declares unused {declared[cls] - used}"


COMPILED = f"compiled ({', '.join(compiled.HOT)})"


def _status(env: dict[str, str], path: Path = REPO) -> str:
    """How the hot path runs in a new process, then the files of its modules."""
    code = (
        "import importlib\n"
        "from lb import compiled\n"
        "print(compiled.status())\n"
        "print(*(importlib.import_module('lb.' + n).__file__ for n in compiled.HOT))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=path, env={**os.environ, "PYTHONPATH": str(path), **env},
        capture_output=True, text=True, check=True,
    ).stdout


def test_the_hot_path_runs_compiled() -> None:
    """`make` builds it (gcc and the Python headers are among the tools it installs)."""
    out = _status({"PYLB_PURE": ""})
    assert out.startswith(COMPILED), (
        f"the hot path is not compiled here: {out.strip()} (run make)"
    )
    assert ".py " not in out + " "


def test_pylb_pure_runs_the_python_files() -> None:
    out = _status({"PYLB_PURE": "1"})
    assert out.startswith("pure Python (PYLB_PURE is set)")
    assert all(path.endswith(".py") for path in out.split()[-len(compiled.HOT) :])


def test_an_edited_source_runs_as_python_until_compiled_again(tmp_path: Path) -> None:
    shutil.copytree(LB, tmp_path / "lb", ignore=shutil.ignore_patterns("__pycache__"))
    if not (tmp_path / "lb" / "_compiled.json").exists():
        pytest.fail("the hot path is not compiled here (run make)")
    with open(tmp_path / "lb" / "h1.py", "a") as source:
        source.write("\n# edited\n")
    out = _status({"PYLB_PURE": ""}, tmp_path)
    assert out.startswith("pure Python (lb/h1.py changed since compiled (make))"), out
    # All or nothing: the compiled modules' types refer to each other.
    assert all(path.endswith(".py") for path in out.split()[-len(compiled.HOT) :]), out


def test_pylb_says_how_its_hot_path_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bin" / "pylb"), "-vv"], capture_output=True, text=True,
        check=True, env={**os.environ, "PYLB_PURE": ""},
    ).stdout
    assert f"Hot path: {COMPILED}" in out


@pytest.mark.parametrize("pure", ["", "1"], ids=["compiled", "python"])
def test_the_in_process_benchmark_still_drives_a_session(pure: str) -> None:
    """bench/micro.py feeds a session by hand: it must keep matching the session."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "micro.py"), "--requests", "300", "--rounds", "1"],
        capture_output=True, text=True, env={**os.environ, "PYLB_PURE": pure}, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "us/request" in out.stdout
    assert ("pure Python" in out.stdout) == bool(pure)
