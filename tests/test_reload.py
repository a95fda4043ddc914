"""Reloads in place (SIGUSR2, SIGHUP, the `reload` command) lose nothing: real pylb with two
workers, real clients on loopback, and every request answered 200.

Each test synchronises on what pylb says (`reload N done`, the socket's answers, `exited`
lines) and on what the sockets show, never on long sleeps. Every load loop is bounded in
requests and in time. The reload methods are parametrised where the method matters (load,
an idle connection reused at once, an invalid configuration); elsewhere the tests spread
the three methods among them.
"""

from __future__ import annotations

import queue
import re
import resource
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
import yaml
from backends import HOST, EchoBackend, HttpConn, build_request, free_port, wait_until

SOCK = "lb.sock"  # relative: lands in pylb's own working directory
METHODS = ("SIGUSR2", "SIGHUP", "socket")
RELOAD_TIMEOUT = 20.0


# -- pylb and its socket ---------------------------------------------------------------------


def lb_config(servers: dict[str, dict[str, Any]], port: int, *, workers: int = 2,
              binds: list[str] | None = None, frontend: dict[str, Any] | None = None,
              backend: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    binds = binds or [f"{HOST}:{port}"]
    return {
        "global": {"workers": workers, "stats": {"socket": SOCK, "level": "admin"}},
        "defaults": {"mode": "http",
                     "timeout": {"connect": "2s", "client": "10s", "server": "10s",
                                 "queue": "10s"}},
        "frontends": {"www": {"bind": binds if len(binds) > 1 else binds[0],
                              "default_backend": "app", **(frontend or {})}},
        "backends": {"app": {**(backend or {}), "servers": servers}},
        **top,
    }


def server(backend: EchoBackend, **options: Any) -> dict[str, Any]:
    return {"address": backend.address, **options}


def cli(lb: Any, line: str, timeout: float = 10.0) -> str:
    """One command on a new connection to the stats socket; the answer up to the close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(lb.workdir / SOCK))
        s.sendall(line.encode() + b"\n")
        out = bytearray()
        while data := s.recv(65536):
            out += data
    return out.decode()


def ok(lb: Any, line: str) -> None:
    answer = cli(lb, line)
    assert answer == "\n", f"{line!r} was refused: {answer!r}"


@dataclass
class Proc:
    """`show proc`, parsed."""

    generation: int
    reloads: int
    workers: dict[int, tuple[int, str]] = field(default_factory=dict)  # pid -> (gen, conns)
    old: dict[int, tuple[int, str]] = field(default_factory=dict)


def show_proc(lb: Any) -> Proc:
    answer = cli(lb, "show proc")
    lines = answer.splitlines()
    assert lines[0].split()[:2] == ["#<PID>", "<type>"], answer
    master = lines[1].split()
    assert master[:2] == [str(lb.pid), "master"], answer
    proc = Proc(int(master[2]), int(master[3]))
    section: dict[int, tuple[int, str]] | None = None
    for line in lines[2:]:
        if line == "# workers":
            section = proc.workers
        elif line == "# old workers":
            section = proc.old
        elif line:
            pid, kind, gen, _reloads, _uptime, conns, *_why = line.split()
            assert kind == "worker" and section is not None, answer
            section[int(pid)] = (int(gen), conns)
    return proc


class Reloader:
    """Reloads one pylb by a given method and waits until the reload is done."""

    def __init__(self, lb: Any) -> None:
        self.lb = lb
        self.count = 0  # successful reloads so far

    def __call__(self, method: str) -> int:
        """Reload; the new generation once `reload N done` (or `Success=1`) says so."""
        lb = self.lb
        mark = len(lb.lines)
        expected = self.count + 1
        if method == "socket":
            answer = cli(lb, "reload", timeout=RELOAD_TIMEOUT + 15)
            assert answer.startswith("Success=1\n--\n"), f"reload refused: {answer!r}"
        else:
            lb.signal(getattr(signal, method))
        found = lb.wait_log(rf"reload {expected} done: generation (\d+) serves", RELOAD_TIMEOUT,
                            start=mark)
        self.count = expected
        return int(found.group(1))

    def failing(self, method: str) -> str:
        """Reload with a configuration pylb must refuse; the reason it gives."""
        lb = self.lb
        mark = len(lb.lines)
        if method == "socket":
            answer = cli(lb, "reload", timeout=RELOAD_TIMEOUT + 15)
            assert answer.startswith("Success=0\n--\n") and answer.endswith("\n\n"), answer
            reason = answer[len("Success=0\n--\n"):].strip()
            lb.wait_log(r"reload failed", 5, start=mark)
            return reason
        lb.signal(getattr(signal, method))
        found = lb.wait_log(r"reload failed, the running configuration stays: (.*)$", 10,
                            start=mark)
        return found.group(1)


def start(pylb: Any, cfg: dict[str, Any]) -> tuple[Any, Reloader]:
    lb = pylb(cfg)
    assert wait_until(lambda: (lb.workdir / SOCK).exists(), 5), "no stats socket"
    return lb, Reloader(lb)


def worker_pids(lb: Any) -> set[int]:
    return {p.pid for p in lb.workers()}


def generations(lb: Any) -> dict[int, int]:
    """Worker pid -> generation, from the process titles (`pylb: worker 1/2 [gen 3]`):
    unlike `show proc`, this asks the workers nothing."""
    found = {}
    for process in lb.workers():
        try:
            title = " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        if m := re.search(r"\[gen (\d+)\]", title):
            found[process.pid] = int(m.group(1))
    return found


def wait_gone(lb: Any, pids: set[int], timeout: float = 10.0) -> None:
    """Wait until none of these workers is left."""
    assert wait_until(lambda: not worker_pids(lb) & pids, timeout, 0.02), (worker_pids(lb), pids)


def holder(lb: Any, conn: HttpConn) -> int | None:
    """The pid of the pylb worker holding the server side of a client connection."""
    local = conn.sock.getsockname()[1]
    for process in lb.workers():
        try:
            for c in process.net_connections(kind="tcp"):
                if c.raddr and c.raddr.port == local and c.laddr.port == conn.sock.getpeername()[1]:
                    return process.pid
        except psutil.NoSuchProcess:
            continue
    return None


def get(port: int, target: str = "/") -> Any:
    with HttpConn(port) as conn:
        return conn.request("GET", target)


def client_targets(echo: EchoBackend) -> list[str]:
    """Targets the echo backend received from clients (health checks left out)."""
    with echo.lock:
        return [r["target"] for r in echo.requests
                if not any(v == "pylb-check" for _n, v in r["headers"])]


def silent(conns: list[HttpConn], seconds: float) -> list[int]:
    """Indexes of the connections on which anything happened (data, close, reset)."""
    socks = [c.sock for c in conns]
    readable, _, broken = select.select(socks, [], socks, seconds)
    return sorted({socks.index(s) for s in readable + broken})


class GateBackend:
    """A keep-alive HTTP server that answers `/gate...` requests only once the test opens
    the gate (other requests at once): an exchange held open exactly as long as needed."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.address = f"{HOST}:{self.listener.getsockname()[1]}"
        self.arrived: queue.Queue[str] = queue.Queue()
        self.gate = threading.Event()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            conn.settimeout(15)
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffer += data
                    head, buffer = buffer.split(b"\r\n\r\n", 1)  # requests without body
                    target = head.split(b" ")[1].decode()
                    self.arrived.put(target)
                    if target.startswith("/gate"):
                        self.gate.wait(15)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                return

    def stop(self) -> None:
        self.stopped = True
        self.gate.set()
        self.listener.close()


@pytest.fixture
def gate_backend():
    backend = GateBackend()
    yield backend
    backend.stop()


# -- load --------------------------------------------------------------------------------


class Load:
    """`clients` threads sending requests until stopped, each bounded in count and time.

    `keepalive`: each client keeps one connection for all its requests, and any close by
    pylb (between requests or not) is a failure. Otherwise each request is a new
    connection, every other one with `Connection: close`."""

    def __init__(self, port: int, clients: int, *, keepalive: bool, max_requests: int = 20000,
                 max_seconds: float = 12.0, think: float = 0.002) -> None:
        self.port = port
        self.think = think  # between two requests: connections are often idle, as in life
        self.keepalive = keepalive
        self.max_requests = max_requests
        self.deadline = time.monotonic() + max_seconds
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.answered = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(clients)]
        self.started = threading.Barrier(clients + 1)
        for t in self.threads:
            t.start()
        self.started.wait(5)

    def _running(self, done: int) -> bool:
        return (not self.stop_event.is_set() and done < self.max_requests
                and time.monotonic() < self.deadline)

    def _client(self, index: int) -> None:
        done = 0
        conn: HttpConn | None = None
        first = True
        try:
            while first or self._running(done):
                try:
                    if conn is None:
                        conn = HttpConn(self.port, timeout=5)
                    if first:
                        first = False
                        self.started.wait(5)
                    headers = None
                    if not self.keepalive and done % 2:
                        headers = {"Connection": "close"}
                    response = conn.request("GET", f"/c{index}/{done}", headers=headers)
                    if response.status != 200:
                        self._fail(f"client {index} request {done}: status {response.status}")
                    else:
                        with self.lock:
                            self.answered += 1
                except Exception as exc:  # counted, and the client goes on with a new one
                    self._fail(f"client {index} request {done}: {type(exc).__name__}: {exc}")
                    if conn is not None:
                        conn.close()
                    conn = None
                done += 1
                if not self.keepalive and conn is not None:
                    conn.close()
                    conn = None
                time.sleep(self.think)
        finally:
            if conn is not None:
                conn.close()

    def _fail(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)

    def count(self) -> int:
        with self.lock:
            return self.answered

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(10)
        assert not any(t.is_alive() for t in self.threads), "a client hung"


