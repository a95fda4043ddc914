"""Seed 001 end to end: a maintenance switch (runtime variable), routing by a map changed
at run time, the maintenance page when no server is left, monitor-uri. Every worker
follows a change before the socket answers."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from backends import HttpConn, free_port

MAINT_PAGE = b"<h1>Down for maintenance</h1>\n"


def command(lb: Any, line: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(lb.workdir / "lb.sock"))
        sock.sendall(line.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def get(port: int, host: str = "www.example.com", target: str = "/") -> tuple[int, bytes]:
    with HttpConn(port) as conn:
        response = conn.request("GET", target, headers={"Host": host, "Connection": "close"})
        return response.status, response.body


def start(pylb: Any, backends: Any, tmp_path: Path) -> tuple[Any, int]:
    app, maint, api = backends.echo("app"), backends.echo("maint"), backends.echo("api")
    (tmp_path / "503.http").write_bytes(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\n\r\n" + MAINT_PAGE
    )
    (tmp_path / "hosts.map").write_text("# host backend\napi.example.com api\n")
    port = free_port()
    lb = pylb({
        "global": {"workers": 4, "stats": {"socket": "lb.sock", "level": "admin"}},
        "maps": {"hosts": str(tmp_path / "hosts.map")},
        "frontends": {"www": {
            "bind": f"127.0.0.1:{port}",
            "default_backend": "app",
            "acl": {
                "maint": "var(proc.maintenance_mode) -m str on",
                "site_dead": "nbsrv(app) lt 1",
            },
            "use_backend": ["maintenance if maint", "%[hdr(host),lower,map(hosts,app)]"],
            "monitor-uri": "/site_alive",
            "monitor-fail": "site_dead",
            "errorfile": {503: str(tmp_path / "503.http")},
        }},
        "backends": {
            "app": {"servers": {"s1": {"address": app.address}}},
            "maintenance": {"servers": {"m1": {"address": maint.address}}},
            "api": {"servers": {"a1": {"address": api.address}}},
        },
    })
    return lb, port


def servers_seen(port: int, count: int = 16, **kwargs: Any) -> set[str]:
    """Which backend answered `count` requests on new connections (spread over workers)."""
    seen = set()
    for _ in range(count):
        status, body = get(port, **kwargs)
        assert status == 200
        seen.add(body.split(b'"server": "', 1)[1].split(b'"', 1)[0].decode())
    return seen


def test_runtime_variable_flips_routing_in_every_worker(pylb, backends, tmp_path):
    lb, port = start(pylb, backends, tmp_path)
    assert servers_seen(port) == {"app"}
    assert command(lb, "set var proc.maintenance_mode str(on)") == "\n"
    assert servers_seen(port) == {"maint"}  # at once, in all 4 workers
    assert "value=<on>" in command(lb, "get var proc.maintenance_mode")
    command(lb, "set var proc.maintenance_mode str(off)")
    assert servers_seen(port) == {"app"}


def test_map_changed_at_run_time_routes_the_next_request(pylb, backends, tmp_path):
    lb, port = start(pylb, backends, tmp_path)
    assert servers_seen(port, host="api.example.com") == {"api"}
    assert servers_seen(port, host="new.example.com") == {"app"}  # the map's default
    assert command(lb, "add map hosts new.example.com api") == "\n"
    assert servers_seen(port, host="new.example.com") == {"api"}
    assert "new.example.com api" in command(lb, "show map hosts")
    command(lb, "del map hosts api.example.com")
    assert servers_seen(port, host="api.example.com") == {"app"}


def test_maintenance_page_and_monitor_uri(pylb, backends, tmp_path):
    lb, port = start(pylb, backends, tmp_path)
    assert get(port, target="/site_alive")[0] == 200
    command(lb, "disable server app/s1")
    for _ in range(8):
        status, body = get(port)
        assert (status, body) == (503, MAINT_PAGE)
    assert get(port, target="/site_alive")[0] == 503
    command(lb, "enable server app/s1")
    assert servers_seen(port) == {"app"}
    assert get(port, target="/site_alive")[0] == 200
