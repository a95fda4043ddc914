"""pylb: a multiprocess HTTP/TCP load balancer whose reloads lose nothing."""

__version__ = "0.1.0"
RELEASE_DATE = "2026/11/21"
