"""Connection limits through real pylb processes: a server's `maxconn` holds for pylb as a
whole (the master's slots and queues), queues are served in arrival order, `timeout queue`
and `maxqueue` answer 503, and the frontend and global `maxconn` make clients wait instead of
refusing them.

The backend here counts its own concurrency (requests being served right now, the most seen
at once), so that a limit is measured where it matters: at the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from backends import HOST, HttpConn, Response, build_request, free_port

IN_FLIGHT_TIMEOUT = 5.0  # waiting for pylb to bring a request to the server


class CountingServer:
    """HTTP/1.1 keep-alive server, one thread per connection. Each request is answered after
    `delay` seconds (or `?delay=S`); the server records the order requests arrive in (their
    path) and counts the requests in flight. A request leaves the count just before its
    answer is written, so that pylb, which frees a slot only once it has the answer, can never
    make the count exceed its limit by a race in this server."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.cond = threading.Condition()
        self.in_flight = 0
        self.max_seen = 0
        self.total = 0
        self.arrivals: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128
            daemon_threads = True

        self.httpd = Server((HOST, 0), Handler)
        self.address = f"{HOST}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        delay = float(query.get("delay", self.delay))
        with self.cond:
            self.in_flight += 1
            self.max_seen = max(self.max_seen, self.in_flight)
            self.total += 1
            self.arrivals.append(parts.path)
            self.cond.notify_all()
        try:
            time.sleep(delay)
        finally:
            with self.cond:
                self.in_flight -= 1
                self.cond.notify_all()
        body = f"{self.name} {parts.path}".encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def wait_in_flight(self, count: int, timeout: float = IN_FLIGHT_TIMEOUT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.in_flight >= count, timeout)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def counting() -> Iterator[Callable[..., CountingServer]]:
    started: list[CountingServer] = []

    def start(name: str = "s1", delay: float = 0.0) -> CountingServer:
        started.append(CountingServer(name, delay))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def lb_config(
    servers: dict[str, dict[str, Any]],
    *,
    workers: int = 4,
    global_: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    frontend: dict[str, Any] | None = None,
    backend: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], int]:
    port = free_port()
    return {
        "global": {"workers": workers, **(global_ or {})},
        "defaults": {"mode": "http", **(defaults or {})},
        "frontends": {"www": {"bind": f"{HOST}:{port}", "default_backend": "app",
                              **(frontend or {})}},
        "backends": {"app": {**(backend or {}), "servers": servers}},
    }, port


@dataclass
class Outcome:
    response: Response | None = None
    error: str | None = None
    sent_at: float = 0.0
    done_at: float = 0.0

    @property
    def status(self) -> int | None:
        return None if self.response is None else self.response.status

    @property
    def elapsed(self) -> float:
        return self.done_at - self.sent_at


class Pending:
    """One request on its own new connection, connected and sent by the caller's thread at
    once (so requests are issued in a known order); the answer is read in a thread."""

    def __init__(self, port: int, target: str, headers: dict[str, str] | None = None,
                 timeout: float = 8.0) -> None:
        self.outcome = Outcome()
        self.conn = HttpConn(port, timeout=timeout)
        self.outcome.sent_at = time.monotonic()
        self.conn.send(build_request("GET", target, headers=headers))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self.outcome.response = self.conn.read_response()
        except Exception as exc:  # reported by result()
            self.outcome.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.outcome.done_at = time.monotonic()
            self.conn.close()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 10.0) -> Outcome:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "no answer in time"
        return self.outcome


def concurrent_requests(port: int, targets: list[str], headers: dict[str, str] | None = None,
                        timeout: float = 8.0) -> list[Outcome]:
    """One thread per request, each on its own connection: all connect, then all send at
    the same moment, then each reads its answer."""
    outcomes = [Outcome() for _ in targets]
    barrier = threading.Barrier(len(targets), timeout=5)

    def client(index: int) -> None:
        outcome = outcomes[index]
        try:
            with HttpConn(port, timeout=timeout) as conn:
                barrier.wait()
                outcome.sent_at = time.monotonic()
                conn.send(build_request("GET", targets[index], headers=headers))
                outcome.response = conn.read_response()
        except Exception as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        finally:
            outcome.done_at = time.monotonic()

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(len(targets))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 5
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "clients still waiting for an answer"
    return outcomes


def describe(outcomes: list[Outcome]) -> list[Any]:
    return [o.error or o.status for o in outcomes]


# -- server maxconn and its queue ---------------------------------------------------------


def test_server_maxconn_holds_for_all_workers_together(pylb, counting):
    server = counting("s1", delay=0.3)
    cfg, port = lb_config({"s1": {"address": server.address, "maxconn": 5}}, workers=4)
    pylb(cfg)
    outcomes = concurrent_requests(port, [f"/c{i}" for i in range(50)], timeout=9.0)
    assert describe(outcomes) == [200] * 50
    assert server.total == 50
    assert server.max_seen <= 5, f"{server.max_seen} requests at once on a maxconn 5 server"
    assert server.max_seen == 5, f"only {server.max_seen} at once: the 5 slots went unused"
    assert sorted(server.arrivals) == sorted(f"/c{i}" for i in range(50))
    assert [o.response.body for o in outcomes] == [  # type: ignore[union-attr]
        f"s1 /c{i}".encode() for i in range(50)
    ]


def test_queued_requests_reach_the_server_in_arrival_order(pylb, counting):
    server = counting("s1", delay=0.05)
    cfg, port = lb_config({"s1": {"address": server.address, "maxconn": 1}}, workers=4)
    pylb(cfg)
    first = Pending(port, "/r0?delay=0.6")
    assert server.wait_in_flight(1)
    rest = []
    for i in range(1, 6):
        time.sleep(0.05)  # the previous request is in the queue by now
        rest.append(Pending(port, f"/r{i}"))
    outcomes = [first.result(), *(p.result() for p in rest)]
    assert describe(outcomes) == [200] * 6
    assert server.arrivals == [f"/r{i}" for i in range(6)]
    assert server.max_seen == 1


