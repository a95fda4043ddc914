"""Builds pylb's compiled hot path; the package metadata is in setup.cfg.

Cython compiles the modules every proxied HTTP request runs through (lb.compiled.HOT) from
their .py files, typed by the .pxd files beside them. The .py files stay the reference:
without Cython, a C compiler or the Python headers, or with PYLB_PURE=1 set at install
time, pylb installs and runs as pure Python (a warning says why). `pip install -e .` and
`make` build the modules in place, next to their sources, and record what they were built
from, so an edited source runs as Python until it is compiled again (see lb.compiled).
"""

from __future__ import annotations

import json
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lb import compiled  # noqa: E402  (no import of the hot modules themselves)


def _warn(message: str) -> None:
    print(f"pylb: {message}; pylb runs as pure Python", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Compile when possible; a machine without a C toolchain still installs pylb."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as err:  # no compiler, no Python.h: pure Python is the fallback
            _warn(f"the hot path was not compiled ({err})")
            return
        # What the modules were built from: lb.compiled uses them only while it is so.
        # In place (pip install -e, make) beside the sources; else into the build tree,
        # which a wheel packs beside the same sources.
        record = compiled.RECORD
        if not self.inplace:
            record = os.path.join(self.build_lib, "lb", os.path.basename(record))
        with open(record, "w") as out:
            json.dump(compiled.source_hashes(), out, indent=1)
            out.write("\n")


def extensions() -> list:
    if os.environ.get("PYLB_PURE"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _warn("Cython is not installed")
        return []
    return cythonize(
        [f"lb/{name}.py" for name in compiled.HOT],
        compiler_directives={
            "language_level": 3,
            # Types come from the .pxd files only: the annotations are for readers and
            # type checkers, and must not change what the code accepts.
            "annotation_typing": False,
        },
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
