"""Servers that die, restart and come back, through real pylb processes: `hold-when-down`
(requests that find no usable server wait for one instead of getting a 503), with
`retries`, `redispatch` and `retry-on`; held requests in `show stat`, across a reload,
bounded by `timeout queue` and the backend's `maxqueue`, let go by `abortonclose` and by
`set backend <b> hold-when-down off`; and the health checks at `fastinter` while requests
wait for a server.

The servers are `bin/demo-backend` subprocesses on fixed ports: a SIGKILL is a crash, a new
process on the same port a restart (counted from the moment the port accepts again).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from backends import HOST, HttpConn, IncompleteResponse, build_request, free_port, wait_until
from conftest import Pylb
from test_faults import cli
from test_limits import Pending, describe

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "bin" / "demo-backend"
PORT_TIMEOUT = 5.0  # a restarted server's port accepting
STATE_TIMEOUT = 5.0  # health checks marking a server UP or DOWN
HELD_TIMEOUT = 5.0  # requests reaching the master's queue


# -- servers that can crash and restart on their port ----------------------------------------


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class DemoServer:
    """`bin/demo-backend PORT NAME` as a subprocess: killed with SIGKILL (a crash), started
    again on the same port."""

    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> float:
        """Start it and wait for its port; returns the moment the port accepted."""
        assert self.proc is None, f"{self.name} already runs"
        proc = self.proc = subprocess.Popen(
            [sys.executable, str(DEMO), str(self.port), self.name],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        assert wait_until(lambda: port_open(self.port) or proc.poll() is not None,
                          PORT_TIMEOUT, 0.01)
        assert proc.poll() is None, f"{self.name} exited with {proc.returncode}"
        assert port_open(self.port), f"{self.name} does not accept on {self.port}"
        return time.monotonic()

    def kill(self) -> float:
        """SIGKILL, as a crash; returns the moment it was gone."""
        assert self.proc is not None, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None
        return time.monotonic()


@pytest.fixture
def demo() -> Iterator[Callable[..., DemoServer]]:
    made: list[DemoServer] = []

    def make(name: str, start: bool = True) -> DemoServer:
        server = DemoServer(name)
        made.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in made:
        if server.proc is not None:
            server.kill()


class RecordingServer:
    """HTTP/1.1 server on a given port that records the paths it is asked for, in order."""

    def __init__(self, port: int) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.paths.append(self.path)
                body = b"recorder\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.httpd = Server((HOST, port), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FailingCheckTarget:
    """A port that accepts and at once closes every connection (an HTTP check fails with
    an empty response), counting the connections: the health checks of a DOWN server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, port))
        self.sock.listen(16)
        self.accepted: list[float] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            conn.close()

    def count_since(self, moment: float) -> int:
        return sum(1 for t in list(self.accepted) if t >= moment)

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(2)


# -- pylb ------------------------------------------------------------------------------------


def upgrade_config(tmp: Path, servers: dict[str, str], *, hold: bool = True,
                   retry_on: str | None = "all-retryable-errors",
                   backend: dict[str, Any] | None = None,
                   default_server: dict[str, Any] | None = None,
                   timeouts: dict[str, str] | None = None,
                   workers: int = 2) -> tuple[dict[str, Any], int]:
    """The smoke configuration: two workers, a stats socket, checks every 300 ms."""
    port = free_port()
    app: dict[str, Any] = {"retries": 3, "redispatch": True}
    if retry_on is not None:
        app["retry-on"] = retry_on
    if hold:
        app["hold-when-down"] = True
    app["default-server"] = {"check": True, "inter": "300ms", "fastinter": "100ms",
                             "fall": 2, "rise": 1, **(default_server or {})}
    app.update(backend or {})
    app["servers"] = {name: {"address": address} for name, address in servers.items()}
    return {
        "global": {"workers": workers,
                   "stats": {"socket": str(tmp / "lb.sock"), "level": "admin"}},
        "defaults": {"mode": "http",
                     "timeout": {"connect": "1s", "server": "10s", "queue": "20s",
                                 **(timeouts or {})}},
        "frontends": {"www": {"bind": f"{HOST}:{port}", "default_backend": "app"}},
        "backends": {"app": app},
    }, port


