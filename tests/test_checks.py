"""Health checks: run once by the master for all workers, rise/fall, TCP and HTTP modes."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from backends import HOST, HttpConn, free_port, wait_until

from lb import config
from lb.check import L4OK, L7OK, L7STS, Checker, Result
from lb.shared import (
    BE_VERSION,
    CHECK_STATUSES,
    DOWN,
    SRV_CHECK_CODE,
    SRV_CHECK_MS,
    SRV_CHECK_STATUS,
    SRV_CHKDOWN,
    SRV_CHKFAIL,
    SRV_OP,
    UP,
    Shared,
)

CHECK_PATH = "/health"


class HealthServer:
    """HTTP server whose answer to checks the test sets at any time; it records every
    check request and counts the other (client) requests it serves."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200  # what checks get
        self.checks: list[dict[str, Any]] = []
        self.served = 0
        self.connections = 0  # accepted, with or without a request (TCP checks send none)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer._answer(self)

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def process_request(self, request: Any, client_address: Any) -> None:
                with outer.lock:
                    outer.connections += 1
                super().process_request(request, client_address)

        self.httpd = Server((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"{HOST}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        with self.lock:
            if handler.path == CHECK_PATH:
                status = self.status
                self.checks.append({
                    "at": time.monotonic(), "method": handler.command, "status": status,
                    "headers": dict(handler.headers.items()),
                })
            else:
                status = 200
                self.served += 1
        body = self.name.encode()
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def stop(self) -> None:
        """Close the listening socket: new connections are refused."""
        self.httpd.shutdown()
        self.httpd.server_close()


class ScriptedServer:
    """TCP server for broken checks: `silent` accepts and never answers, `garbage`
    answers anything with a line that is not HTTP."""

    def __init__(self, mode: str) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.recv(4096)
                if mode == "garbage":
                    self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                else:
                    self.request.settimeout(5)
                    try:
                        self.request.recv(4096)  # until the checker gives up and closes
                    except OSError:
                        pass

        self.server = socketserver.ThreadingTCPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.address = f"{HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def health() -> Iterator[Callable[[str], HealthServer]]:
    started: list[HealthServer] = []

    def start(name: str) -> HealthServer:
        started.append(HealthServer(name))
        return started[-1]

    yield start
    for server in started:
        if server.httpd.socket.fileno() != -1:
            server.stop()


def checked(address: str, **options: Any) -> dict[str, Any]:
    return {"address": address, "check": True, "inter": "200ms", "rise": 2, "fall": 2,
            **options}


def lb_config(servers: dict[str, dict[str, Any]], workers: int = 2,
              http_check: dict[str, Any] | None = None,
              check_timeout: str = "500ms") -> tuple[dict[str, Any], int]:
    port = free_port()
    backend: dict[str, Any] = {"timeout": {"check": check_timeout}, "servers": servers}
    if http_check is not None:
        backend["http-check"] = http_check
    return {
        "global": {"workers": workers},
        "defaults": {"mode": "http"},
        "frontends": {"www": {"bind": f"127.0.0.1:{port}", "default_backend": "app"}},
        "backends": {"app": backend},
    }, port


def fetch(port: int) -> tuple[int, bytes]:
    """One request on a new connection (so any worker may take it)."""
    with HttpConn(port) as conn:
        response = conn.request("GET", "/")
        return response.status, response.body


def line_index(lb: Any, regex: str, start: int) -> int:
    """Index of the first output line at or after `start` matching `regex` (it must exist)."""
    lb.wait_log(regex, 10, start=start)
    return next(i for i in range(start, len(lb.lines)) if re.search(regex, lb.lines[i]))


def between(lb: Any, regex: str, start: int, end: int) -> list[str]:
    return [line for line in lb.lines[start:end] if re.search(regex, line)]


def test_one_check_per_interval_whatever_the_worker_count(pylb, health):
    s1 = health("s1")
    cfg, _ = lb_config({"s1": checked(s1.address)}, workers=4,
                       http_check={"path": CHECK_PATH, "expect": 200})
    lb = pylb(cfg)
    assert len(lb.workers()) == 4
    assert wait_until(lambda: len(s1.checks) >= 1, 2)
    first = len(s1.checks)
    time.sleep(1.2)
    count = len(s1.checks) - first
    assert 5 <= count <= 7, f"{count} checks in 1.2s at inter 200ms with 4 workers"
    check = s1.checks[0]
    assert check["method"] == "GET"
    assert check["headers"]["Host"] == s1.address
    assert check["headers"]["User-Agent"] == "pylb-check"
    assert check["headers"]["Connection"] == "close"
    gaps = [b["at"] - a["at"] for a, b in zip(s1.checks, s1.checks[1:], strict=False)]
    assert all(0.1 < gap < 0.4 for gap in gaps), gaps
    assert "is DOWN" not in lb.output()


def bring_down(lb: Any, s1: HealthServer, fall: int) -> int:
    """Make s1's checks answer 500 once it is fully healthy; returns the DOWN line's index."""
    assert wait_until(lambda: len(s1.checks) >= 2, 3)  # a passed check: health at the top
    mark = len(lb.lines)
    s1.status = 500
    down = line_index(
        lb,
        r'Server app/s1 is DOWN, reason: Layer7 wrong status, code: 500, '
        r'info: "Internal Server Error", check duration: \d+ms\. '
        r'1 active and 0 backup servers left\.$',
        mark,
    )
    # fall - 1 failures only counted down, the fall-th one turned it DOWN
    steps = between(lb, r"Health check for server app/s1 failed, reason: Layer7 wrong status",
                    mark, down)
    assert [s.rsplit("status: ", 1)[1] for s in steps] == [
        f"{n}/{fall} UP." for n in range(fall - 1, 0, -1)
    ]
    assert sum(1 for c in s1.checks if c["status"] == 500) >= fall
    return down


def test_failing_server_is_down_after_fall_checks_for_every_worker(pylb, health):
    s1, s2 = health("s1"), health("s2")
    cfg, port = lb_config(
        {"s1": checked(s1.address, fall=3), "s2": checked(s2.address)}, workers=4,
        http_check={"path": CHECK_PATH})
    lb = pylb(cfg)
    assert {fetch(port)[1] for _ in range(6)} == {b"s1", b"s2"}
    bring_down(lb, s1, fall=3)
    served = s1.served
    answers = [fetch(port) for _ in range(20)]
    assert answers == [(200, b"s2")] * 20
    assert s1.served == served
    assert "has no server available" not in lb.output()


def test_recovered_server_is_up_after_rise_checks_and_gets_traffic(pylb, health):
    s1, s2 = health("s1"), health("s2")
    cfg, port = lb_config(
        {"s1": checked(s1.address, rise=3), "s2": checked(s2.address)}, workers=4,
        http_check={"path": CHECK_PATH})
    lb = pylb(cfg)
    down = bring_down(lb, s1, fall=2)
    mark = down + 1
    s1.status = 200
    up = line_index(
        lb,
        r"Server app/s1 is UP, reason: Layer7 check passed, code: 200, "
        r"check duration: \d+ms\. 2 active and 0 backup servers online\.$",
        mark,
    )
    steps = between(lb, r"Health check for server app/s1 succeeded, reason: Layer7 check passed",
                    mark, up)
    # rise - 1 successes only counted up, the rise-th one turned it UP
    assert [s.rsplit("status: ", 1)[1] for s in steps] == ["1/3 DOWN.", "2/3 DOWN."]
    served = s1.served
    answers = [fetch(port) for _ in range(20)]
    assert all(status == 200 for status, _ in answers)
    assert s1.served - served >= 5
    assert {body for _, body in answers} == {b"s1", b"s2"}


def test_tcp_check_detects_a_closed_port(pylb, health):
    s1 = health("s1")
    closed = f"{HOST}:{free_port()}"
    cfg, port = lb_config({"s1": checked(s1.address), "s2": checked(closed)})
    lb = pylb(cfg)
    # servers start UP: a first failed check is enough to mark one DOWN (as in HAProxy)
    lb.wait_log(r'Server app/s2 is DOWN, reason: Layer4 connection problem, '
                r'info: "Connection refused", check duration: \d+ms\. '
                r"1 active and 0 backup servers left\.$", 5)
    assert [fetch(port) for _ in range(6)] == [(200, b"s1")] * 6
    connections = s1.connections
    assert wait_until(lambda: s1.connections >= connections + 3, 3)  # TCP checks of s1
    assert s1.checks == []  # connects only, no HTTP request
    assert "app/s1 is DOWN" not in lb.output()
    mark = len(lb.lines)
    s1.stop()
    down = line_index(lb, r'Server app/s1 is DOWN, reason: Layer4 connection problem, '
                          r'info: "Connection refused", check duration: \d+ms\. '
                          r"0 active and 0 backup servers left\.$", mark)
    assert len(between(lb, r"Health check for server app/s1 failed", mark, down)) == 1
    lb.wait_log(r"backend app has no server available!$", 2, start=down)
    assert fetch(port)[0] == 503


def test_expect_range_decides_which_statuses_pass(pylb, health):
    redirecting = health("s1")
    redirecting.status = 301
    port = free_port()
    lb = pylb({
        "global": {"workers": 1},
        "defaults": {"mode": "http", "timeout": {"check": "500ms"}},
        "frontends": {"www": {"bind": f"127.0.0.1:{port}", "default_backend": "strict"}},
        "backends": {
            "strict": {"http-check": {"path": CHECK_PATH, "expect": "200-299"},
                       "servers": {"s1": checked(redirecting.address)}},
            "lenient": {"http-check": {"path": CHECK_PATH, "expect": "200-399"},
                        "servers": {"s1": checked(redirecting.address)}},
            "exact": {"http-check": {"path": CHECK_PATH, "expect": 301},
                      "servers": {"s1": checked(redirecting.address)}},
        },
    })
    lb.wait_log(r'Server strict/s1 is DOWN, reason: Layer7 wrong status, code: 301, '
                r'info: "Moved Permanently", check duration: \d+ms\. '
                r"0 active and 0 backup servers left\.$", 5)
    lb.wait_log(r"backend strict has no server available!$", 2)
    checks = len(redirecting.checks)
    assert wait_until(lambda: len(redirecting.checks) >= checks + 6, 3)
    assert "lenient/s1 is DOWN" not in lb.output()
    assert "exact/s1 is DOWN" not in lb.output()
    assert fetch(port)[0] == 503


@pytest.mark.parametrize(("mode", "expected"), [
    ("silent", r"reason: Layer7 timeout, check duration: (\d+)ms\."),
    ("garbage", r'reason: Layer7 invalid response, info: "Invalid HTTP status line", '
                r"check duration: (\d+)ms\."),
])
def test_http_check_timeout_and_invalid_response(pylb, mode, expected):
    server = ScriptedServer(mode)
    try:
        cfg, _ = lb_config({"s1": checked(server.address)}, workers=1,
                           http_check={"path": CHECK_PATH}, check_timeout="300ms")
        lb = pylb(cfg)
        m = lb.wait_log(r"Server app/s1 is DOWN, " + expected, 5)
        if mode == "silent":
            assert 290 <= int(m[1]) < 1000
    finally:
        server.stop()


def test_connect_timeout_is_a_layer4_timeout(pylb):
    # a listening socket whose accept queue is full: the SYN goes unanswered
    with socket.socket() as full:
        full.bind((HOST, 0))
        full.listen(0)
        fillers = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(full.getsockname())
                fillers.append(filler)
            address = f"{HOST}:{full.getsockname()[1]}"
            cfg, _ = lb_config({"s1": checked(address)}, workers=1, check_timeout="300ms")
            lb = pylb(cfg)
            lb.wait_log(r"Server app/s1 is DOWN, reason: Layer4 timeout, "
                        r"check duration: \d+ms\.", 5)
        finally:
            for filler in fillers:
                filler.close()


# -- in process: the health counter and the check loop, without sockets ---------------------


def _checker(rise: int = 2, fall: int = 3, inter: str = "2s") -> Checker:
    cfg = config.loads(
        "frontends: {www: {bind: '127.0.0.1:1', default_backend: app}}\n"
        "backends: {app: {servers: {"
        f"s1: {{address: '127.0.0.1:1', check: true, rise: {rise}, fall: {fall}, inter: {inter}}},"
        " s2: {address: '127.0.0.1:2', backup: true}}}}\n"
    )
    return Checker(cfg, Shared.create(cfg))


def test_rise_and_fall_follow_haproxys_health_counter(caplog):
    checker = _checker(rise=2, fall=3)
    check = checker.checks[0]
    words = check.shared.words
    base = check.base
    version = check.shared.layout.backends["app"] + BE_VERSION
    ok, bad = Result(L7OK, 200, ms=3), Result(L7STS, 503, "Service Unavailable", ms=4)

    def feed(*results: Result) -> list[int]:
        states = []
        for result in results:
            check.record(result)
            states.append(words[base + SRV_OP])
        return states

    assert words[base + SRV_OP] == UP and check.health == 2  # up, one failure from down
    assert feed(ok) == [UP] and check.health == 4  # a pass at `rise` jumps to the top
    assert feed(bad, bad, ok) == [UP, UP, UP] and check.health == 4  # a pass resets
    assert words[version] == 0
    with caplog.at_level(logging.INFO, logger="pylb"):
        assert feed(bad, bad, bad) == [UP, UP, DOWN]
    assert words[base + SRV_CHKFAIL] == 5 and words[base + SRV_CHKDOWN] == 1
    assert CHECK_STATUSES[words[base + SRV_CHECK_STATUS]] == "L7STS"
    assert (words[base + SRV_CHECK_CODE], words[base + SRV_CHECK_MS]) == (503, 4)
    assert words[version] == 1
    down = [r for r in caplog.records if "is DOWN" in r.getMessage()]
    assert down[0].levelno == logging.WARNING
    assert down[0].getMessage() == (
        'Server app/s1 is DOWN, reason: Layer7 wrong status, code: 503, '
        'info: "Service Unavailable", check duration: 4ms. '
        "0 active and 1 backup servers left."
    )
    assert not any("no server available" in r.getMessage() for r in caplog.records)
    assert feed(bad, bad) == [DOWN, DOWN]
    assert words[base + SRV_CHKFAIL] == 5  # not counted while fully down, as in HAProxy
    assert feed(ok, bad, ok) == [DOWN, DOWN, DOWN]  # a failure while rising starts over
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pylb"):
        assert feed(ok) == [UP] and check.health == 4
    assert words[version] == 2
    (up,) = [r for r in caplog.records if "is UP" in r.getMessage()]
    assert up.levelno == logging.INFO
    assert up.getMessage() == (
        "Server app/s1 is UP, reason: Layer7 check passed, code: 200, check duration: 3ms."
        " 1 active and 1 backup servers online."
    )


def test_a_crashing_check_is_logged_and_the_next_one_runs(caplog):
    checker = _checker(inter="20ms")
    check = checker.checks[0]
    calls = 0

    async def probe() -> Result:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return Result(L4OK)

    check.probe = probe  # type: ignore[method-assign]

    async def main() -> None:
        checker.start()
        await asyncio.sleep(0.15)
        checker.stop()
        await asyncio.sleep(0)

    with caplog.at_level(logging.INFO, logger="pylb"):
        asyncio.run(main())
    assert calls >= 4
    assert any("health check of server app/s1 crashed" in r.getMessage()
               for r in caplog.records)
    assert check.health == 4
