"""Tunnels move to the new generation at a reload (lb.handover): WebSocket tunnels and
TCP-mode sessions keep talking, in order, and the old generation exits at once."""

from __future__ import annotations

import hashlib
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from backends import (
    TCP_BANNER,
    HttpConn,
    build_request,
    free_port,
    pattern_sha256,
    recv_exact,
    wait_until,
    workers_of,
    ws_upgrade,
)
from test_reload import METHODS, cli, generations, start, worker_pids
from test_takeover import start_daemon, terminate

OLD_GONE = 1.0  # seconds after a reload by which only the new generation may remain
TUNNELS = 500  # of each kind
HOST = "127.0.0.1"


def tunnel_config(ws: str, tcp: str, *, workers: int = 2, tcp_server: dict[str, Any] | None = None,
                  **top: Any) -> dict[str, Any]:
    return {
        "global": {"workers": workers, "stats": {"socket": "lb.sock", "level": "admin",
                                                 "expose-fd": "listeners"}},
        "defaults": {"timeout": {"connect": "2s", "client": "30s", "server": "30s",
                                 "tunnel": "60s", "queue": "30s"}},
        "frontends": {
            "ws": {"bind": f"{HOST}:{free_port()}", "default_backend": "web"},
            "db": {"bind": f"{HOST}:{free_port()}", "mode": "tcp", "default_backend": "pg"},
        },
        "backends": {
            "web": {"servers": {"w1": {"address": ws}}},
            "pg": {"mode": "tcp", "servers": {"p1": {"address": tcp, **(tcp_server or {})}}},
        },
        **top,
    }


def open_ws(port: int, buffers: int = 0) -> socket.socket:
    sock = socket.socket()
    if buffers:  # small socket buffers: the relay's own fill sooner
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    sock.settimeout(10)
    sock.connect((HOST, port))
    ws_upgrade(sock)
    return sock