def stat_rows(tmp: Path) -> dict[tuple[str, str], dict[str, str]]:
    """`show stat` as {(pxname, svname): row}."""
    lines = cli(tmp, "show stat").splitlines()
    assert lines and lines[0].startswith("# "), lines
    columns = lines[0][2:].split(",")
    rows = {}
    for line in lines[1:]:
        if line:
            row = dict(zip(columns, line.split(","), strict=False))
            rows[(row["pxname"], row["svname"])] = row
    return rows


def held(tmp: Path) -> int:
    """The backend row's qcur: requests waiting in the backend's queue."""
    return int(stat_rows(tmp)[("app", "BACKEND")]["qcur"])


def wait_held(tmp: Path, count: int, timeout: float = HELD_TIMEOUT) -> None:
    assert wait_until(lambda: held(tmp) == count, timeout, 0.02), \
        f"qcur {held(tmp)}, expected {count}"


def wait_backend_down(tmp: Path) -> None:
    """Every server of the backend DOWN, as `show stat` says."""
    assert wait_until(
        lambda: stat_rows(tmp)[("app", "BACKEND")]["status"] == "DOWN", STATE_TIMEOUT, 0.02
    ), stat_rows(tmp)


def wait_server(lb: Pylb, name: str, state: str, start: int) -> None:
    lb.wait_log(rf"Server app/{name} is {state}\b", STATE_TIMEOUT, start=start)


def hold_requests(port: int, tmp: Path, count: int, tag: str = "h") -> list[Pending]:
    """`count` requests, one per connection, each sent once the one before is held (so the
    order they were held in is the order they were sent in)."""
    pending = []
    already = held(tmp)
    for i in range(count):
        pending.append(Pending(port, f"/{tag}{i}", timeout=15.0))
        wait_held(tmp, already + i + 1)
    return pending


def assert_pylb_sound(lb: Pylb) -> None:
    assert lb.proc.poll() is None, "pylb died:\n" + lb.output()
    assert "Traceback" not in lb.output(), lb.output()


# -- load ------------------------------------------------------------------------------------


class Load:
    """Keep-alive clients, each sending GETs one after another until stopped (bounded by a
    count and a time); every answer is recorded with how long it took."""

    MAX_REQUESTS = 20_000  # per client
    MAX_SECONDS = 20.0

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.longest = 0.0
        self.answers = 0
        self.last_sent = [0.0] * clients  # when each client's last answered request went
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, index: int) -> None:
        deadline = time.monotonic() + self.MAX_SECONDS
        conn: HttpConn | None = None
        for n in range(self.MAX_REQUESTS):
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = HttpConn(self.port, timeout=15)
                status = conn.request("GET", f"/c{index}-{n}").status
            except (OSError, IncompleteResponse) as exc:
                with self.lock:
                    self.errors.append(f"{time.monotonic() - sent:.3f}s {exc!r}")
                if conn is not None:
                    conn.close()
                conn = None
                continue
            took = time.monotonic() - sent
            with self.lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1
                self.longest = max(self.longest, took)
                self.answers += 1
                self.last_sent[index] = sent
        if conn is not None:
            conn.close()

    def wait_answers(self, count: int, timeout: float = 5.0) -> None:
        assert wait_until(lambda: self.answers >= count, timeout, 0.01), self.summary()

    def wait_all_answered_after(self, moment: float, timeout: float = 8.0) -> None:
        """Every client had a request sent after `moment` answered: whatever was held
        before it has been answered too."""
        assert wait_until(lambda: min(self.last_sent) > moment, timeout, 0.01), self.summary()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)
        assert not any(t.is_alive() for t in self._threads), "a client is stuck"

    def summary(self) -> str:
        return (f"{self.answers} answers {self.statuses}, longest {self.longest:.3f}s, "
                f"{len(self.errors)} errors {self.errors[:5]}")


