"""Which of pylb's hot modules run compiled, and the way back to pure Python.

setup.py compiles the modules in HOT with Cython, next to their sources, and records a
hash of the sources it compiled (RECORD). The compiled modules are used together or not at
all (their .pxd types refer to each other), and only while every source is unchanged since
it was compiled: an edited .py runs as Python, with the reason in the master's first log
line and in `pylb -vv`, until `make` compiles it again. PYLB_PURE=1 runs the .py files
whatever is built: they are the reference and the tested fallback.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from types import ModuleType

# In the order they import each other.
HOT = ("counters", "backend", "balance", "h1", "serverconn", "httpproxy")
HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(HERE, "_compiled.json")

# Why the hot modules run as Python although compiled ones are there ("" when they do not)
reason = ""


def source_hashes() -> dict[str, str]:
    """A hash of each hot module's .py file, as built or as it is now. (A .pxd only adds
    types to its .py: code built with an older one still does what the .py says.)"""
    hashes = {}
    for name in HOT:
        with open(os.path.join(HERE, name + ".py"), "rb") as source:
            hashes[name] = hashlib.sha256(source.read()).hexdigest()
    return hashes


def _built(name: str) -> bool:
    return any(
        os.path.exists(os.path.join(HERE, name + suffix))
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Imports the hot modules from their .py files, past any compiled ones."""

    def find_spec(
        self, fullname: str, path: object, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __package__ or name not in HOT:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(HERE, name + ".py"))


def choose() -> None:
    """Decide, before any hot module is imported, whether they run compiled."""
    global reason
    if not any(_built(name) for name in HOT):
        return  # nothing compiled: plain imports find the .py files
    if os.environ.get("PYLB_PURE"):
        reason = "PYLB_PURE is set"
    elif not all(_built(name) for name in HOT):
        reason = "not every hot module is compiled"
    else:
        try:
            with open(RECORD) as record:
                built_from = json.load(record)
        except (OSError, ValueError):
            built_from = {}
        changed = [n for n, h in source_hashes().items() if built_from.get(n) != h]
        if changed:
            reason = f"{', '.join(f'lb/{n}.py' for n in changed)} changed since compiled (make)"
    if reason:
        sys.meta_path.insert(0, _SourceFirst())


def status() -> str:
    """How the hot path runs, for logs and `pylb -vv`."""
    modules = [importlib.import_module(f"{__package__}.{name}") for name in HOT]
    if all(m.__file__ and not m.__file__.endswith(".py") for m in modules):
        return f"compiled ({', '.join(HOT)})"
    return f"pure Python ({reason})" if reason else "pure Python (not compiled)"