def test_timeout_queue_answers_503(pylb, counting):
    server = counting("s1")
    cfg, port = lb_config({"s1": {"address": server.address, "maxconn": 1}}, workers=2,
                          backend={"timeout": {"queue": "300ms"}})
    pylb(cfg)
    slow = Pending(port, "/slow?delay=1.2")
    assert server.wait_in_flight(1)
    queued = Pending(port, "/queued").result(5)
    assert queued.status == 503, queued.error or queued.response
    assert 0.25 <= queued.elapsed <= 2.0, f"503 after {queued.elapsed:.3f}s, timeout queue 300ms"
    assert not slow.done(), "the slow request should still be at the server"
    outcome = slow.result(5)
    assert outcome.status == 200, outcome.error
    assert server.arrivals == ["/slow"]


def test_maxqueue_refuses_a_persistent_request_when_the_server_queue_is_full(pylb, counting):
    server = counting("s1")
    cfg, port = lb_config(
        {"s1": {"address": server.address, "maxconn": 1, "maxqueue": 1, "cookie": "s1"}},
        workers=2,
        backend={"cookie": {"name": "SERVERID", "mode": "insert", "indirect": True}},
    )
    pylb(cfg)
    sticky = {"Cookie": "SERVERID=s1"}
    first = Pending(port, "/first?delay=1.2", sticky)
    assert server.wait_in_flight(1)
    second = Pending(port, "/second", sticky)
    time.sleep(0.2)  # nothing to wait on: give the second request time to join the queue
    third = Pending(port, "/third", sticky).result(5)
    assert third.status == 503, third.error or third.response
    assert third.elapsed < 0.6, f"503 only after {third.elapsed:.3f}s: it was queued"
    assert not first.done() and not second.done()
    one, two = first.result(5), second.result(5)
    assert (one.status, two.status) == (200, 200), (one.error, two.error)
    assert server.arrivals == ["/first", "/second"]
    assert server.max_seen == 1  # the second waited for the first


@pytest.mark.parametrize("client_timeout", [None, "400ms"])
def test_queued_requests_wait_for_their_turn(pylb, counting, client_timeout):
    """Clients whose requests wait in the queue (longer than `timeout client`, when set:
    that timeout is for a client expected to send, not for one waiting for its answer) are
    all answered, one by one as the slot frees, in order."""
    server = counting("s1", delay=0.3)
    defaults = {"timeout": {"client": client_timeout, "queue": "5s"}} if client_timeout else {}
    cfg, port = lb_config({"s1": {"address": server.address, "maxconn": 1}}, workers=2,
                          defaults=defaults)
    pylb(cfg)
    pending = [Pending(port, "/q0")]
    assert server.wait_in_flight(1)
    for i in range(1, 4):
        time.sleep(0.05)
        pending.append(Pending(port, f"/q{i}"))
    outcomes = [p.result() for p in pending]
    assert describe(outcomes) == [200] * 4
    assert [o.response.body for o in outcomes] == [  # type: ignore[union-attr]
        f"s1 /q{i}".encode() for i in range(4)
    ]
    assert server.arrivals == [f"/q{i}" for i in range(4)]
    assert server.max_seen == 1
    done = [o.done_at for o in outcomes]
    gaps = [b - a for a, b in zip(done, done[1:], strict=False)]
    assert all(gap >= 0.2 for gap in gaps), f"answers {gaps} apart, the server takes 0.3s each"
    assert outcomes[-1].elapsed >= 0.8  # the last one really waited for the three before it


# -- frontend and global maxconn ----------------------------------------------------------


def assert_clients_wait(outcomes: list[Outcome], server: CountingServer, limit: int) -> None:
    count = len(outcomes)
    assert describe(outcomes) == [200] * count, "a client was refused, reset or not answered"
    assert server.total == count
    assert server.max_seen <= limit, f"{server.max_seen} requests at once, maxconn {limit}"
    assert server.max_seen == limit, f"only {server.max_seen} at once: the limit went unused"


def test_frontend_maxconn_makes_connections_wait(pylb, counting):
    server = counting("s1", delay=1.0)
    cfg, port = lb_config({"s1": {"address": server.address}}, workers=2,
                          frontend={"maxconn": 2})
    pylb(cfg)
    outcomes = concurrent_requests(port, [f"/f{i}" for i in range(5)],
                                   headers={"Connection": "close"}, timeout=8.0)
    assert_clients_wait(outcomes, server, 2)


def test_global_maxconn_holds_across_frontends(pylb, counting):
    server = counting("s1", delay=1.0)
    port2 = free_port()
    cfg, port = lb_config({"s1": {"address": server.address}}, workers=2,
                          global_={"maxconn": 2}, frontend={"maxconn": 100})
    cfg["frontends"]["alt"] = {"bind": f"{HOST}:{port2}", "default_backend": "app",
                               "maxconn": 100}
    pylb(cfg)
    results: dict[int, list[Outcome]] = {}

    def run(p: int, count: int) -> None:
        results[p] = concurrent_requests(p, [f"/g{p}-{i}" for i in range(count)],
                                         headers={"Connection": "close"}, timeout=8.0)

    threads = [threading.Thread(target=run, args=(p, n), daemon=True)
               for p, n in ((port, 3), (port2, 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert not any(t.is_alive() for t in threads)
    assert set(results) == {port, port2}
    assert_clients_wait(results[port] + results[port2], server, 2)
