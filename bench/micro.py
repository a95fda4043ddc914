"""pylb's own CPU work for one proxied HTTP request, in process, without sockets.

An HttpSession is driven with transports that only collect what is written: a keep-alive
client sends a request, a pooled server connection answers it, again and again. What is
left is pylb's own work per request (parsing, choosing a server, heads, counters), the
part that bench/bench.py cannot separate from the kernel's. The figure is steady to a few
per cent from run to run, so it can tell two versions of the code apart where a wrk run
cannot (under `valgrind --tool=callgrind`, instruction counts are exact); bench/bench.py
stays the judge of the whole. PYLB_PURE=1 measures the pure-Python hot path.

    .venv/bin/python bench/micro.py [--requests N] [--rounds R] [--profile]
        [--checks] [--log]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from typing import Any

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lb import compiled, serverconn  # noqa: E402
from lb.backend import Backend  # noqa: E402
from lb.config import loads  # noqa: E402
from lb.frontend import Frontend  # noqa: E402
from lb.httpproxy import HttpSession  # noqa: E402
from lb.shared import Shared  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"  # what wrk sends
RESPONSE = (  # what nginx answers with `return 200 "hello\n"`
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 20:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 6\r\n"
    b"Connection: keep-alive\r\n\r\nhello\n"
)

def config_text(checks: bool) -> str:
    """One frontend, one round-robin backend of two servers; with `checks`, what
    bench/bench.py --checks turns on: health checks, cookie persistence, X-Forwarded-For."""
    servers: dict[str, dict[str, object]] = {
        "s1": {"address": "127.0.0.1:9001"}, "s2": {"address": "127.0.0.1:9002"},
    }
    frontend: dict[str, object] = {"bind": "127.0.0.1:8080", "default_backend": "app"}
    backend: dict[str, object] = {"balance": "roundrobin", "servers": servers}
    if checks:
        frontend["forwardfor"] = True
        backend["cookie"] = {"name": "SRV", "mode": "insert", "indirect": True, "nocache": True}
        backend["http-check"] = {"method": "GET", "path": "/"}
        for name, server in servers.items():
            server.update(check=True, cookie=name)
    return yaml.safe_dump({
        "global": {"workers": 1}, "defaults": {"mode": "http"},
        "frontends": {"www": frontend}, "backends": {"app": backend},
    }, sort_keys=False)


class Transport:
    """Just enough of an asyncio transport: writes are counted, nothing is sent."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class Worker:
    """The parts of lb.worker.Worker a frontend and its sessions use."""

    def __init__(self, text: str) -> None:
        self.config = loads(text)
        self.shared = Shared.create(self.config)
        self.slot = 0
        self.pool = serverconn.ConnectionPool()
        self.stopping = self.handing_over = False
        self.backends = {
            name: Backend(cfg, self.shared, 0) for name, cfg in self.config.backends.items()
        }
        self.frontends = {
            name: Frontend(cfg, self.backends, self)  # type: ignore[arg-type]
            for name, cfg in self.config.frontends.items()
        }


def setup(text: str) -> tuple[HttpSession, Transport]:
    worker = Worker(text)
    frontend = worker.frontends["www"]
    for server in worker.backends["app"].servers:
        conn = serverconn.ServerConnection(server, worker.pool, frontend.max_head)
        conn.connection_made(Transport())  # type: ignore[arg-type]
        worker.pool.give(conn)
    session = HttpSession(frontend)
    client = Transport()
    session.connection_made(client)  # type: ignore[arg-type]
    return session, client


def run(session: HttpSession, requests: int, request: bytes) -> float:
    """Seconds per request, for `requests` requests on one keep-alive connection."""
    start = time.process_time()
    for _ in range(requests):
        session.data_received(request)
        session.conn.data_received(RESPONSE)  # type: ignore[union-attr]
    return (time.process_time() - start) / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checks", action="store_true", help="cookie, forwardfor, checks")
    parser.add_argument("--profile", action="store_true", help="cProfile one round")
    args = parser.parse_args()
    session, client = setup(config_text(args.checks))
    request = REQUEST
    if args.checks:
        request = REQUEST[:-2] + b"Cookie: SRV=s1\r\n\r\n"
    run(session, 2000, request)  # warm up
    if client.closing:
        print("the session closed: the driver does not match pylb any more", file=sys.stderr)
        return 1
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        run(session, args.requests, request)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return 0
    figures = [run(session, args.requests, request) * 1e6 for _ in range(args.rounds)]
    print(
        f"us/request {statistics.median(figures):.2f} "
        f"({min(figures):.2f}-{max(figures):.2f}) over {args.rounds} rounds of "
        f"{args.requests} requests{' (--checks)' if args.checks else ''}; "
        f"hot path {compiled.status()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