def outage(tmp: Path, load: Load, servers: list[DemoServer], down_for: float
           ) -> tuple[float, int]:
    """Kill every server under load, restart them `down_for` seconds later, wait till the
    load got through. Returns how long the servers were away (kill to port open) and the
    most requests seen held at once meanwhile (`show stat`, polled through the outage)."""
    load.wait_answers(200)
    killed = min(server.kill() for server in servers)
    most = 0
    while time.monotonic() < killed + down_for:  # the outage itself
        most = max(most, held(tmp))
        time.sleep(0.05)
    back = max(server.start() for server in servers)
    load.wait_all_answered_after(back)
    return back - killed, most


# -- servers crashing under load -------------------------------------------------------------

CLIENTS = 6
DOWN_FOR = 1.5


def test_both_servers_crash_and_restart_under_load_without_a_failed_request(
    pylb, demo, tmp_path
):
    """Every client's request is held while no server is left (qcur reaches the number of
    clients), and none waits much longer than the servers were away."""
    s1, s2 = demo("s1"), demo("s2")
    cfg, port = upgrade_config(tmp_path, {"s1": s1.address, "s2": s2.address})
    lb = pylb(cfg)
    load = Load(port, CLIENTS)
    try:
        away, most = outage(tmp_path, load, [s1, s2], DOWN_FOR)
    finally:
        load.stop()
    assert_pylb_sound(lb)
    assert load.errors == [], load.summary()
    assert set(load.statuses) == {200}, load.summary()
    assert load.longest <= away + 1.5, f"servers away {away:.2f}s; {load.summary()}"
    assert most == CLIENTS, f"at most {most} of {CLIENTS} requests held at once"


def test_a_rolling_restart_under_load_fails_no_request(pylb, demo, tmp_path):
    s1, s2 = demo("s1"), demo("s2")
    cfg, port = upgrade_config(tmp_path, {"s1": s1.address, "s2": s2.address})
    lb = pylb(cfg)
    load = Load(port, CLIENTS)
    try:
        load.wait_answers(200)
        for server in (s1, s2):
            mark = len(lb.lines)
            server.kill()
            wait_server(lb, server.name, "DOWN", mark)
            mark = len(lb.lines)
            back = server.start()
            wait_server(lb, server.name, "UP", mark)
            load.wait_all_answered_after(back)
    finally:
        load.stop()
    assert_pylb_sound(lb)
    assert load.errors == [], load.summary()
    assert set(load.statuses) == {200}, load.summary()


def test_without_hold_when_down_the_same_outage_fails_requests(pylb, demo, tmp_path):
    s1, s2 = demo("s1"), demo("s2")
    cfg, port = upgrade_config(tmp_path, {"s1": s1.address, "s2": s2.address},
                               hold=False, retry_on=None)
    lb = pylb(cfg)
    load = Load(port, CLIENTS)
    try:
        _, most = outage(tmp_path, load, [s1, s2], DOWN_FOR)
    finally:
        load.stop()
    assert_pylb_sound(lb)
    assert most == 0
    assert load.statuses.get(503, 0) > 0, load.summary()
    assert load.statuses.get(200, 0) > 200, load.summary()


# -- held requests ---------------------------------------------------------------------------


def test_held_requests_show_in_qcur_and_go_in_arrival_order_when_a_server_is_up(
    pylb, tmp_path
):
    """maxconn 1 on the server: the master grants the held requests one at a time, so the
    order the server sees is the order of the queue."""
    port1 = free_port()
    cfg, port = upgrade_config(tmp_path, {"s1": f"{HOST}:{port1}"})
    cfg["backends"]["app"]["servers"]["s1"]["maxconn"] = 1
    pylb(cfg)
    wait_backend_down(tmp_path)
    pending = hold_requests(port, tmp_path, 5)
    rows = stat_rows(tmp_path)
    assert rows[("app", "BACKEND")]["qcur"] == "5", rows[("app", "BACKEND")]
    assert rows[("app", "BACKEND")]["status"] == "DOWN"
    assert rows[("app", "s1")]["qcur"] == "0"  # in the backend's queue, not the server's
    assert not any(p.done() for p in pending)
    server = RecordingServer(port1)
    try:
        outcomes = [p.result(10) for p in pending]
    finally:
        server.stop()
    assert describe(outcomes) == [200] * 5
    assert server.paths == [f"/h{i}" for i in range(5)]
    assert held(tmp_path) == 0