def run_load_through_reloads(pylb: Any, backends: Any, methods: list[str], *,
                             keepalive: bool, clients: int, settle: bool) -> None:
    """Load through one reload per method. `settle`: before the next reload, the old
    generation has gone (its connections all handed over); otherwise each reload follows
    the one before as soon as a few requests went through."""
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    port = free_port()
    lb, reload = start(pylb, lb_config({"s1": server(s1), "s2": server(s2)}, port))
    load = Load(port, clients, keepalive=keepalive)
    try:
        assert wait_until(lambda: load.count() >= 4 * clients, 5), load.errors
        counts = [load.count()]
        for method in methods:
            reload(method)
            # requests between two reloads: every reload meets requests under way
            before = load.count()
            assert wait_until(lambda b=before: load.count() >= b + 2 * clients, 5), load.errors
            if settle:
                assert wait_until(lambda: len(lb.workers()) == 2, 10), lb.workers()
            counts.append(load.count())
    finally:
        load.stop()
    handed = [line for line in lb.lines if "no worker to take over" in line]
    assert load.errors == [], f"{len(load.errors)} failed of {load.count() + len(load.errors)}:" \
        f" {load.errors[:8]}; pylb said {handed[:4]}"
    assert counts == sorted(counts) and counts[-1] > counts[0], counts
    assert reload.count == len(methods)
    print(f"{load.count()} requests, 0 failed, {len(methods)} reloads; counts {counts}")


