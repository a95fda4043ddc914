"""pylb: a multiprocess HTTP/TCP load balancer whose reloads lose nothing."""

from lb import compiled as _compiled

__version__ = "0.1.0"
RELEASE_DATE = "2026/11/21"

_compiled.choose()  # before any hot module is imported: compiled, or the .py files