@pytest.mark.parametrize("how", ["cli", "sigusr2"])
def test_held_requests_survive_a_reload_and_keep_their_turns(pylb, tmp_path, how):
    """The old generation hands the held connections over; the new one holds them again,
    each at its old place in the queue (maxconn 1: the server sees the queue's order)."""
    port1 = free_port()
    cfg, port = upgrade_config(tmp_path, {"s1": f"{HOST}:{port1}"})
    cfg["backends"]["app"]["servers"]["s1"]["maxconn"] = 1
    lb = pylb(cfg)
    wait_backend_down(tmp_path)
    pending = hold_requests(port, tmp_path, 4)
    mark = len(lb.lines)
    if how == "cli":
        answer = cli(tmp_path, "reload", timeout=30)
        assert answer.startswith("Success=1"), answer
    else:
        lb.signal(signal.SIGUSR2)
        lb.wait_log(r"reload 1 done", 20, start=mark)
    lb.wait_log(r"generation 2 ready", 10, start=mark)
    for index in (1, 2):  # the old generation hands the held connections over and goes
        lb.wait_log(rf"worker {index}/2 gen 1 \(pid \d+\) exited", 10, start=mark)
    wait_held(tmp_path, 4)  # in the new generation's hands now
    assert not any(p.done() for p in pending), describe([p.outcome for p in pending])
    server = RecordingServer(port1)
    try:
        outcomes = [p.result(10) for p in pending]
    finally:
        server.stop()
    assert describe(outcomes) == [200] * 4
    assert server.paths == [f"/h{i}" for i in range(4)]
    assert_pylb_sound(lb)


def test_timeout_queue_ends_the_hold_with_a_503(pylb, tmp_path):
    cfg, port = upgrade_config(tmp_path, {"s1": f"{HOST}:{free_port()}"},
                               timeouts={"queue": "500ms"})
    pylb(cfg)
    wait_backend_down(tmp_path)
    outcome = Pending(port, "/late").result(10)
    assert outcome.status == 503, outcome.error
    assert 0.4 <= outcome.elapsed <= 2.5, f"503 after {outcome.elapsed:.3f}s, timeout 500ms"
    assert held(tmp_path) == 0


def test_maxqueue_refuses_the_request_beyond_it_at_once(pylb, demo, tmp_path):
    s1 = demo("s1", start=False)
    cfg, port = upgrade_config(tmp_path, {"s1": s1.address}, backend={"maxqueue": 2})
    pylb(cfg)
    wait_backend_down(tmp_path)
    pending = hold_requests(port, tmp_path, 2)
    third = Pending(port, "/third").result(10)
    assert third.status == 503, third.error
    assert third.elapsed < 1.0, f"503 after {third.elapsed:.3f}s: it was held"
    assert held(tmp_path) == 2
    assert not any(p.done() for p in pending)
    s1.start()
    assert describe([p.result(10) for p in pending]) == [200, 200]


def test_requests_wait_while_every_server_is_in_maintenance(pylb, demo, tmp_path):
    s1, s2 = demo("s1"), demo("s2")
    cfg, port = upgrade_config(tmp_path, {"s1": s1.address, "s2": s2.address})
    pylb(cfg)
    for name in ("s1", "s2"):
        assert cli(tmp_path, f"disable server app/{name}") == "\n"
    pending = hold_requests(port, tmp_path, 2)
    assert cli(tmp_path, "enable server app/s2") == "\n"
    outcomes = [p.result(5) for p in pending]
    assert describe(outcomes) == [200, 200]
    assert {o.response.body for o in outcomes} == {b"s2\n"}  # type: ignore[union-attr]