# -- load during reloads ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_keepalive_load_through_five_reloads(pylb, backends, method):
    """Keep-alive clients never see a close: idle connections are handed over."""
    run_load_through_reloads(pylb, backends, [method] * 5, keepalive=True, clients=4,
                             settle=True)


def test_connection_handed_over_while_the_next_reload_starts(pylb, gate_backend):
    """Reloads in a row: a connection the generation before last lets go while the next
    generation is still starting must go to a worker that serves (the current generation,
    or the next once ready), never be closed."""
    port = free_port()
    lb, reload = start(pylb, lb_config({"s1": {"address": gate_backend.address}}, port))
    with HttpConn(port, timeout=10) as conn:
        conn.send(build_request("GET", "/gate"))
        assert gate_backend.arrived.get(timeout=5) == "/gate"
        reload("socket")  # generation 2 serves; generation 1 still holds the exchange
        mark = len(lb.lines)
        lb.signal(signal.SIGHUP)
        lb.wait_log(r"worker \d/2 gen 3 started", RELOAD_TIMEOUT, start=mark)
        gate_backend.gate.set()  # the exchange ends while generation 3 starts
        assert conn.read_response().status == 200
        lb.wait_log(r"reload 2 done: generation 3", RELOAD_TIMEOUT, start=mark)
        try:
            status: Any = conn.request("GET", "/next").status
        except Exception as exc:
            status = repr(exc)
        said = [line for line in lb.lines[mark:] if "take over" in line]
        assert status == 200, f"next request on the connection: {status}; pylb said {said}"


