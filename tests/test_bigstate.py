"""State of any size: a million stick entries and a million-line map survive a reload, a
worker killed with -9 and a takeover by a new process, and route every sampled key as
before. Nothing of that state travels in a control message: the tables and map indexes
are shared memory handed over by descriptor."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
from pathlib import Path

import psutil
import yaml
from backends import HttpConn, free_port, wait_until, workers_of
from test_takeover import command, start_daemon

ENTRIES = 1_000_000
SAMPLE = 150


def write_config(workdir: Path, port: int, servers: list[str]) -> None:
    (workdir / "lb.cfg").write_text(yaml.safe_dump({
        "global": {"workers": 2, "stats": {"socket": "lb.sock", "level": "admin",
                                             "expose-fd": "listeners"},
                   "log": "pylb.log"},
        "maps": {"big": "big.map"},
        "frontends": {"www": {
            "bind": f"127.0.0.1:{port}",
            "default_backend": "app",
            "http-request": ["set-header X-Mapped %[path,map(big,miss)]"],
        }},
        "backends": {"app": {
            "stick-table": {"type": "string", "len": 16, "size": "1m"},
            "stick-on": "req.hdr(X-User)",
            "servers": {f"s{i}": {"address": a} for i, a in enumerate(servers, 1)},
        }},
    }))


def write_map(path: Path, lines: int) -> None:
    with path.open("w") as f:
        for start in range(0, lines, 100_000):
            f.write("".join(f"/k{n} v{n}\n" for n in range(start, min(lines, start + 100_000))))


def server_for(n: int) -> str:
    return "s1" if n % 3 else "s2"


def fill_table(workdir: Path, count: int) -> None:
    """`set table` for `count` keys over one prompt-mode connection, pipelined."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(str(workdir / "lb.sock"))
        sock.sendall(b"prompt\n")
        answers = {"prompts": 0}

        def read() -> None:
            wanted = count + 1  # the first prompt too
            while answers["prompts"] < wanted:
                data = sock.recv(1 << 20)
                if not data:
                    break
                answers["prompts"] += data.count(b"> ")

        reader = threading.Thread(target=read)
        reader.start()
        batch = 5000
        for start in range(0, count, batch):
            lines = "".join(
                f"set table app key u{n} data.server_key {server_for(n)}\n"
                for n in range(start, min(count, start + batch))
            )
            sock.sendall(lines.encode())
        reader.join(120)
        assert answers["prompts"] >= count + 1, answers


def used(workdir: Path) -> int:
    header = command(workdir, "show table").splitlines()[0]
    return int(header.rsplit("used:", 1)[1])


def shared_memory(master: int) -> set[tuple[str, int]]:
    """(name, inode) of the stick-table and map memfds every worker of `master` maps."""
    found = set()
    for worker in workers_of(master):
        for fd in os.listdir(f"/proc/{worker.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{worker.pid}/fd/{fd}")
                if target.startswith(("/memfd:pylb-stick", "/memfd:pylb-map")):
                    found.add((target.split()[0], os.stat(f"/proc/{worker.pid}/fd/{fd}").st_ino))
            except FileNotFoundError:
                continue  # closed meanwhile
    return found


def check_sample(port: int, keys: list[int]) -> None:
    """Each sampled user goes to its server; each sampled path maps to its value."""
    wrong = []
    for n in keys:
        with HttpConn(port) as conn:
            answer = conn.request("GET", f"/k{n}", headers={"X-User": f"u{n}",
                                                             "Connection": "close"})
            body = answer.json()
            mapped = dict((k.lower(), v) for k, v in body["headers"]).get("x-mapped")
            if body["server"] != server_for(n) or mapped != f"v{n}":
                wrong.append((n, body["server"], mapped))
    assert wrong == []


def test_a_million_entries_and_map_lines_survive_reload_kill_and_takeover(tmp_path, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    port = free_port()
    write_config(tmp_path, port, [s1.address, s2.address])
    write_map(tmp_path / "big.map", ENTRIES)
    master = start_daemon(tmp_path)
    try:
        fill_table(tmp_path, ENTRIES)
        assert used(tmp_path) == ENTRIES
        keys = random.Random(3).sample(range(ENTRIES), SAMPLE)
        check_sample(port, keys)
        memory = shared_memory(master)
        assert len(memory) == 2, memory  # one table, one map, the same in both workers

        assert command(tmp_path, "reload").startswith("Success=1"), "reload failed"
        check_sample(port, keys)
        assert wait_until(lambda: shared_memory(master) == memory, 5), "state was copied"

        victim = workers_of(master)[0]
        victim.send_signal(signal.SIGKILL)
        assert wait_until(lambda: victim.pid not in [c.pid for c in workers_of(master)]
                          and len(workers_of(master)) == 2, 10)
        check_sample(port, keys)

        old = master
        master = start_daemon(tmp_path, "-sf", str(old))
        assert wait_until(lambda: not psutil.pid_exists(old)
                          or psutil.Process(old).status() == psutil.STATUS_ZOMBIE, 15), \
            "the old pylb stayed: " + (tmp_path / "pylb.log").read_text()[-3000:]
        assert used(tmp_path) == ENTRIES
        check_sample(port, keys)
        assert shared_memory(master) == memory, "the new process copied the state"
    finally:
        try:
            os.kill(master, signal.SIGTERM)
        except ProcessLookupError:
            pass
        wait_until(lambda: not psutil.pid_exists(master)
                   or psutil.Process(master).status() == psutil.STATUS_ZOMBIE, 10)
