"""Stick tables in shared memory: the table itself, then one table for every worker."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml
from backends import HttpConn, IncompleteResponse, free_port

from lb import config
from lb.sticktable import _STRIPE, STRIPE, STRIPES_OFFSET, StickTable


def settings(**kw: Any) -> config.StickTable:
    base: dict[str, Any] = {"type": "string", "size": 1000, "expire": None}
    return config.StickTable(**(base | kw))


def new_table(servers: tuple[str, ...] = ("s1", "s2"), **kw: Any) -> StickTable:
    table = StickTable.create("app", settings(**kw))
    table.register(list(servers))
    return table


# -- the table, in one process ------------------------------------------------------------


def test_learn_lookup_and_least_recently_used_eviction():
    table = new_table(size=3)
    for user in ("a", "b", "c"):
        table.learn(table.key_of(user), "s1")
        time.sleep(0.002)  # distinct access times
    table.set_data(table.key_of("a"), None, {})  # a is used again: b is now the oldest
    time.sleep(0.002)
    table.learn(table.key_of("d"), "s2")
    keys = sorted(table.key_text(e.key) for e in table.entries())
    assert keys == ["a", "c", "d"]
    assert table.used == 3
    assert table.lookup(table.key_of("d")) == "s2"
    assert table.lookup(table.key_of("b")) is None


def test_entries_expire():
    table = new_table(expire=0.05)
    table.learn(table.key_of("a"), "s1")
    assert table.lookup(table.key_of("a")) == "s1"
    time.sleep(0.08)
    assert table.lookup(table.key_of("a")) is None
    assert list(table.entries()) == []
    table.purge(table.stripes)  # the master's sweep gives the room back
    assert table.used == 0


@pytest.mark.parametrize(("kind", "text", "shown"), [
    ("ip", "10.1.2.3", "10.1.2.3"),
    ("ip", "::ffff:10.1.2.3", "10.1.2.3"),
    ("ipv6", "2001:db8::1", "2001:db8::1"),
    ("ipv6", "10.1.2.3", "::ffff:10.1.2.3"),
    ("integer", "-42", "-42"),
    ("string", "alice", "alice"),
])
def test_key_types(kind, text, shown):
    table = new_table(type=kind)
    key = table.key_of(text)
    assert key is not None
    table.learn(key, "s2")
    assert table.lookup(table.key_of(text)) == "s2"
    assert [table.key_text(e.key) for e in table.entries()] == [shown]


def test_keys_that_cannot_be_stored():
    assert new_table(type="ip").key_of("2001:db8::1") is None
    assert new_table(type="integer").key_of("abc") is None
    assert new_table(type="string", key_len=4).key_of("abcdefgh") == b"abcd"  # truncated


def test_against_a_dict_under_random_operations():
    table = new_table(servers=("s1", "s2", "s3"), size=50_000)
    model: dict[bytes, str] = {}
    rnd = random.Random(7)
    for _ in range(30_000):
        key = f"k{rnd.randrange(8000)}".encode()
        draw = rnd.random()
        if draw < 0.6:
            server = rnd.choice(("s1", "s2", "s3"))
            table.set_data(key, server, {})
            model[key] = server
        elif draw < 0.8:
            assert table.remove(key) == (key in model)
            model.pop(key, None)
        else:
            assert table.lookup(key) == model.get(key)
    assert table.used == len(model)
    assert {e.key: table.server_name(e.server) for e in table.entries()} == model


def test_counters_and_rates():
    table = new_table(store=(("conn_cur", 0), ("gpc0", 0), ("http_req_rate", 1000)))
    key = table.key_of("alice")
    for _ in range(5):
        table.count(key, {"http_req_rate": 1, "conn_cur": 1})
    table.count(key, {"conn_cur": -1, "gpc0": 3})
    assert table.data(key, "http_req_rate") == 5
    assert table.data(key, "conn_cur") == 4
    assert table.data(key, "gpc0") == 3
    assert table.data(key, "http_err_rate") is None  # not stored
    time.sleep(1.5)  # half a period later, half of the last period still counts
    assert 1 <= table.data(key, "http_req_rate") <= 4
    time.sleep(1.0)
    assert table.data(key, "http_req_rate") == 0


def test_a_change_of_shape_migrates_entries():
    old = new_table(type="string", size=100)
    for n in range(50):
        old.learn(old.key_of(f"10.0.0.{n}"), "s1" if n % 2 else "s2")
    new = new_table(type="ip", size=200, store=(("gpc0", 0),))
    assert new.migrate_from(old) == 50
    assert new.lookup(new.key_of("10.0.0.7")) == "s1"
    assert new.lookup(new.key_of("10.0.0.8")) == "s2"
    assert new.data(new.key_of("10.0.0.8"), "gpc0") == 0


def test_another_process_sees_the_same_table():
    table = new_table()
    table.learn(table.key_of("alice"), "s2")
    pid = os.fork()
    if pid == 0:  # the child maps the same memory, as a worker does
        child = StickTable(table.fd, "app")
        ok = child.lookup(child.key_of("alice")) == "s2"
        child.learn(child.key_of("bob"), "s1")
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.lookup(table.key_of("bob")) == "s1"


def test_concurrent_writers_in_several_processes():
    table = new_table(size=20_000)
    children = []
    for n in range(4):
        pid = os.fork()
        if pid == 0:
            mine = StickTable(table.fd, "app")
            for i in range(2000):
                mine.learn(mine.key_of(f"w{n}-{i}"), "s1" if n % 2 else "s2")
                mine.learn(mine.key_of(f"shared-{i % 300}"), "s1")
            os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    entries = {table.key_text(e.key): table.server_name(e.server) for e in table.entries()}
    assert len(entries) == 4 * 2000 + 300
    assert table.used == len(entries)
    assert entries["w1-1999"] == "s1" and entries["w2-0"] == "s2"


def test_a_writer_that_died_mid_write_leaves_a_usable_stripe():
    table = new_table()
    for n in range(200):
        table.learn(table.key_of(f"u{n}"), "s1")
    stripe, tag = table._hash(table.key_of("u7"))
    header = STRIPES_OFFSET + _STRIPE.size * stripe
    sequence, count = _STRIPE.unpack_from(table._mm, header)
    # What a writer killed between its two sequence bumps leaves: an odd sequence and a
    # half-written slot (here: garbage where an empty slot was).
    _STRIPE.pack_into(table._mm, header, sequence + 1, count)
    first = table._slots_at + stripe * STRIPE * table.slot_size
    empty = next(first + n * table.slot_size for n in range(STRIPE)
                 if table._mm[first + n * table.slot_size] == 0)
    table._mm[empty : empty + 8] = b"\x01\x05garbag"
    assert table.lookup(table.key_of("u7")) == "s1"  # the reader repaired it, not hung
    assert _STRIPE.unpack_from(table._mm, header)[0] % 2 == 0
    table.learn(table.key_of("u7"), "s2")
    assert table.lookup(table.key_of("u7")) == "s2"
    assert sorted(table.key_text(e.key) for e in table.entries()) == sorted(
        f"u{n}" for n in range(200))


def test_a_writer_killed_by_sigkill_while_writing():
    table = new_table(size=50_000)
    for attempt in range(10):
        pid = os.fork()
        if pid == 0:
            mine = StickTable(table.fd, "app")
            n = 0
            while True:  # as fast as it can, until killed
                mine.learn(mine.key_of(f"k{n % 30_000}"), "s1" if n % 3 else "s2")
                n += 1
        time.sleep(0.02 + attempt * 0.013)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # The table stays usable: lookups answer, writers get the lock, entries check out.
        key = table.key_of(f"probe{attempt}")
        table.learn(key, "s2")
        assert table.lookup(key) == "s2"
    for entry in table.entries():
        assert table.lookup(entry.key) == table.server_name(entry.server)


# -- one table for every worker ---------------------------------------------------------


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


def test_an_entry_learned_by_one_worker_is_used_by_the_next_request_on_every_worker(
    pylb, backends
):
    """200 keys, each learned by one request, then asked by 16 concurrent requests on new
    connections, whichever of the 4 workers they reach: not one goes elsewhere."""
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    port = free_port()
    pylb(stick_config(port, [s1.address, s2.address]))
    misrouted = []
    with ThreadPoolExecutor(16) as pool:
        for n in range(200):
            user = f"user{n}"
            first = request(port, user)
            for server in pool.map(request, [port] * 16, [user] * 16):
                if server != first:
                    misrouted.append((user, first, server))
    assert misrouted == []


def test_table_survives_a_worker_restart(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    port = free_port()
    lb = pylb(stick_config(port, [s1.address, s2.address], workers=1))
    first = {user: request(port, user) for user in ("carol", "dave", "erin")}
    worker = lb.workers()[0]
    mark = len(lb.lines)
    worker.kill()
    lb.wait_log(r"worker 1/1 gen 1 started", 5, start=mark)
    # The new worker maps the same table: every entry is there.
    for user, server in first.items():
        assert {request(port, user) for _ in range(4)} == {server}


def test_workers_killed_while_learning_leave_the_table_usable(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    port = free_port()
    lb = pylb(stick_config(port, [s1.address, s2.address], workers=2))
    stop = threading.Event()
    errors: list[str] = []

    def learn_many(offset: int) -> None:
        n = 0
        while not stop.is_set() and n < 5000:
            try:
                request(port, f"load{offset}-{n}")
            except (OSError, AssertionError, IncompleteResponse) as exc:  # a killed worker's
                errors.append(str(exc))
            n += 1

    threads = [threading.Thread(target=learn_many, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            time.sleep(0.3)
            victim = lb.workers()[0]
            mark = len(lb.lines)
            victim.kill()
            lb.wait_log(r"started \(pid", 5, start=mark)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    # Whatever the kills interrupted, the table serves: new keys stick on every worker.
    for n in range(20):
        first = request(port, f"after{n}")
        assert {request(port, f"after{n}") for _ in range(4)} == {first}


def test_a_reload_that_changes_the_table_shape_moves_its_entries(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    port = free_port()
    cfg = stick_config(port, [s1.address, s2.address], workers=2)
    lb = pylb(cfg)
    first = {f"user{n}": request(port, f"user{n}") for n in range(30)}
    table = cfg["backends"]["app"]["stick-table"]
    table.update({"size": 5000, "len": 64, "store": ["http_req_cnt"]})
    lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    mark = len(lb.lines)
    lb.signal(signal.SIGUSR2)
    lb.wait_log(r"stick table app changed shape .*: 30 entries moved", 10, start=mark)
    lb.wait_log(r"reload 1 done", 10, start=mark)
    for user, server in first.items():
        assert request(port, user) == server