def test_connection_per_request_load_through_reloads(pylb, backends):
    """New connections all the time (half with Connection: close) through a reload by each
    method: none refused, reset or unanswered."""
    run_load_through_reloads(pylb, backends, list(METHODS), keepalive=False, clients=4,
                             settle=True)


def test_new_connections_at_the_switch_are_served(pylb, backends):
    """Connections made at the very moment the old generation stops accepting (the new one
    has just said it is ready): each is served, whichever generation accepted it, whether
    its request came at once or only after the reload."""
    echo = backends.echo("s1")
    port = free_port()
    lb, reload = start(pylb, lb_config({"s1": server(echo)}, port))
    failures = []
    for i in range(6):
        mark = len(lb.lines)
        lb.signal(signal.SIGHUP if i % 2 else signal.SIGUSR2)
        lb.wait_log(rf"generation {i + 2} ready", RELOAD_TIMEOUT, start=mark)
        prompt = [HttpConn(port, timeout=5) for _ in range(3)]
        for n, conn in enumerate(prompt):
            conn.send(build_request("GET", f"/r{i}/prompt{n}"))
        later = [HttpConn(port, timeout=5) for _ in range(3)]
        lb.wait_log(rf"reload {i + 1} done", RELOAD_TIMEOUT, start=mark)
        for n, conn in enumerate(later):
            try:
                conn.send(build_request("GET", f"/r{i}/later{n}"))
            except OSError as exc:
                failures.append(f"reload {i + 1} later {n}: {exc!r}")
        for kind, conns in (("prompt", prompt), ("later", later)):
            for n, conn in enumerate(conns):
                try:
                    status = conn.read_response().status
                    if status != 200:
                        failures.append(f"reload {i + 1} {kind} {n}: status {status}")
                except Exception as exc:
                    failures.append(f"reload {i + 1} {kind} {n}: {exc!r}")
                conn.close()
        # the next reload after the old workers are gone (back to back is another test)
        assert wait_until(lambda: len(lb.workers()) == 2, 10)
    assert failures == [], failures


# -- what is in flight or waiting ---------------------------------------------------------


def test_slow_requests_in_flight_finish_on_the_old_generation(pylb, backends):
    echo = backends.echo("s1")
    port = free_port()
    lb, reload = start(pylb, lb_config({"s1": server(echo)}, port))
    old_pids = worker_pids(lb)
    conns: list[HttpConn] = []
    # slow requests in flight (on whichever workers the kernel gives them to)
    while len(conns) < 4:
        conns.append(HttpConn(port, timeout=10))
        conns[-1].send(build_request("GET", f"/slow{len(conns)}?delay=1"))
        assert wait_until(lambda: len(client_targets(echo)) == len(conns), 5)
    holders = {holder(lb, c) for c in conns}
    mark = len(lb.lines)
    generation = reload("SIGUSR2")
    proc = show_proc(lb)
    assert proc.generation == generation == 2
    assert {gen for gen, _ in proc.workers.values()} == {2} and len(proc.workers) == 2
    # the old workers holding the slow requests are still there, listed as old, with them
    # (an old worker that held none may already have exited)
    assert proc.old and holders <= set(proc.old) <= old_pids, proc
    assert {gen for gen, _ in proc.old.values()} == {1}
    assert sum(int(c) for _, c in proc.old.values()) == len(conns)
    statuses = [conn.read_response().status for conn in conns]
    assert statuses == [200] * len(conns)
    # those keep-alive connections now belong to the new generation: still usable
    for conn in conns:
        assert conn.request("GET", "/after").status == 200
    for pid in proc.old:
        lb.wait_log(rf"gen 1 \(pid {pid}\) exited: exit status 0", 5, start=mark)
    wait_gone(lb, set(proc.old))
    after = show_proc(lb)
    assert after.old == {} and set(after.workers) == set(proc.workers)
    for conn in conns:
        assert holder(lb, conn) in after.workers
        conn.close()