def open_tcp(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    assert recv_exact(sock, len(TCP_BANNER)) == TCP_BANNER
    return sock


class Chatter(threading.Thread):
    """Numbered messages on every tunnel, round after round: each must come back once
    and in order. `rounds` counts the rounds every tunnel completed."""

    def __init__(self, socks: list[socket.socket]) -> None:
        super().__init__(daemon=True)
        self.socks = socks
        self.rounds = 0
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        seq = 0
        while not self.halt.is_set() and not self.errors:
            seq += 1
            lines = [b"%d:%d:%s\n" % (i, seq, b"x" * (seq % 97)) for i in range(len(self.socks))]
            i = 0
            try:
                for i in range(len(self.socks)):
                    self.socks[i].sendall(lines[i])
                for i, (sock, line) in enumerate(zip(self.socks, lines, strict=True)):
                    got = recv_exact(sock, len(line))
                    if got != line:
                        self.errors.append(f"tunnel {i} round {seq}: {got!r} != {line!r}")
            except OSError as err:
                self.errors.append(f"tunnel {i} round {seq}: {err!r}")
            self.rounds += 1

    def wait_rounds(self, more: int, timeout: float = 10.0) -> None:
        target = self.rounds + more
        assert wait_until(lambda: self.rounds >= target or bool(self.errors), timeout), \
            f"stuck at round {self.rounds}"
        assert not self.errors, self.errors[:3]

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        assert not self.errors, self.errors[:3]


def enough_descriptors(needed: int) -> None:
    """Raise our soft limit on open files (pylb inherits it) to `needed`, if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def test_tunnels_move_through_reloads_by_every_method(pylb, backends):
    """500 WebSocket tunnels and 500 TCP-mode sessions talking all along, 21 reloads."""
    enough_descriptors(8192)  # clients and servers here, both sides of 1000 tunnels in pylb
    ws, tcp = backends.echo("ws"), backends.tcp("echo")
    lb, reload = start(pylb, tunnel_config(ws.address, tcp.address))
    socks = [open_ws(lb.port("ws")) for _ in range(TUNNELS)]
    socks += [open_tcp(lb.port("db")) for _ in range(TUNNELS)]
    chatter = Chatter(socks)
    chatter.start()
    try:
        chatter.wait_rounds(3)
        for method in METHODS * 7:
            old = worker_pids(lb)
            generation = reload(method)
            began = time.monotonic()
            assert wait_until(lambda old=old: not worker_pids(lb) & old, OLD_GONE, 0.01), (
                f"old workers still alive {OLD_GONE}s after the reload ({method}): "
                + cli(lb, "show proc"))
            assert set(generations(lb).values()) == {generation}
            assert time.monotonic() - began <= OLD_GONE
            chatter.wait_rounds(3)  # every tunnel talks through the new generation
    finally:
        chatter.stop()
    assert tcp.connections == TUNNELS and ws.connections == TUNNELS  # none opened again
    for sock in socks:
        sock.close()


def test_tunnels_move_on_a_takeover(tmp_path: Path, backends):
    """`pylb -sf OLDPID`, three times: the tunnels and the streamed answers go over the
    _handover connection to the new pylb, and the old one exits at once."""
    ws, tcp = backends.echo("ws"), backends.tcp("echo")
    cfg = tunnel_config(ws.address, tcp.address)
    (tmp_path / "lb.cfg").write_text(yaml.safe_dump(cfg))
    ports = [int(cfg["frontends"][name]["bind"].rsplit(":", 1)[1]) for name in ("ws", "db")]
    first = start_daemon(tmp_path)
    socks = [open_ws(ports[0]) for _ in range(100)] + [open_tcp(ports[1]) for _ in range(100)]
    chatter = Chatter(socks)
    chatter.start()
    streams = [Stream(ports[0], "/sse?events=150&every=0.04", 0) for _ in range(5)]
    for stream in streams:
        stream.start()
    masters = [first]
    running = []
    try:
        chatter.wait_rounds(3)
        for _ in range(3):
            old_workers = {p.pid for p in workers_of(masters[-1])}
            masters.append(start_daemon(tmp_path, "-sf", str(masters[-1])))
            leaving = old_workers | {masters[-2]}
            assert wait_until(lambda leaving=leaving: not _alive(leaving), 5), \
                "the old pylb did not exit"
            chatter.wait_rounds(3)
            running.append(sum(not stream.done.is_set() for stream in streams))
        assert running[0] == len(streams), running  # the answers moved at least once
        for stream in streams:  # before the pylb is stopped
            assert stream.done.wait(30), f"{stream.target} stalled at {stream.size} bytes"
    finally:
        chatter.stop()
        for sock in socks:
            sock.close()
        terminate(masters)
    for stream in streams:
        assert not stream.error, stream.error
        assert bytes(stream.body) == b"".join(b"data: %d\n\n" % n for n in range(150))
    assert tcp.connections == 100  # no tunnel was opened again (the answers' /after
    assert 100 + len(streams) <= ws.connections <= 100 + 2 * len(streams)  # may need one)


def _alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (zombies are gone in all but name)."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


class LateAnswer:
    """A TCP server that reads its client to EOF, then answers only when told to."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.address = f"{HOST}:{self.listener.getsockname()[1]}"
        self.received = b""
        self.got_eof = threading.Event()
        self.answer = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            self.received = data
            self.got_eof.set()
            self.answer.wait(20)
            conn.sendall(b"late answer")


def test_a_half_closed_tunnel_keeps_its_half_close(pylb, backends):
    late = LateAnswer()
    ws = backends.echo("ws")
    lb, reload = start(pylb, tunnel_config(ws.address, late.address))
    with socket.create_connection((HOST, lb.port("db")), timeout=10) as sock:
        sock.sendall(b"question")
        sock.shutdown(socket.SHUT_WR)
        assert late.got_eof.wait(10) and late.received == b"question"
        old = worker_pids(lb)
        reload("SIGUSR2")
        assert wait_until(lambda: not worker_pids(lb) & old, OLD_GONE, 0.01), cli(lb, "show proc")
        late.answer.set()
        assert sock.recv(100) == b"late answer"
        assert sock.recv(100) == b""  # and the server's close comes after it


def test_the_server_half_close_survives_the_move(pylb, backends):
    """The server closed its side first: after the move, the client still gets no more
    bytes, and what it sends still reaches the server."""
    eof_first, ws = backends.tcp("eof-first"), backends.echo("ws")
    lb, reload = start(pylb, tunnel_config(ws.address, eof_first.address))
    with socket.create_connection((HOST, lb.port("db")), timeout=10) as sock:
        assert recv_exact(sock, len(TCP_BANNER)) == TCP_BANNER
        assert sock.recv(10) == b""
        old = worker_pids(lb)
        reload("socket")
        assert wait_until(lambda: not worker_pids(lb) & old, OLD_GONE, 0.01), cli(lb, "show proc")
        sock.sendall(b"after the move")
        sock.shutdown(socket.SHUT_WR)
        assert eof_first.finished.wait(10)
    assert eof_first.received == [b"after the move"]


def test_bytes_waiting_for_a_stalled_client_move_with_the_tunnel(pylb, backends):
    """The client sends and reads nothing until the relay is full both ways (its sends
    would block); then a reload; then it reads: every byte comes back once."""
    ws, tcp = backends.echo("ws"), backends.tcp("echo")
    lb, reload = start(pylb, tunnel_config(ws.address, tcp.address))
    sock = open_ws(lb.port("ws"), buffers=16384)
    sock.setblocking(False)
    blob = hashlib.sha256(b"seed").digest() * (32 * 1024 * 1024 // 32)
    sent = 0
    deadline = time.monotonic() + 10
    while sent < len(blob) and time.monotonic() < deadline:
        try:
            sent += sock.send(blob[sent:sent + 65536])
        except BlockingIOError:
            break  # everything between here and the echo server is full
    assert 0 < sent < len(blob), sent
    old = worker_pids(lb)
    reload("SIGHUP")
    assert wait_until(lambda: not worker_pids(lb) & old, OLD_GONE, 0.01), cli(lb, "show proc")
    sock.setblocking(True)
    sock.settimeout(10)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(recv_exact(sock, len(blob))))
    reader.start()
    sock.sendall(blob[sent:])
    reader.join(20)
    assert hashlib.sha256(received).digest() == hashlib.sha256(blob).digest()
    sock.close()


def test_server_maxconn_holds_across_the_move(pylb, backends):
    tcp, ws = backends.tcp("echo"), backends.echo("ws")
    lb, reload = start(pylb, tunnel_config(ws.address, tcp.address, tcp_server={"maxconn": 2}))
    port = lb.port("db")
    first = [open_tcp(port) for _ in range(2)]
    third = socket.create_connection((HOST, port), timeout=10)  # waits for a slot
    assert wait_until(lambda: "pg,BACKEND" in cli(lb, "show stat"), 5)
    time.sleep(0.3)  # no event to wait on: that nothing happens is the point
    assert tcp.connections == 2
    for method in ("SIGUSR2", "socket"):
        reload(method)
        time.sleep(0.3)
        assert tcp.connections == 2, "a slot was freed by the move"
        for sock in first:
            sock.sendall(b"ping\n")
            assert recv_exact(sock, 5) == b"ping\n"
    first[0].close()
    assert recv_exact(third, len(TCP_BANNER)) == TCP_BANNER  # the freed slot is its
    assert tcp.connections == 3
    for sock in (*first[1:], third):
        sock.close()


def test_a_tunnel_the_new_configuration_cannot_take_stays_and_says_why(pylb, backends):
    ws, tcp, other = backends.echo("ws"), backends.tcp("echo"), backends.tcp("echo")
    cfg = tunnel_config(ws.address, tcp.address)
    lb, reload = start(pylb, cfg)
    sock = open_tcp(lb.port("db"))
    old = worker_pids(lb)
    cfg["backends"]["pg"]["servers"] = {"p2": {"address": other.address}}
    lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    reload("socket")
    proc = cli(lb, "show proc")
    assert "server pg/p1 is gone" in proc, proc
    assert worker_pids(lb) & old
    sock.sendall(b"still here\n")
    assert recv_exact(sock, 11) == b"still here\n"
    sock.close()
    assert wait_until(lambda: not worker_pids(lb) & old, 5, 0.01), cli(lb, "show proc")


# -- responses being relayed ------------------------------------------------------------


class Stream(threading.Thread):
    """One GET on a keep-alive connection, its body read at a bounded pace; then a
    second request on the same connection, which must be answered too."""

    def __init__(self, port: int, target: str, pace: float) -> None:
        super().__init__(daemon=True)
        self.port, self.target, self.pace = port, target, pace
        self.digest = hashlib.sha256()
        self.body = bytearray()
        self.size = 0
        self.error = ""
        self.done = threading.Event()

    def run(self) -> None:
        try:
            with HttpConn(self.port, timeout=20, rcvbuf=65536) as conn:
                conn.send(build_request("GET", self.target))
                response = conn.read_response("GET", sink=self._take)
                assert response.status == 200, response.status
                assert conn.request("GET", "/after").status == 200  # keep-alive kept
        except Exception as exc:  # reported by the test
            self.error = f"{self.target}: {type(exc).__name__}: {exc}"
        self.done.set()

    def _take(self, data: bytes) -> None:
        self.size += len(data)
        if "events" in self.target:
            self.body += data
        else:
            self.digest.update(data)
        time.sleep(self.pace)


def test_streams_and_downloads_move_through_reloads(pylb, backends):
    """Server-Sent Events (chunked) and downloads (Content-Length), read slowly while
    the proxy reloads: every byte arrives once and in order, and each reload's old
    generation is gone within OLD_GONE (the responses moved)."""
    web, tcp = backends.echo("web"), backends.tcp("echo")
    lb, reload = start(pylb, tunnel_config(web.address, tcp.address))
    port, size = lb.port("ws"), 16 << 20
    streams = [Stream(port, "/sse?events=150&every=0.02", 0) for _ in range(10)]
    streams += [Stream(port, f"/file?size={size}", 0.01) for _ in range(10)]
    for stream in streams:
        stream.start()
    assert wait_until(lambda: all(s.size > 0 for s in streams), 10)
    running = []
    for method in METHODS:
        old = worker_pids(lb)
        reload(method)
        assert wait_until(lambda old=old: not worker_pids(lb) & old, OLD_GONE, 0.01), (
            f"old workers still alive {OLD_GONE}s after the reload ({method}): "
            + cli(lb, "show proc"))
        running.append(sum(not s.done.is_set() for s in streams))
    for stream in streams:
        assert stream.done.wait(60), f"{stream.target} stalled at {stream.size} bytes"
    assert [s.error for s in streams if s.error] == []
    expected_events = b"".join(b"data: %d\n\n" % n for n in range(150))
    for stream in streams:
        if "events" in stream.target:
            assert bytes(stream.body) == expected_events
        else:
            assert stream.digest.hexdigest() == pattern_sha256(size)
    assert running[0] == len(streams) and running[-1] >= 10, running  # they did move
    moved = [line for line in lb.lines if "handed over to the next generation" in line]
    assert len(moved) >= 2 * len(METHODS), moved
