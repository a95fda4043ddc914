"""Request logs from real pylb processes: HAProxy's HTTP and TCP formats, syslog, reopen."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path
from typing import Any

from backends import HttpConn, free_port, wait_until

DATE = r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d{3}\]"
HTTP_LINE = re.compile(
    rf"^127\.0\.0\.1:\d+ {DATE} www app/s1 \d+/\d+/\d+/\d+/\d+ 200 \d+ - - ---- "
    r"\d+/\d+/\d+/\d+/0 0/0 \"GET /hello\?x=1 HTTP/1\.1\"$"
)


def log_config(port: int, tcp_port: int, server: str, target: str) -> dict[str, Any]:
    return {
        "global": {"workers": 2},
        "frontends": {
            "www": {"bind": f"127.0.0.1:{port}", "default_backend": "app", "log": target},
            "raw": {"bind": f"127.0.0.1:{tcp_port}", "mode": "tcp", "default_backend": "tcp",
                    "log": target},
        },
        "backends": {
            "app": {"servers": {"s1": {"address": server}}},
            "tcp": {"mode": "tcp", "servers": {"s1": {"address": server}}},
        },
    }


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_http_and_tcp_lines_in_haproxy_format(pylb, backends, tmp_path: Path):
    echo = backends.echo("s1")
    port, tcp_port = free_port(), free_port()
    logfile = tmp_path / "requests.log"
    pylb(log_config(port, tcp_port, echo.address, str(logfile)))
    with HttpConn(port) as conn:
        assert conn.request("GET", "/hello?x=1").status == 200
        conn.send(b"BAD REQUEST LINE\r\n\r\n")
        assert conn.read_response().status == 400
    with socket.create_connection(("127.0.0.1", tcp_port)) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    assert wait_until(lambda: len(read_lines(logfile)) >= 3, 5), read_lines(logfile)
    lines = read_lines(logfile)
    assert any(HTTP_LINE.match(line) for line in lines), lines
    assert any(
        re.match(rf"^127\.0\.0\.1:\d+ {DATE} www www/<NOSRV> -1/-1/-1/-1/\d+ 400 \d+ - - PR-- ",
                 line) for line in lines), lines
    assert any(
        re.match(rf"^127\.0\.0\.1:\d+ {DATE} raw tcp/s1 \d+/\d+/\d+ \d+ -- \d+/\d+/\d+/\d+/0 0/0$",
                 line) for line in lines), lines


def test_syslog_over_udp(pylb, backends):
    echo = backends.echo("s1")
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    port = free_port()
    target = f"udp@127.0.0.1:{receiver.getsockname()[1]}"
    pylb(log_config(port, free_port(), echo.address, target))
    with HttpConn(port) as conn:
        assert conn.request("GET", "/hello?x=1").status == 200
    datagram = receiver.recv(65536).decode()
    receiver.close()
    head, _, line = datagram.partition(": ")
    assert re.match(r"^<134>\w{3} [ \d]\d \d\d:\d\d:\d\d pylb\[\d+\]$", head), datagram
    assert HTTP_LINE.match(line), line


def test_log_file_is_reopened_after_rotation(pylb, backends, tmp_path: Path):
    echo = backends.echo("s1")
    port = free_port()
    logfile = tmp_path / "requests.log"
    lb = pylb(log_config(port, free_port(), echo.address, str(logfile)))

    def get() -> None:
        with HttpConn(port) as conn:
            assert conn.request("GET", "/hello?x=1").status == 200

    get()
    assert wait_until(lambda: len(read_lines(logfile)) == 1, 5)
    rotated = tmp_path / "requests.log.1"
    logfile.rename(rotated)  # logrotate's default: move, then tell the daemon
    mark = len(lb.lines)
    lb.signal(signal.SIGWINCH)
    lb.wait_log("reopening log files", 5, start=mark)
    assert wait_until(  # by both workers
        lambda: sum("log files reopened" in line for line in lb.lines[mark:]) == 2, 5
    ), lb.output()
    for _ in range(6):
        get()
    assert wait_until(lambda: len(read_lines(logfile)) == 6, 5)
    assert len(read_lines(rotated)) == 1
