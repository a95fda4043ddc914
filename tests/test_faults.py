"""The master stays up whatever a reload, a worker or a peer does; when it dies anyway,
its workers let the port go at once and finish what is in flight."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import deque
from typing import Any

import psutil
import pytest
import yaml
from backends import HttpConn, IncompleteResponse, free_port, wait_until
from test_limits import counting  # noqa: F401 (a fixture)

from lb import config
from lb.queue import Keeper
from lb.shared import Shared


def limited_config(port: int, servers: dict[str, str], tmp: Any, maxconn: int = 3,
                   workers: int = 2) -> dict[str, Any]:
    return {
        "global": {"workers": workers,
                   "stats": {"socket": str(tmp / "lb.sock"), "level": "admin"}},
        "defaults": {"timeout": {"queue": "10s"}},
        "frontends": {"www": {"bind": f"127.0.0.1:{port}", "default_backend": "app"}},
        "backends": {"app": {"servers": {
            name: {"address": address, "maxconn": maxconn} for name, address in servers.items()
        }}},
    }


def cli(tmp: Any, line: str, timeout: float = 10.0) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(tmp / "lb.sock"))
        sock.sendall(line.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


class Load:
    """Keep-alive clients sending slow requests until stopped; every answer recorded."""

    def __init__(self, port: int, clients: int, target: str = "/slow?delay=0.02") -> None:
        self.port, self.target = port, target
        self.statuses: deque[int] = deque()
        self.errors: deque[str] = deque()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        conn = HttpConn(self.port, timeout=15)
        deadline = time.monotonic() + 30
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.statuses.append(conn.request("GET", self.target).status)
            except (OSError, IncompleteResponse) as exc:
                self.errors.append(repr(exc))
                conn.close()
                conn = HttpConn(self.port, timeout=15)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)


def test_a_reload_that_removes_a_limited_server_under_load_loses_nothing(
    pylb, counting, tmp_path  # noqa: F811
):
    s1, s2 = counting("s1", delay=0.02), counting("s2", delay=0.02)
    port = free_port()
    cfg = limited_config(port, {"s1": s1.address, "s2": s2.address}, tmp_path)
    lb = pylb(cfg)
    load = Load(port, 20)
    try:
        assert s2.wait_in_flight(1)
        for round_ in range(3):  # s2 out, s2 back: each under load
            servers = cfg["backends"]["app"]["servers"]
            if round_ % 2 == 0:
                del servers["s2"]
            else:
                servers["s2"] = {"address": s2.address, "maxconn": 3}
            lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            mark = len(lb.lines)
            lb.signal(signal.SIGUSR2)
            lb.wait_log(rf"reload {round_ + 1} done", 20, start=mark)
            served = len(load.statuses)  # then under load on the new generation:
            assert wait_until(lambda n=served: len(load.statuses) >= n + 40, 20)
    finally:
        load.stop()
    assert lb.proc.poll() is None, "the master died:\n" + lb.output()
    assert "Traceback" not in lb.output()
    assert list(load.errors) == []
    assert set(load.statuses) == {200} and len(load.statuses) > 100
    assert s1.max_seen <= 3 and s2.max_seen <= 3, (s1.max_seen, s2.max_seen)


def test_a_reload_whose_workers_cannot_start_changes_nothing(pylb, backends, tmp_path):
    echo = backends.echo("s1")
    port = free_port()
    cfg = limited_config(port, {"s1": echo.address}, tmp_path, maxconn=0)
    lb = pylb(cfg)
    master = psutil.Process(lb.pid)
    before_fds = len(os.listdir(f"/proc/{lb.pid}/fd"))
    workers = {w.pid for w in lb.workers()}
    # Valid for the master, fatal for the new workers: they open the log when they start.
    cfg["global"]["log"] = str(tmp_path / "no-such-dir" / "pylb.log")
    lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    answer = cli(tmp_path, "reload", timeout=30)
    assert answer.startswith("Success=0"), answer
    assert "exited before accepting" in answer, answer
    # the running generation, untouched; the attempt's workers, gone
    assert wait_until(lambda: {w.pid for w in lb.workers()} == workers, 5), lb.workers()

    def kinds() -> list[list[str]]:
        proc = cli(tmp_path, "show proc")
        rows = [line.split() for line in proc.splitlines() if not line.startswith("#")]
        return [row[1:3] for row in rows if len(row) > 2]

    # No half generation, once the master has reaped the attempt's workers (a killed one
    # leaves the process list a moment before the master sees its exit).
    expected = [["master", "1"], ["worker", "1"], ["worker", "1"]]
    assert wait_until(lambda: kinds() == expected, 5, 0.02), cli(tmp_path, "show proc")
    with HttpConn(port) as conn:
        assert conn.request("GET", "/").status == 200
    assert wait_until(lambda: len(os.listdir(f"/proc/{lb.pid}/fd")) == before_fds, 5), (
        "descriptors opened for the failed reload were left open",
        before_fds, sorted(os.readlink(f"/proc/{lb.pid}/fd/{fd}")
                           for fd in os.listdir(f"/proc/{lb.pid}/fd")))
    assert master.is_running()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return True
        except OSError:
            return False


def test_a_dead_master_frees_the_port_at_once_and_in_flight_requests_finish(
    pylb, backends, tmp_path
):
    echo = backends.echo("s1")
    port = free_port()
    lb = pylb(limited_config(port, {"s1": echo.address}, tmp_path, maxconn=0))
    workers = lb.workers()
    slow = HttpConn(port, timeout=10)
    slow.send(b"GET /?delay=1.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)  # the request is with the server
    os.kill(lb.pid, signal.SIGKILL)
    killed = time.monotonic()
    assert wait_until(lambda: _port_free(port), 1.0), "the port was still held 1 s later"
    assert time.monotonic() - killed < 1.0
    assert slow.read_response().status == 200  # what was in flight finished
    slow.close()
    assert wait_until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                      for w in workers), 5), "workers stayed"


def test_a_master_killed_in_the_middle_of_a_reload_leaves_no_worker(pylb, backends, tmp_path):
    echo = backends.echo("s1")
    port = free_port()
    lb = pylb(limited_config(port, {"s1": echo.address}, tmp_path, maxconn=0))
    mark = len(lb.lines)
    lb.signal(signal.SIGUSR2)
    lb.wait_log(r"worker 2/2 gen 2 started", 10, start=mark)
    everyone = lb.workers()
    os.kill(lb.pid, signal.SIGKILL)
    assert wait_until(lambda: _port_free(port), 1.0), "the port was still held 1 s later"
    assert wait_until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                      for w in everyone), 5), "workers stayed"


def test_more_workers_than_the_maximum_is_a_config_error():
    with pytest.raises(config.ConfigError, match="workers: expected an integer from 1 to 64"):
        config.loads("global: {workers: 65}\nfrontends: {}\nbackends: {}\n")


# -- the slot keeper, through reloads --------------------------------------------------------


class Owner:
    """A worker as the keeper sees it: the servers it knows, the grants it got."""

    def __init__(self, pid: int, servers: set[tuple[str, str]]) -> None:
        self.pid = pid
        self.servers = servers
        self.grants: list[dict[str, Any]] = []

    def knows(self, backend: str, server: str) -> bool:
        return (backend, server) in self.servers


def keeper_for(text: str) -> tuple[Keeper, config.Config]:
    cfg = config.loads(text)
    return Keeper(cfg, Shared.create(cfg), lambda owner, message: owner.grants.append(message)), cfg


TWO = """
backends:
  app:
    servers:
      s1: {address: "127.0.0.1:1", maxconn: 1}
      s2: {address: "127.0.0.1:2", maxconn: 1}