def test_hard_stop_after_ends_the_old_generation(pylb, gate_backend):
    """An exchange that never ends keeps its old worker only until `hard-stop-after`."""
    port = free_port()
    cfg = lb_config({"s1": {"address": gate_backend.address}}, port)
    cfg["global"]["hard-stop-after"] = "500ms"
    lb, reload = start(pylb, cfg)
    stuck = HttpConn(port, timeout=10)
    stuck.send(build_request("GET", "/gate"))  # the gate stays shut
    assert gate_backend.arrived.get(timeout=5) == "/gate"
    old = worker_pids(lb)
    mark = len(lb.lines)
    began = time.monotonic()
    reload("SIGHUP")
    assert get(port, "/meanwhile").status == 200  # the new generation serves
    lb.wait_log(r"hard-stop-after expired: closing 1 connections", 5, start=mark)
    assert stuck.closed_by_peer(5)
    wait_gone(lb, old)
    assert 0.4 < time.monotonic() - began < 5
    stuck.close()


def test_show_proc_answers_at_once_while_the_old_generation_exits(pylb, backends):
    """`show proc` is how an operator follows a reload: it must not stall on old workers
    that exit instead of answering (two tries: the old workers exit within milliseconds
    of the reload)."""
    echo = backends.echo("s1")
    lb, reload = start(pylb, lb_config({"s1": server(echo)}, free_port()))
    took = []
    for _ in range(2):
        old = worker_pids(lb)
        reload("socket")
        began = time.monotonic()
        proc = show_proc(lb)
        took.append(round(time.monotonic() - began, 2))
        assert set(proc.workers).isdisjoint(old) and len(proc.workers) == 2
    assert max(took) < 1.0, f"show proc right after a reload took {took} s"


def test_queued_requests_are_served_in_order_through_a_reload(pylb, gate_backend):
    """A server with `maxconn: 1` busy with a request held open; three more wait in the
    queue, a reload comes, a fourth arrives in the new generation: all are served, in
    arrival order, once the first is answered."""
    port = free_port()
    lb, reload = start(pylb, lb_config({"s1": {"address": gate_backend.address, "maxconn": 1}},
                                       port))

    def qcur(want: int) -> bool:
        rows = [line.split(",") for line in cli(lb, "show stat").splitlines()]
        return any(r[:2] == ["app", "BACKEND"] and r[2] == str(want) for r in rows)

    first = HttpConn(port, timeout=10)
    first.send(build_request("GET", "/gate"))
    assert gate_backend.arrived.get(timeout=5) == "/gate"
    queued = []
    for i in range(1, 5):
        if i == 4:
            reload("SIGHUP")  # three wait in the old generation, the fourth in the new
        queued.append(HttpConn(port, timeout=10))
        queued[-1].send(build_request("GET", f"/q{i}"))
        assert wait_until(lambda n=i: qcur(n), 5, 0.01), cli(lb, "show stat")
    assert gate_backend.arrived.empty()
    gate_backend.gate.set()
    statuses = [c.read_response().status for c in [first, *queued]]
    assert statuses == [200] * 5
    order = [gate_backend.arrived.get(timeout=1) for _ in range(4)]
    assert order == ["/q1", "/q2", "/q3", "/q4"]
    for conn in [first, *queued]:  # still usable: handed over after their answer
        assert conn.request("GET", "/again").status == 200
        conn.close()


def test_a_paused_frontend_stays_paused_through_a_reload(pylb, backends):
    echo = backends.echo("s1")
    port = free_port()
    lb, reload = start(pylb, lb_config({"s1": server(echo)}, port))
    ok(lb, "set maxconn frontend www 0")
    waiting = [HttpConn(port, timeout=10) for _ in range(3)]
    for i, conn in enumerate(waiting):
        conn.send(build_request("GET", f"/p{i}"))
    assert silent(waiting, 0.3) == []
    reload("socket")
    waiting.append(HttpConn(port, timeout=10))  # one more, after the reload
    waiting[-1].send(build_request("GET", "/p3"))
    assert silent(waiting, 0.5) == [], "the new generation served a paused frontend"
    assert client_targets(echo) == []
    ok(lb, "set maxconn frontend www 100")
    assert [c.read_response().status for c in waiting] == [200] * 4
    assert sorted(client_targets(echo)) == ["/p0", "/p1", "/p2", "/p3"]
    for conn in waiting:
        conn.close()


