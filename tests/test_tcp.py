"""TCP mode: byte relay both ways, half-close, backpressure, refused server."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from typing import Any

from backends import (
    TCP_BANNER,
    TcpBackend,
    free_port,
    pattern_bytes,
    pattern_chunks,
    pattern_sha256,
    recv_exact,
    recv_until_eof,
)

MB = 1 << 20


def tcp_config(address: str) -> tuple[dict[str, Any], int]:
    port = free_port()
    return {
        "global": {"workers": 1},
        "defaults": {"mode": "tcp", "timeout": {"connect": "1s", "client": "10s",
                                                "server": "10s"}},
        "frontends": {"tcp": {"bind": f"127.0.0.1:{port}", "mode": "tcp",
                              "default_backend": "srv"}},
        "backends": {"srv": {"mode": "tcp", "servers": {"s1": {"address": address}}}},
    }, port


def start(pylb: Any, backend: TcpBackend | str) -> int:
    address = backend if isinstance(backend, str) else backend.address
    config, port = tcp_config(address)
    pylb(config)
    return port


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def test_bytes_relayed_both_ways(pylb: Any, backends: Any) -> None:
    echo = backends.tcp("echo")
    port = start(pylb, echo)
    with connect(port) as sock:
        assert recv_exact(sock, len(TCP_BANNER)) == TCP_BANNER  # server speaks first
        sock.sendall(b"abc")
        assert recv_exact(sock, 3) == b"abc"
        blob = pattern_bytes(500_000)
        sock.sendall(blob)
        assert recv_exact(sock, len(blob)) == blob
    assert echo.connections == 1


def test_client_half_close_server_still_answers(pylb: Any, backends: Any) -> None:
    port = start(pylb, backends.tcp("echo"))
    with connect(port) as sock:
        sock.sendall(b"data")
        sock.shutdown(socket.SHUT_WR)  # reaches the server as EOF; it answers after that
        got, ended = recv_until_eof(sock, timeout=5)
    assert (got, ended) == (TCP_BANNER + b"data" + b"BYE 4\n", True)


def test_server_half_close_client_still_sends(pylb: Any, backends: Any) -> None:
    srv = backends.tcp("eof-first")
    port = start(pylb, srv)
    with connect(port) as sock:
        got, ended = recv_until_eof(sock, timeout=5)
        assert (got, ended) == (TCP_BANNER, True)  # the server's EOF reached the client
        sock.sendall(b"late data")  # our direction is still open
        sock.shutdown(socket.SHUT_WR)
        assert srv.finished.wait(5), "server never saw the client's EOF"
    assert srv.received == [b"late data"]


def test_large_download_slow_reader_bounded_memory(pylb: Any, backends: Any) -> None:
    size = 40 * MB
    src = backends.tcp("source", size=size)
    config, port = tcp_config(src.address)
    lb = pylb(config)
    with connect(port) as sock:  # warm up the relay path before measuring
        assert len(recv_exact(sock, 2 * MB)) == 2 * MB
    base = lb.workers_rss()
    peak = base
    sha = hashlib.sha256()
    received = 0
    with connect(port, rcvbuf=65536) as sock:
        time.sleep(0.6)  # stalled reader: pylb must stop reading from the server
        peak = max(peak, lb.workers_rss())
        while chunk := sock.recv(262144):
            sha.update(chunk)
            before, received = received, received + len(chunk)
            if before // (2 * MB) != received // (2 * MB):
                peak = max(peak, lb.workers_rss())
            time.sleep(0.0005)
    assert received == size
    assert sha.hexdigest() == pattern_sha256(size)
    assert peak - base < 15 * MB, f"worker RSS grew by {(peak - base) / MB:.1f} MB"


def test_large_upload_slow_server_bounded_memory(pylb: Any, backends: Any) -> None:
    size = 40 * MB
    sink = backends.tcp("sink", read_delay=1.0)
    config, port = tcp_config(sink.address)
    lb = pylb(config)
    base = lb.workers_rss()
    with connect(port) as sock:
        def send_all() -> None:
            for piece in pattern_chunks(size, 256 * 1024):
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        peak = base
        deadline = time.monotonic() + 30
        while sender.is_alive() and time.monotonic() < deadline:
            peak = max(peak, lb.workers_rss())
            sender.join(0.05)
        assert not sender.is_alive(), "upload did not finish"
        answer, ended = recv_until_eof(sock, timeout=10)
    assert answer == f"{size} {pattern_sha256(size)}\n".encode()
    assert ended
    assert peak - base < 15 * MB, f"worker RSS grew by {(peak - base) / MB:.1f} MB"


def test_server_refused_closes_client(pylb: Any) -> None:
    port = start(pylb, f"127.0.0.1:{free_port()}")  # nothing listens there
    with connect(port) as sock:
        start_time = time.monotonic()
        try:
            sock.sendall(b"hello")
        except (BrokenPipeError, ConnectionResetError):
            pass
        got, ended = recv_until_eof(sock, timeout=8)
    assert (got, ended) == (b"", True)
    assert time.monotonic() - start_time < 8


def test_concurrent_connections_are_independent(pylb: Any, backends: Any) -> None:
    clients = 5
    echo = backends.tcp("echo")
    port = start(pylb, echo)
    socks = [connect(port) for _ in range(clients)]
    try:
        for s in socks:
            assert recv_exact(s, len(TCP_BANNER)) == TCP_BANNER
        for i, s in enumerate(socks):
            s.sendall(b"client-%d" % i)
        for i, s in enumerate(socks):
            msg = b"client-%d" % i
            assert recv_exact(s, len(msg)) == msg
    finally:
        for s in socks:
            s.close()
    assert echo.connections == clients