frontends: {www: {bind: "127.0.0.1:1", default_backend: app}}
"""
ONE = TWO.replace('      s2: {address: "127.0.0.1:2", maxconn: 1}\n', "")


def test_the_keeper_serves_an_older_generation_on_a_server_a_reload_removed():
    keeper, _ = keeper_for(TWO)
    old = Owner(1, {("app", "s1"), ("app", "s2")})
    keeper.acquire(old, {"id": 1, "be": "app", "srv": "s2", "persist": True})
    assert old.grants[-1]["srv"] == "s2"
    cfg = config.loads(ONE)
    keeper.reconfigure(cfg, Shared.create(cfg))  # s2 removed while it holds a slot
    keeper.acquire(old, {"id": 2, "be": "app", "srv": "s2", "persist": True})
    assert len(old.grants) == 1  # s2 is still limited to 1: the request waits
    keeper.release(old, {"be": "app", "srv": "s2"})
    assert old.grants[-1] == {"op": "grant", "id": 2, "be": "app", "srv": "s2"}
    new = Owner(2, {("app", "s1")})
    keeper.acquire(new, {"id": 1, "be": "app", "srv": "s1", "persist": False})
    keeper.acquire(new, {"id": 2, "be": "app", "srv": "s1", "persist": False})
    keeper.release(old, {"be": "app", "srv": "s2"})  # s2 frees: not for the new generation
    assert [g["srv"] for g in new.grants] == ["s1"]
    keeper.release(new, {"be": "app", "srv": "s1"})
    assert [g["srv"] for g in new.grants] == ["s1", "s1"]
    keeper.forget_retired()
    assert ("app", "s2") not in keeper.servers


def test_the_keeper_answers_requests_for_servers_it_never_knew():
    keeper, _ = keeper_for(ONE)
    stranger = Owner(7, set())
    keeper.acquire(stranger, {"id": 3, "be": "nope", "srv": "x", "persist": False})
    keeper.release(stranger, {"be": "nope", "srv": "x"})
    keeper.cancel(stranger, {"id": 3})
    assert stranger.grants == [{"op": "grant", "id": 3, "be": "nope", "srv": None}]


def test_a_slot_that_frees_while_a_queued_request_moves_waits_for_it(monkeypatch):
    """A reload moves queued requests to the new generation with the ticket of their place
    (lb.master _hand_over -> Keeper.moved). A slot that frees before the new worker asks
    again is kept for the request, not granted to the old worker (which let it go and
    would hand it back: the request then lost its turn, test_reload's queued order)."""
    keeper, _ = keeper_for(ONE)
    old, new = Owner(1, {("app", "s1")}), Owner(2, {("app", "s1")})

    def ask(owner: Owner, ident: int, resume: list[int] | None = None) -> None:
        keeper.acquire(owner, {"id": ident, "be": "app", "srv": "s1", "persist": False,
                               "resume": resume})

    for ident in (1, 2, 3):  # 1 has the slot, 2 and 3 wait
        ask(old, ident)
    ask(new, 1)  # arrived in the new generation: after them
    keeper.moved([1, 2], new)
    keeper.moved([1, 3], new)
    keeper.release(old, {"be": "app", "srv": "s1"})
    assert [g["id"] for g in old.grants] == [1] and new.grants == []  # kept for [1, 2]
    ask(new, 2, resume=[1, 2])
    assert new.grants == [{"op": "grant", "id": 2, "be": "app", "srv": "s1"}]
    keeper.release(new, {"be": "app", "srv": "s1"})  # [1, 3] is still on its way: kept too
    assert len(new.grants) == 1
    monkeypatch.setattr("lb.queue.SLOT_KEPT", 0.0)
    keeper.expire_kept()  # [1, 3] never came: the slot goes on, its turn stays
    assert new.grants[-1]["id"] == 1
    ask(new, 3, resume=[1, 3])
    keeper.release(new, {"be": "app", "srv": "s1"})
    assert [g["id"] for g in new.grants] == [2, 1, 3]
    assert keeper.kept == {} and keeper.queued("app") == 0


# -- the stats socket's takeover commands and stalled peers ----------------------------------


def test_takeover_commands_need_expose_fd_and_admin(pylb, backends, tmp_path):
    echo = backends.echo("s1")
    port = free_port()
    cfg = limited_config(port, {"s1": echo.address}, tmp_path, maxconn=0)
    pylb(cfg)
    for command in ("_getsocks", "_getstate", "_handover"):
        assert "Permission denied" in cli(tmp_path, command), command


def test_takeover_commands_at_operator_level_with_expose_fd(pylb, backends, tmp_path):
    echo = backends.echo("s1")
    port = free_port()
    cfg = limited_config(port, {"s1": echo.address}, tmp_path, maxconn=0)
    cfg["global"]["stats"].update({"level": "operator", "expose-fd": "listeners"})
    pylb(cfg)
    assert "listeners" in cli(tmp_path, "_getsocks")
    for command in ("_getstate", "_handover"):
        assert "needs expose-fd listeners and level admin" in cli(tmp_path, command)


def test_stalled_and_garbage_clients_do_not_hold_the_master(pylb, backends, tmp_path):
    echo = backends.echo("s1")
    port = free_port()
    cfg = limited_config(port, {"s1": echo.address}, tmp_path, maxconn=0)
    cfg["global"]["stats"]["expose-fd"] = "listeners"
    pylb(cfg)
    idle = []
    for _ in range(300):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(tmp_path / "lb.sock"))
        idle.append(sock)
    stalled = socket.socket(socket.AF_UNIX)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(str(tmp_path / "lb.sock"))
    stalled.sendall(b"_handover\n")  # and never reads
    garbage = socket.socket(socket.AF_UNIX)
    garbage.connect(str(tmp_path / "lb.sock"))
    try:
        garbage.sendall(os.urandom(1 << 20))
    except OSError:
        pass  # cut off: that is the point
    try:
        for _ in range(5):
            start = time.monotonic()
            assert cli(tmp_path, "show info").startswith("Name: pylb")
            assert time.monotonic() - start < 1.0
            with HttpConn(port) as conn:
                assert conn.request("GET", "/").status == 200
    finally:
        for sock in (*idle, stalled, garbage):
            sock.close()