def test_many_idle_connections_are_all_handed_over(pylb, backends):
    """A reload with many idle keep-alive clients (a busy site): every connection moves to
    the new generation, none is closed, the new workers keep their control channel."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard or (hard == resource.RLIM_INFINITY and soft < 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))  # pylb inherits it
    count = min(1000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2)
    echo = backends.echo("s1")
    port = free_port()
    lb, reload = start(pylb, lb_config({"s1": server(echo)}, port))
    conns = [HttpConn(port, timeout=10) for _ in range(count)]
    try:
        for i, conn in enumerate(conns):
            conn.send(build_request("GET", f"/before{i}"))
        assert [c.read_response().status for c in conns] == [200] * count
        mark = len(lb.lines)
        old = worker_pids(lb)
        reload("socket")
        wait_gone(lb, old)
        failures = []
        for i, conn in enumerate(conns):
            try:
                conn.send(build_request("GET", f"/after{i}"))
            except OSError as exc:
                failures.append(f"{i}: {exc!r}")
        for i, conn in enumerate(conns):
            try:
                status = conn.read_response().status
                if status != 200:
                    failures.append(f"{i}: status {status}")
            except Exception as exc:
                failures.append(f"{i}: {exc!r}")
        said = [line for line in lb.lines[mark:] if "master is gone" in line
                or "take over" in line or "exited" in line and "gen 2" in line]
        assert failures == [], f"{len(failures)} of {count} connections lost: " \
            f"{failures[:3]}; pylb said {said[:4]}"
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("method", METHODS)
def test_idle_keepalive_connection_reused_right_after_the_reload(pylb, backends, method):
    echo = backends.echo("s1")
    port = free_port()
    lb, reload = start(pylb, lb_config({"s1": server(echo)}, port))
    with HttpConn(port, timeout=5) as conn:
        assert conn.request("GET", "/before").status == 200
        assert holder(lb, conn) in worker_pids(lb)
        reload(method)
        response = conn.request("GET", "/right-after")  # at once: no pause, no retry
        assert response.status == 200
        # the connection ends up with a worker of the new generation (it may have
        # answered that request itself, or the old one did and then handed it over)
        assert wait_until(lambda: generations(lb).get(holder(lb, conn)) == 2, 5), \
            (holder(lb, conn), generations(lb))
        assert conn.request("GET", "/later").status == 200
    assert client_targets(echo) == ["/before", "/right-after", "/later"]


# -- state ------------------------------------------------------------------------------------


def servers_state(lb: Any) -> dict[str, list[str]]:
    answer = cli(lb, "show servers state app")
    lines = [line for line in answer.splitlines() if line]
    assert lines[0] == "1" and lines[1].startswith("# be_id be_name srv_id srv_name"), answer
    return {line.split()[3]: line.split() for line in lines[2:]}


def slim(lb: Any, name: str) -> str:
    for line in cli(lb, "show stat").splitlines():
        cells = line.split(",")
        if cells[:2] == ["app", name]:
            return cells[6]
    raise AssertionError(f"no app/{name} in show stat")


def state_dump(lb: Any) -> dict[str, Any]:
    """Everything the operator and the checks decided, as the socket shows it. The time
    since the last change (column 9 of `show servers state`) runs on: compared apart."""
    rows = servers_state(lb)
    return {
        "servers": {name: row[:9] + row[10:] for name, row in rows.items()},
        "since": {name: int(row[9]) for name, row in rows.items()},
        "slim": {name: slim(lb, name) for name in rows},
        "table": cli(lb, "show table app"),
        "tables": cli(lb, "show table"),
        "var": cli(lb, "get var proc.mode"),
        "map": cli(lb, "show map hosts"),
    }


def test_runtime_state_is_identical_after_reloads(pylb, backends, tmp_path):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    hosts = tmp_path / "hosts.map"
    hosts.write_text("www.example.com app\n")
    port = free_port()
    checked = {"check": True, "inter": "100ms", "rise": 2, "fall": 2}
    cfg = lb_config(
        {"s1": server(s1, **checked), "s2": server(s2, **checked),
         "s3": {"address": f"{HOST}:{free_port()}", **checked}},  # nothing listens: DOWN
        port,
        backend={"http-check": {"path": "/"}, "stick-table": {"type": "ip", "size": 100},
                 "stick-on": "src"},
        frontend={
            "acl": {"is_var": "path_beg /var", "mode_on": "var(proc.mode) -m str on",
                    "is_map": "path_beg /map", "mapped": "hdr(x-key),map(hosts) -m found"},
            "http-request": [
                'return status 203 content-type text/plain string "mode-on" if is_var mode_on',
                "return status 204 if is_map mapped",
            ],
        },
        maps={"hosts": str(hosts)},
    )
    lb, reload = start(pylb, cfg)
    lb.wait_log(r"Server app/s3 is DOWN", 5)
    assert get(port, "/learn").status == 200  # learns 127.0.0.1 -> s1 or s2
    ok(lb, "set server app/s1 state drain")
    ok(lb, "set weight app/s2 3")
    ok(lb, "set maxconn server app/s2 7")
    ok(lb, "set var proc.mode str(on)")
    ok(lb, "add map hosts api.example.com api")
    before = state_dump(lb)
    assert before["servers"]["s1"][6] == "8"  # drain
    assert before["servers"]["s2"][7] == "3"  # weight
    assert before["servers"]["s3"][5] == "0"  # DOWN
    assert before["servers"]["s1"][5] == before["servers"]["s2"][5] == "2"  # UP
    assert before["slim"]["s2"] == "7"
    assert "key=127.0.0.1" in before["table"], before["table"]
    assert before["var"] == "proc.mode: type=str value=<on>\n\n"
    assert "api.example.com api" in before["map"]
    for method in METHODS:
        mark = len(lb.lines)
        reload(method)
        # right after the reload and for several check intervals: no server changes state
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            rows = servers_state(lb)
            assert [rows[n][5] for n in ("s1", "s2", "s3")] == ["2", "2", "0"], rows
            time.sleep(0.05)
        after = state_dump(lb)
        for key in ("servers", "slim", "table", "tables", "var", "map"):
            assert after[key] == before[key], \
                f"after {method}: {key} changed: {before[key]!r} -> {after[key]!r}"
        for name, since in before["since"].items():
            assert after["since"][name] >= since, f"{name}: last change reset by the reload"
        changes = [line for line in lb.lines[mark:] if re.search(r"Server app/\S+ is (UP|DOWN)",
                                                                   line)]
        assert changes == [], changes
        # and the new workers have the variable and the map entry
        assert get(port, "/var").status == 203
        for key, status in (("api.example.com", 204), ("nope", 200)):
            with HttpConn(port) as conn:  # pylb's own answers close the connection
                assert conn.request("GET", "/map", headers={"X-Key": key}).status == status


def test_a_map_emptied_at_run_time_stays_empty(pylb, backends, tmp_path):
    """`clear map` is runtime state like `add map`: a reload must not bring the file's
    entries back."""
    echo = backends.echo("s1")
    blocked = tmp_path / "blocked.map"
    blocked.write_text("/private yes\n")
    port = free_port()
    cfg = lb_config({"s1": server(echo)}, port, maps={"blocked": str(blocked)},
                    frontend={"acl": {"blocked": "path,map(blocked) -m found"},
                              "http-request": ["deny if blocked"]})
    lb, reload = start(pylb, cfg)
    assert get(port, "/private").status == 403
    ok(lb, "clear map blocked")
    assert get(port, "/private").status == 200
    reload("socket")
    assert cli(lb, "show map blocked") == "\n"
    assert get(port, "/private").status == 200


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_invalid_configuration_changes_nothing(pylb, backends, method):
    echo = backends.echo("s1")
    port = free_port()
    lb, reload = start(pylb, lb_config({"s1": server(echo)}, port))
    good = lb.config_path.read_text()
    assert "    bind: " in good
    bad = good.replace("    bind: ", "    bnd: ", 1)
    line = bad.splitlines().index(next(x for x in bad.splitlines() if "bnd:" in x)) + 1
    before = show_proc(lb)
    with HttpConn(port, timeout=5) as conn:
        assert conn.request("GET", "/before").status == 200
        served_by = holder(lb, conn)
        lb.config_path.write_text(bad)
        reason = reload.failing(method)
        assert reason == f"{lb.config_path}:{line}: frontends.www.bnd: unknown key " \
            "(did you mean bind?)"
        # nothing changed: same workers, same generation, nothing old, traffic flows
        after = show_proc(lb)
        assert set(after.workers) == set(before.workers) and after.old == {}
        assert {gen for gen, _ in after.workers.values()} == {1}
        assert (after.generation, after.reloads) == (1, 0)
        assert worker_pids(lb) == set(before.workers)
        assert conn.request("GET", "/during").status == 200
        assert holder(lb, conn) == served_by
    for i in range(4):
        assert get(port, f"/new{i}").status == 200
    # the file fixed, the next reload goes through
    lb.config_path.write_text(good)
    assert reload(method) == 2
    assert get(port, "/fixed").status == 200


def test_configuration_changes_are_applied(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    port, gone_port, new_port, extra_port = free_port(), free_port(), free_port(), free_port()
    cfg = lb_config({"s1": server(s1)}, port, binds=[f"{HOST}:{port}", f"{HOST}:{gone_port}"])
    lb, reload = start(pylb, cfg)
    assert get(gone_port, "/gone-before").status == 200
    for closed in (new_port, extra_port):
        with pytest.raises(ConnectionRefusedError):
            HttpConn(closed, timeout=2)
    on_gone = HttpConn(gone_port, timeout=5)  # a client of the bind that will go
    assert on_gone.request("GET", "/kept0").status == 200
    cfg = lb_config({"s1": server(s1), "s2": server(s2)}, port,
                    binds=[f"{HOST}:{port}", f"{HOST}:{new_port}"])
    cfg["frontends"]["extra"] = {"bind": f"{HOST}:{extra_port}", "default_backend": "app"}
    lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    mark = len(lb.lines)
    old = show_proc(lb)
    reload("SIGUSR2")
    # the new bind and the new frontend answer at once, and the new server takes its share
    assert get(new_port, "/new-bind").status == 200
    assert get(extra_port, "/new-frontend").status == 200
    seen = {get(port, f"/rr{i}").header("X-Server") for i in range(4)}
    assert seen == {"s1", "s2"}
    # the bind that went stops once the old generation is gone
    for pid in old.workers:
        lb.wait_log(rf"gen 1 \(pid {pid}\) exited", 5, start=mark)
    wait_gone(lb, set(old.workers))
    with pytest.raises(ConnectionRefusedError):
        HttpConn(gone_port, timeout=2)
    # the connection its client already had was handed over with the rest: still served
    assert on_gone.request("GET", "/kept1").status == 200
    on_gone.close()


def test_thirty_reloads_leave_no_leak(pylb, backends):
    echo = backends.echo("s1")
    port = free_port()
    lb, reload = start(pylb, lb_config({"s1": server(echo)}, port))
    master = psutil.Process(lb.pid)
    conn = HttpConn(port, timeout=5)  # one client through all the reloads
    fds: list[int] = []
    rss: list[int] = []
    started = time.monotonic()
    try:
        for i in range(30):
            assert time.monotonic() - started < 40, f"30 reloads too slow: {i} done"
            reload(METHODS[i % 3])
            assert conn.request("GET", f"/r{i}").status == 200
            assert get(port, f"/n{i}").status == 200
            assert wait_until(lambda: len(lb.workers()) == 2, 5), lb.workers()
            fds.append(master.num_fds())
            rss.append(master.memory_info().rss)
    finally:
        conn.close()
    proc = show_proc(lb)
    assert proc.generation == 31 and proc.reloads == 30 and proc.old == {}
    assert len(proc.workers) == 2 and worker_pids(lb) == set(proc.workers)
    baseline = max(fds[:3])
    assert max(fds[3:]) <= baseline + 3, f"descriptors of the master grow: {fds}"
    growth = rss[-1] - rss[2]
    assert growth < 10 * 1024 * 1024, f"master RSS grew {growth / 1e6:.1f} MB: {rss}"
    print(f"master fds {fds}, rss {rss[2] / 1e6:.1f} -> {rss[-1] / 1e6:.1f} MB")
