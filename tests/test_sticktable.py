"""Stick tables: one table for pylb as a whole, owned by the master, replicated to workers."""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil
from backends import HttpConn, free_port, wait_until

from lb import config
from lb.sticktable import Replica, Tables

TABLE = """
backends:
  app:
    stick-table: {type: string, size: 3, expire: 10s}
    stick-on: req.hdr(X-User)
    servers:
      s1: {address: "127.0.0.1:1"}
frontends:
  www: {bind: "127.0.0.1:1", default_backend: app}
"""


def test_full_table_evicts_the_oldest_entry():
    tables = Tables(config.loads(TABLE))
    for user in ("a", "b", "c"):
        assert tables.learn("app", user, "s1")["del"] == []
    tables.learn("app", "a", "s1")  # a is used again: b is now the oldest
    update = tables.learn("app", "d", "s1")
    assert update["del"] == ["b"]
    assert list(tables.tables["app"]) == ["c", "a", "d"]


def test_replica_tells_the_master_only_what_is_news():
    sent: list[dict[str, Any]] = []
    replica = Replica("app", config.loads(TABLE).backends["app"].stick_table, sent.append)
    replica.learn("alice", "s1")
    replica.learn("alice", "s1")  # known, far from expiry: nothing to say
    replica.learn("alice", "s2")  # moved
    assert [m["srv"] for m in sent] == ["s1", "s2"]
    assert replica.lookup("alice") == "s2"
    replica.apply({"set": [["bob", "s1", time.monotonic() - 1]]})  # already expired
    assert replica.lookup("bob") is None
    replica.apply({"del": ["alice"]})
    assert replica.lookup("alice") is None


def stick_config(port: int, servers: list[str], workers: int = 4) -> dict[str, Any]:
    return {
        "global": {"workers": workers},
        "frontends": {"www": {"bind": f"127.0.0.1:{port}", "default_backend": "app"}},
        "backends": {
            "app": {
                "balance": "roundrobin",
                "stick-table": {"type": "string", "size": 1000, "expire": "1m"},
                "stick-on": "req.hdr(X-User)",
                "servers": {f"s{i}": {"address": a} for i, a in enumerate(servers, 1)},
            }
        },
    }


def request(port: int, user: str, target: str = "/") -> str:
    with HttpConn(port) as conn:
        response = conn.request("GET", target, headers={"X-User": user, "Connection": "close"})
        assert response.status == 200
        return response.json()["server"]


def test_entry_learned_by_one_worker_is_used_by_all(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    port = free_port()
    lb = pylb(stick_config(port, [s1.address, s2.address]))
    first = request(port, "alice")
    # Straight after that answer, 24 concurrent requests on new connections: they spread
    # over the 4 workers, and every one goes where alice was first sent (round-robin alone
    # would alternate). The entry travelled worker -> master -> workers meanwhile.
    backend_port = int((s1 if first == "s1" else s2).address.rsplit(":", 1)[1])
    serving: set[int] = set()

    def count_serving_workers() -> bool:
        for worker in lb.workers():
            try:
                conns = worker.net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            if any(c.raddr and c.raddr.port == backend_port for c in conns):
                serving.add(worker.pid)
        return len(serving) >= 2

    # Which worker accepts is the kernel's choice: a few batches make sure that
    # several workers served alice (each batch must stick to her server anyway).
    for _batch in range(4):
        results: list[str] = []
        lock = threading.Lock()

        def client(out: list[str] = results, guard: threading.Lock = lock) -> None:
            server = request(port, "alice", "/?delay=0.3")
            with guard:
                out.append(server)

        threads = [threading.Thread(target=client) for _ in range(24)]
        for thread in threads:
            thread.start()
        wait_until(count_serving_workers, 1.5)
        for thread in threads:
            thread.join(10)
        assert results == [first] * 24
        if len(serving) >= 2:
            break
    assert len(serving) >= 2, "the requests did not spread over several workers"
    # bob, new, is balanced normally and then sticks too
    bob = request(port, "bob")
    assert {request(port, "bob") for _ in range(6)} == {bob}


def test_table_survives_a_worker_restart(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    port = free_port()
    lb = pylb(stick_config(port, [s1.address, s2.address], workers=1))
    first = request(port, "carol")
    worker = lb.workers()[0]
    mark = len(lb.lines)
    worker.kill()
    lb.wait_log(r"worker 1/1 gen 1 started", 5, start=mark)
    assert wait_until(lambda: len(lb.workers()) == 1 and lb.workers()[0].pid != worker.pid, 5)
    # The new worker got the master's table in its first message.
    assert {request(port, "carol") for _ in range(6)} == {first}
