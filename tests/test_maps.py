"""Maps through real pylb processes: every match kind, run-time edits on every worker,
and what a reload keeps (an unchanged file with its edits) or reads again (a changed one)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from backends import HttpConn, free_port
from test_faults import cli


def map_config(port: int, server: str, tmp: Path) -> dict[str, Any]:
    return {
        "global": {"workers": 4, "stats": {"socket": str(tmp / "lb.sock"), "level": "admin"}},
        "maps": {"paths": str(tmp / "paths.map"), "hosts": str(tmp / "hosts.map"),
                 "nets": str(tmp / "nets.map")},
        "frontends": {"www": {
            "bind": f"127.0.0.1:{port}",
            "default_backend": "app",
            "http-request": [
                "set-header X-Exact %[path,map(paths,none)]",
                "set-header X-Beg %[path,map_beg(paths,none)]",
                "set-header X-Dom %[hdr(host),map_dom(hosts,none)]",
                "set-header X-Net %[src,map_ip(nets,none)]",
            ],
        }},
        "backends": {"app": {"servers": {"s1": {"address": server}}}},
    }


def mapped(port: int, path: str, host: str = "x") -> dict[str, str]:
    """The X- headers the rules set, as the server saw them (a new connection each time:
    over 4 workers)."""
    with HttpConn(port) as conn:
        body = conn.request("GET", path, headers={"Host": host, "Connection": "close"}).json()
    return {k.lower(): v for k, v in body["headers"] if k.lower().startswith("x-")
            and k.lower() != "x-forwarded-for"}


def write_maps(tmp: Path) -> None:
    (tmp / "paths.map").write_text("/api/v1 v1\n/api api\n/static static\n")
    (tmp / "hosts.map").write_text("example.com ex\nwww.other.org other\n")
    (tmp / "nets.map").write_text("10.0.0.0/8 ten\n127.0.0.0/8 loop8\n127.0.0.1 loop32\n")


def test_every_match_kind(pylb, backends, tmp_path):
    echo = backends.echo("s1")
    port = free_port()
    write_maps(tmp_path)
    pylb(map_config(port, echo.address, tmp_path))
    assert mapped(port, "/api", "www.example.com") == {
        "x-exact": "api", "x-beg": "api", "x-dom": "ex", "x-net": "loop32"}
    assert mapped(port, "/api/v1/users", "example.org") == {
        "x-exact": "none", "x-beg": "v1", "x-dom": "none", "x-net": "loop32"}
    assert mapped(port, "/static/x.css", "a.www.other.org")["x-dom"] == "other"


def test_edits_reach_every_worker_and_a_reload_keeps_them_unless_the_file_changed(
    pylb, backends, tmp_path
):
    echo = backends.echo("s1")
    port = free_port()
    write_maps(tmp_path)
    lb = pylb(map_config(port, echo.address, tmp_path))
    assert cli(tmp_path, "add map paths /new fresh") == "\n"
    assert cli(tmp_path, "del map paths /static") == "\n"
    assert {mapped(port, "/new")["x-exact"] for _ in range(12)} == {"fresh"}
    assert {mapped(port, "/static")["x-exact"] for _ in range(12)} == {"none"}
    assert "entries:3" in cli(tmp_path, "show map")  # 3 - 1 + 1

    mark = len(lb.lines)
    lb.signal(signal.SIGUSR2)  # files unchanged: the edits stay
    lb.wait_log(r"reload 1 done", 10, start=mark)
    assert {mapped(port, "/new")["x-exact"] for _ in range(8)} == {"fresh"}
    assert {mapped(port, "/static")["x-exact"] for _ in range(8)} == {"none"}

    (tmp_path / "paths.map").write_text("/static moved\n/other other\n")  # changed file
    mark = len(lb.lines)
    lb.signal(signal.SIGUSR2)
    lb.wait_log(r"map paths: .* changed, read again \(2 entries\)", 10, start=mark)
    lb.wait_log(r"reload 2 done", 10, start=mark)
    assert {mapped(port, "/static")["x-exact"] for _ in range(8)} == {"moved"}
    assert {mapped(port, "/new")["x-exact"] for _ in range(8)} == {"none"}


def test_a_map_file_that_turns_bad_fails_the_reload_and_changes_nothing(
    pylb, backends, tmp_path
):
    echo = backends.echo("s1")
    port = free_port()
    write_maps(tmp_path)
    pylb(map_config(port, echo.address, tmp_path))
    (tmp_path / "paths.map").write_bytes(b"/api ok\n/bad \xff\xfe\n")
    answer = cli(tmp_path, "reload")
    assert answer.startswith("Success=0") and "line 2 is not valid UTF-8" in answer, answer
    assert mapped(port, "/api")["x-exact"] == "api"


def test_a_large_map(pylb, backends, tmp_path):
    echo = backends.echo("s1")
    port = free_port()
    write_maps(tmp_path)
    with (tmp_path / "paths.map").open("w") as f:
        f.writelines(f"/p{n} value{n}\n" for n in range(200_000))
    pylb(map_config(port, echo.address, tmp_path))
    for n in (0, 1, 99_999, 199_999):
        assert mapped(port, f"/p{n}")["x-exact"] == f"value{n}"
    assert "entries:200000" in cli(tmp_path, "show map")