def test_a_backup_server_serves_instead_of_the_hold(pylb, demo, tmp_path):
    b1 = demo("b1")
    cfg, port = upgrade_config(tmp_path, {"s1": f"{HOST}:{free_port()}", "b1": b1.address})
    cfg["backends"]["app"]["servers"]["b1"]["backup"] = True
    pylb(cfg)
    assert wait_until(lambda: stat_rows(tmp_path)[("app", "s1")]["status"] == "DOWN",
                      STATE_TIMEOUT, 0.02)
    outcome = Pending(port, "/b").result(5)
    assert outcome.status == 200, outcome.error
    assert outcome.response.body == b"b1\n"  # type: ignore[union-attr]
    assert outcome.elapsed < 1.0
    assert held(tmp_path) == 0


# -- abortonclose ----------------------------------------------------------------------------


def half_closed_request(port: int, target: str) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(build_request("GET", target))
    return sock


def test_abortonclose_frees_the_place_of_a_client_that_half_closed(pylb, demo, tmp_path):
    s1 = demo("s1", start=False)
    cfg, port = upgrade_config(tmp_path, {"s1": s1.address},
                               backend={"abortonclose": True, "maxqueue": 1})
    pylb(cfg)
    wait_backend_down(tmp_path)
    gone = half_closed_request(port, "/gone")
    wait_held(tmp_path, 1)
    refused = Pending(port, "/refused").result(10)
    assert refused.status == 503, refused.error  # maxqueue 1: the place is taken
    gone.shutdown(socket.SHUT_WR)
    wait_held(tmp_path, 0)
    data = gone.recv(65536)
    assert data == b"", data  # dropped, unanswered
    gone.close()
    kept = Pending(port, "/kept", timeout=15.0)
    wait_held(tmp_path, 1)  # held, not refused: the place is free again
    assert not kept.done()
    s1.start()
    outcome = kept.result(10)
    assert outcome.status == 200, outcome.error


def test_without_abortonclose_a_half_closed_held_request_is_answered(pylb, demo, tmp_path):
    s1 = demo("s1", start=False)
    cfg, port = upgrade_config(tmp_path, {"s1": s1.address}, backend={"maxqueue": 1})
    pylb(cfg)
    wait_backend_down(tmp_path)
    client = half_closed_request(port, "/half")
    wait_held(tmp_path, 1)
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.2)  # nothing to wait on: pylb could drop it now, and must not
    assert held(tmp_path) == 1
    s1.start()
    client.settimeout(10)
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    client.close()
    assert data.startswith(b"HTTP/1.1 200 "), data
    assert data.endswith(b"\r\n\r\ns1\n"), data


# -- set backend ... hold-when-down ----------------------------------------------------------


def test_set_backend_hold_when_down_off_and_on(pylb, demo, tmp_path):
    s1 = demo("s1", start=False)
    cfg, port = upgrade_config(tmp_path, {"s1": s1.address})
    pylb(cfg)
    wait_backend_down(tmp_path)
    pending = hold_requests(port, tmp_path, 3)
    switched = time.monotonic()
    assert cli(tmp_path, "set backend app hold-when-down off") == "\n"
    outcomes = [p.result(5) for p in pending]
    assert describe(outcomes) == [503] * 3
    assert all(o.done_at - switched < 1.0 for o in outcomes), \
        [round(o.done_at - switched, 3) for o in outcomes]
    assert held(tmp_path) == 0
    now = Pending(port, "/off").result(5)
    assert now.status == 503 and now.elapsed < 1.0, (now.error, now.elapsed)
    assert cli(tmp_path, "set backend app hold-when-down on") == "\n"
    later = hold_requests(port, tmp_path, 1, "on")
    s1.start()
    assert describe([later[0].result(10)]) == [200]


