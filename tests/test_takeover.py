"""Takeover by a new process, the HAProxy way (seed 004):
`pylb -f CFG -p PIDFILE -D -sf $(cat PIDFILE)` under load loses nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml
from backends import HttpConn, free_port, wait_until, workers_of
from conftest import REPO

PYLB = [sys.executable, str(REPO / "bin" / "pylb")]


def write_config(path: Path, port: int, servers: list[str]) -> None:
    path.write_text(yaml.safe_dump({
        "global": {"workers": 2, "stats": {"socket": "lb.sock", "level": "admin",
                                             "expose-fd": "listeners"}},
        "frontends": {"www": {"bind": f"127.0.0.1:{port}", "default_backend": "app"}},
        "backends": {"app": {
            "cookie": {"name": "SRV", "mode": "insert"},
            "servers": {f"s{i}": {"address": a, "cookie": f"s{i}"}
                        for i, a in enumerate(servers, 1)},
        }},
    }))


def command(workdir: Path, line: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(workdir / "lb.sock"))
        sock.sendall(line.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def start_daemon(workdir: Path, *extra: str) -> int:
    """`pylb -f lb.cfg -p pylb.pid -D [extra]`; the new master's pid once it serves."""
    pidfile = workdir / "pylb.pid"
    before = pidfile.read_text().strip() if pidfile.exists() else ""
    done = subprocess.run([*PYLB, "-f", "lb.cfg", "-p", "pylb.pid", "-D", *extra],
                          cwd=workdir, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() not in
                      ("", before), 10)
    pid = int(pidfile.read_text())
    assert wait_until(lambda: len(workers_of(pid)) == 2, 10)
    assert wait_until(lambda: _answers(workdir), 10)
    return pid


def terminate(pids: list[int]) -> None:
    """SIGTERM to each of these pylb masters still running."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _answers(workdir: Path) -> bool:
    try:
        return command(workdir, "show info").startswith("Name: pylb")
    except OSError:
        return False


def test_takeover_under_load_loses_nothing(tmp_path: Path, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    port = free_port()
    write_config(tmp_path / "lb.cfg", port, [s1.address, s2.address])
    pids = [start_daemon(tmp_path)]
    stop = threading.Event()
    results: dict[str, int] = {"ok": 0, "failed": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def keep_alive_client() -> None:
        conn = HttpConn(port)
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                ok = conn.request("GET", "/").status == 200
            except Exception as err:  # any failure counts: that is what is measured
                ok = False
                errors.append(repr(err))
            with lock:
                results["ok" if ok else "failed"] += 1
        conn.close()

    try:
        # pinned to s1 by its cookie, drained before the takeovers: must stay so
        command(tmp_path, "set server app/s1 state drain")
        clients = [threading.Thread(target=keep_alive_client) for _ in range(6)]
        for client in clients:
            client.start()
        for _ in range(4):
            old = pids[-1]
            pids.append(start_daemon(tmp_path, "-sf", str(old)))
            assert wait_until(lambda o=old: not psutil.pid_exists(o) or
                              psutil.Process(o).status() == psutil.STATUS_ZOMBIE, 15)
        stop.set()
        for client in clients:
            client.join(10)
        assert results["failed"] == 0, (results, errors[:5])
        assert results["ok"] > 100
        # The last master carries the state set on the first one.
        state = command(tmp_path, "show servers state")
        s1_row = next(line for line in state.splitlines() if " s1 " in line)
        assert s1_row.split()[6] == "8", state  # srv_admin_state: drain
        assert len(workers_of(pids[-1])) == 2
    finally:
        stop.set()
        terminate(pids)


def test_server_maxconn_holds_across_old_and_new_process(tmp_path: Path):
    """During a takeover both processes serve; the new one keeps the slot counts of both,
    so the server never sees more than its maxconn, and every queued request is served."""
    from test_limits import CountingServer

    server = CountingServer("s1", delay=0.4)
    try:
        port = free_port()
        (tmp_path / "lb.cfg").write_text(yaml.safe_dump({
            "global": {"workers": 2, "stats": {"socket": "lb.sock", "level": "admin",
                                             "expose-fd": "listeners"}},
            "defaults": {"timeout": {"queue": "20s"}},
            "frontends": {"www": {"bind": f"127.0.0.1:{port}", "default_backend": "app"}},
            "backends": {"app": {"servers": {"s1": {"address": server.address,
                                                      "maxconn": 2}}}},
        }))
        pids = [start_daemon(tmp_path)]
        statuses: list[int] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            with HttpConn(port, timeout=20) as conn:
                status = conn.request("GET", f"/r{i}", headers={"Connection": "close"}).status
            with lock:
                statuses.append(status)

        clients = [threading.Thread(target=client, args=(i,)) for i in range(10)]
        for thread in clients:
            thread.start()
        assert server.wait_in_flight(2)
        pids.append(start_daemon(tmp_path, "-sf", str(pids[0])))  # while 8 wait in queue
        for thread in clients:
            thread.join(20)
        assert statuses == [200] * 10
        assert server.total == 10
        assert server.max_seen == 2
    finally:
        server.stop()
        terminate(pids)