def test_set_backend_refuses_what_it_does_not_know(pylb, backends, tmp_path):
    echo = backends.echo("s1")
    cfg, _ = upgrade_config(tmp_path, {"s1": echo.address})
    pylb(cfg)
    for line, error in [
        ("set backend nope hold-when-down on", "No such backend."),
        ("set backend app hold-when-down maybe", "Usage: set backend"),
        ("set backend app maxconn on", "Usage: set backend"),
        ("set backend app", "Usage: set backend"),
    ]:
        answer = cli(tmp_path, line)
        assert error in answer, (line, answer)
    operator = tmp_path / "operator"
    operator.mkdir()
    cfg, _ = upgrade_config(operator, {"s1": echo.address})
    cfg["global"]["stats"]["level"] = "operator"
    pylb(cfg)
    assert "Permission denied" in cli(operator, "set backend app hold-when-down off")
    assert stat_rows(operator)[("app", "s1")]["status"] == "UP"


# -- health checks while requests wait -------------------------------------------------------


@pytest.mark.parametrize("hold", [True, False])
def test_down_servers_are_checked_at_fastinter_while_requests_wait(
    pylb, demo, tmp_path, hold
):
    """inter 2s, fastinter 100ms, downinter 5s: while requests are held, a DOWN server is
    checked at fastinter (and so back UP soon after it restarts); without hold-when-down
    it is checked at downinter. The checks are counted at the server's port, which fails
    each one (HTTP checks, closed at once) until the server restarts."""
    s1 = demo("s1", start=False)
    target = FailingCheckTarget(s1.port)
    cfg, port = upgrade_config(
        tmp_path, {"s1": s1.address}, hold=hold,
        default_server={"inter": "2s", "fastinter": "100ms", "downinter": "5s"},
        backend={"http-check": {"path": "/health"}},
    )
    try:
        lb = pylb(cfg)
        wait_backend_down(tmp_path)
        waiting = hold_requests(port, tmp_path, 1) if hold else []
        since = time.monotonic()
        time.sleep(1.0)  # the window the checks are counted in
        checks = target.count_since(since)
    finally:
        target.stop()
    if not hold:
        assert checks <= 1, f"{checks} checks in 1 s, downinter 5s"
        return
    assert checks >= 4, f"{checks} checks in 1 s, fastinter 100ms"
    mark = len(lb.lines)
    back = s1.start()
    wait_server(lb, "s1", "UP", mark)
    outcome = waiting[0].result(5)
    assert outcome.status == 200, outcome.error
    took = outcome.done_at - back
    assert took < 1.0, f"answered {took:.2f}s after the restart, fastinter 100ms"


def test_a_server_put_in_maintenance_wakes_the_checks_of_the_down_ones(pylb, demo, tmp_path):
    """s1 DOWN, checked at downinter (s2 serves); `disable server app/s2` leaves no usable
    server, so a request is held and s1 is checked at fastinter at once, not after the rest
    of its downinter."""
    s1, s2 = demo("s1", start=False), demo("s2")
    target = FailingCheckTarget(s1.port)
    cfg, port = upgrade_config(
        tmp_path, {"s1": s1.address, "s2": s2.address},
        default_server={"inter": "2s", "fastinter": "100ms", "downinter": "5s"},
        backend={"http-check": {"path": "/health"}},
    )
    try:
        lb = pylb(cfg)
        lb.wait_log(r"Server app/s1 is DOWN\b", STATE_TIMEOUT)
        assert cli(tmp_path, "disable server app/s2") == "\n"
        waiting = hold_requests(port, tmp_path, 1)
        since = time.monotonic()
        time.sleep(1.0)  # the window the checks are counted in
        checks = target.count_since(since)
    finally:
        target.stop()
    assert checks >= 4, f"{checks} checks in 1 s, fastinter 100ms"
    back = s1.start()
    outcome = waiting[0].result(8)
    assert outcome.status == 200, outcome.error
    assert outcome.response.body == b"s1\n"  # type: ignore[union-attr]
    took = outcome.done_at - back
    assert took < 1.0, f"answered {took:.2f}s after the restart, fastinter 100ms"
