"""HAProxy's own tools against pylb's stats socket, unchanged: Debian's
prometheus-haproxy-exporter (one connection per command, CSV parsed by its own rules) and
hatop (curses, prompt mode, its hotkeys send the server commands), driven in tmux as an
operator would, and through its own Socket/SocketData classes.

Each test fails when the tool cannot read what pylb answers: the exporter then reports
`haproxy_up 0` or counts parse failures, hatop exits with its error or shows nothing.
"""

from __future__ import annotations

import http.client
import importlib.machinery
import importlib.util
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from backends import HOST, EchoBackend, HttpConn, build_request, free_port, stats_command

SOCK = "lb.sock"
HATOP = "/usr/bin/hatop"
EXPORTER = "prometheus-haproxy-exporter"
T = TypeVar("T")


# -- helpers (the socket side mirrors tests/test_runtime.py) --------------------------------


def sock_path(lb: Any) -> str:
    return str(lb.workdir / SOCK)


def cli(lb: Any, line: str, timeout: float = 5.0) -> str:
    return stats_command(sock_path(lb), line, timeout)


def stat_rows(lb: Any) -> dict[tuple[str, str], dict[str, str]]:
    lines = [line for line in cli(lb, "show stat").splitlines() if line]
    header = lines[0][2:].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]
    return {(r["pxname"], r["svname"]): r for r in rows}


def eventually(check: Callable[[], T], timeout: float = 5.0, what: str = "",
               interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    assert value, f"{what or 'condition'} not met within {timeout}s (last: {value!r})"
    return value


def lb_config(s1: EchoBackend, s2: EchoBackend, workers: int = 2) -> tuple[dict[str, Any], int]:
    port = free_port()
    servers = {s.name: {"address": s.address, "check": True, "inter": "200ms"}
               for s in (s1, s2)}
    return {
        "global": {"workers": workers,
                   "stats": {"socket": SOCK, "level": "admin", "mode": "600"}},
        "defaults": {"mode": "http", "timeout": {"client": "10s", "server": "10s"}},
        "frontends": {"www": {"bind": f"{HOST}:{port}", "default_backend": "app"}},
        "backends": {"app": {"http-check": {"path": "/"}, "servers": servers}},
    }, port


def start(pylb: Any, backends: Any, workers: int = 2) -> tuple[Any, int]:
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    cfg, port = lb_config(s1, s2, workers)
    lb = pylb(cfg)
    eventually(lambda: Path(sock_path(lb)).exists(), 5, "stats socket")
    for name in ("s1", "s2"):
        eventually(lambda n=name: stat_rows(lb)[("app", n)]["status"] == "UP", 5, f"{name} UP")
    return lb, port


def requests(port: int, count: int) -> None:
    for i in range(count):
        with HttpConn(port) as conn:
            assert conn.request("GET", f"/t{i}").status == 200


# -- the Prometheus exporter ----------------------------------------------------------------


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[Callable[[str], Callable[[], dict[str, float]]]]:
    """`exporter(socket_path)` starts prometheus-haproxy-exporter on that socket and returns
    `scrape()`: one plain HTTP GET of /metrics, as {'name{labels}': value}."""
    if shutil.which(EXPORTER) is None:
        pytest.skip(f"{EXPORTER} is not installed (make debian-tools)")
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "exporter.log"

    def run(path: str) -> Callable[[], dict[str, float]]:
        port = free_port()
        with log.open("wb") as out:
            procs.append(subprocess.Popen(
                [EXPORTER, f"--haproxy.scrape-uri=unix:{path}",
                 f"--web.listen-address={HOST}:{port}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        eventually(lambda: "Listening on" in log.read_text(), 10, "exporter listening")

        def scrape() -> dict[str, float]:
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
            try:
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                body = response.read().decode()
            finally:
                conn.close()
            assert response.status == 200, body
            metrics = {}
            for line in body.splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    metrics[name] = float(value)
            return metrics

        return scrape

    yield run
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if log.exists():
        print("--- exporter output:\n" + log.read_text()[-3000:])


def parse_failures(metrics: dict[str, float]) -> float:
    # 0.14 names it ..._total; older versions without the suffix
    for name in ("haproxy_exporter_csv_parse_failures_total",
                 "haproxy_exporter_csv_parse_failures"):
        if name in metrics:
            return metrics[name]
    pytest.fail("the exporter reports no csv_parse_failures counter")


def test_prometheus_exporter_reads_pylb(pylb, backends, exporter):
    lb, port = start(pylb, backends)
    scrape = exporter(sock_path(lb))
    requests(port, 6)

    m = scrape()
    assert m.get("haproxy_up") == 1, "the exporter could not read show info / show stat"
    assert parse_failures(m) == 0
    for server in ("s1", "s2"):
        assert m.get(f'haproxy_server_up{{backend="app",server="{server}"}}') == 1, server
    assert m.get('haproxy_backend_up{backend="app"}') == 1
    assert m.get('haproxy_frontend_current_sessions{frontend="www"}') == 0
    assert m.get('haproxy_frontend_http_requests_total{frontend="www"}') == 6
    assert m.get('haproxy_frontend_sessions_total{frontend="www"}') == 6
    assert m.get('haproxy_frontend_limit_sessions{frontend="www"}') == 4096
    assert m.get('haproxy_backend_sessions_total{backend="app"}') == 6
    assert sum(m.get(f'haproxy_server_sessions_total{{backend="app",server="{s}"}}', -99)
               for s in ("s1", "s2")) == 6
    assert m.get('haproxy_backend_http_responses_total{backend="app",code="2xx"}') == 6
    versions = [k for k in m if k.startswith("haproxy_version_info{")]
    assert versions and 'release_date="' in versions[0], versions

    # requests in flight show as current sessions
    slow = []
    for i in range(3):
        conn = HttpConn(port, timeout=10)
        conn.send(build_request("GET", f"/?delay=1.0&c={i}"))
        slow.append(conn)
    key = 'haproxy_frontend_current_sessions{frontend="www"}'
    eventually(lambda: scrape().get(key) == 3, 3, "3 current sessions in the exporter")
    for conn in slow:
        assert conn.read_response().status == 200
        conn.close()

    assert cli(lb, "disable server app/s1") == "\n"
    m = scrape()
    assert m.get("haproxy_up") == 1
    assert m.get('haproxy_server_up{backend="app",server="s1"}') == 0
    assert m.get('haproxy_server_up{backend="app",server="s2"}') == 1
    assert m.get('haproxy_backend_up{backend="app"}') == 1
    assert cli(lb, "set server app/s1 state drain") == "\n"
    m = scrape()  # the exporter counts DRAIN as up (it still serves persistent clients)
    assert m.get('haproxy_server_up{backend="app",server="s1"}') == 1
    assert cli(lb, "enable server app/s1") == "\n"
    m = scrape()
    assert m.get('haproxy_server_up{backend="app",server="s1"}') == 1
    assert parse_failures(m) == 0
    assert m.get("haproxy_exporter_total_scrapes", m.get("haproxy_exporter_scrapes_total")) \
        is not None


# -- hatop in a terminal --------------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket) with one 200x50 window."""

    def __init__(self, directory: Path) -> None:
        self.socket = str(directory / "tmux.sock")

    def run(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-S", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, timeout=10)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    def start(self, command: str) -> None:
        self.run("new-session", "-d", "-x", "200", "-y", "50", "-s", "t", command)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True,
                       timeout=10)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None or not Path(HATOP).exists():
        pytest.skip("tmux or hatop is not installed (make debian-tools)")
    terminal = Tmux(tmp_path)
    yield terminal
    terminal.kill()


def wait_screen(tmux: Tmux, predicate: Callable[[str], bool], what: str,
                timeout: float = 6.0) -> str:
    """The first capture of the pane for which predicate holds; fails with the screen (and
    hatop's error, if it exited) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        screen = tmux.screen()
        if predicate(screen):
            return screen
        if "HATOP-EXITED" in screen or time.monotonic() >= deadline:
            pytest.fail(f"hatop: {what} not on screen within {timeout}s:\n{screen}")
        time.sleep(0.05)


def row(screen: str, name: str) -> list[str]:
    """The cells of the first screen line whose first cell is `name`."""
    for line in screen.splitlines():
        if line.split()[:1] == [name]:
            return line.split()
    return []


def footer_ids(screen: str) -> tuple[int, int] | None:
    """hatop's `[#iid/#sid]` of the selected line, from the footer."""
    lines = [line for line in screen.splitlines() if line.strip()]
    found = re.search(r"\[#(-?\d+)/#(-?\d+)\]\s*$", lines[-1]) if lines else None
    return (int(found.group(1)), int(found.group(2))) if found else None


def test_hatop_shows_pylb_and_its_hotkeys_change_servers(pylb, backends, tmux):
    lb, port = start(pylb, backends)
    requests(port, 4)
    rows = stat_rows(lb)
    app_iid = int(rows[("app", "s1")]["iid"])
    tmux.start(f"hatop -s {sock_path(lb)} -i 1; echo HATOP-EXITED $?; sleep 60")

    def complete(screen: str) -> bool:
        return ("pylb Version:" in screen and ">>> www" in screen and ">>> app" in screen
                and all(row(screen, n) for n in ("FRONTEND", "s1", "s2", "BACKEND")))

    screen = wait_screen(tmux, complete, "pylb's frontends, backends and servers")
    assert f"PID: {lb.pid}" in screen
    assert row(screen, "s1")[1:3] == ["1", "UP"]
    assert row(screen, "FRONTEND")[2] == "OPEN"
    assert "Proxies:   2   Services:    4" in screen

    # the cursor starts on the first line (">>> www"): move down to s1, the first line
    # with the backend's iid and a server id
    for _ in range(12):
        if footer_ids(tmux.screen()) == (app_iid, 1):
            break
        before = tmux.screen()
        tmux.keys("Down")
        wait_screen(tmux, lambda s, b=before: s != b, "the cursor moving", 2)
    assert footer_ids(tmux.screen()) == (app_iid, 1), tmux.screen()

    tmux.keys("F10")  # disable server (here): `disable server app/s1`
    eventually(lambda: stat_rows(lb)[("app", "s1")]["status"] == "MAINT", 5, "s1 MAINT")
    wait_screen(tmux, lambda s: row(s, "s1")[2:3] == ["MAINT"], "s1 MAINT", 5)
    tmux.keys("F9")  # enable server (here)
    eventually(lambda: stat_rows(lb)[("app", "s1")]["status"] == "UP", 5, "s1 UP")
    wait_screen(tmux, lambda s: row(s, "s1")[2:3] == ["UP"], "s1 UP again", 5)

    tmux.keys("F8")  # weight + 10: `set weight app/s1 11`
    eventually(lambda: stat_rows(lb)[("app", "s1")]["weight"] == "11", 5, "s1 weight 11")
    wait_screen(tmux, lambda s: row(s, "s1")[1:2] == ["11"], "s1 weight 11", 5)
    tmux.keys("F4")  # weight reset: `set weight app/s1 100%`
    eventually(lambda: stat_rows(lb)[("app", "s1")]["weight"] == "1", 5, "s1 weight 1")

    # every view renders pylb's numbers
    for key, title in (("2", "LBTOT"), ("3", "RTOT"), ("4", "ECONN"), ("1", "SCUR")):
        tmux.keys(key)
        screen = wait_screen(tmux, lambda s, t=title: t in s and bool(row(s, "s2")),
                             f"view {key}", 5)
    assert "HATOP-EXITED" not in screen
    tmux.keys("q")
    wait_screen(tmux, lambda s: "HATOP-EXITED 0" in s, "hatop quitting cleanly", 5)


# -- hatop's own classes --------------------------------------------------------------------


def load_hatop() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("hatop", HATOP)
    spec = importlib.util.spec_from_loader("hatop", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # hatop's regexes are not raw strings
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", SyntaxWarning)
        loader.exec_module(module)
    return module


def test_hatop_socket_classes_parse_pylb(pylb, backends):
    if not Path(HATOP).exists():
        pytest.skip("hatop is not installed (make debian-tools)")
    hatop = load_hatop()
    lb, port = start(pylb, backends, workers=4)
    requests(port, 8)

    sock = hatop.Socket(sock_path(lb))
    sock.connect()  # prompt, then `set timeout cli 60`
    try:
        data = hatop.SocketData(sock)
        data.update_info()
        data.update_stat()
        assert data.info["software_name"] == "pylb"
        assert int(data.info["pid"]) == lb.pid
        assert (data.pxcount, data.svcount) == (2, 4)
        by_name = {(s["pxname"], s["svname"]): s for px in data.stat.values()
                   for s in px.values()}
        assert set(by_name) == {("www", "FRONTEND"), ("app", "s1"), ("app", "s2"),
                                ("app", "BACKEND")}
        assert by_name[("www", "FRONTEND")]["stot"] == 8
        assert by_name[("app", "s1")]["stot"] + by_name[("app", "s2")]["stot"] == 8
        assert by_name[("app", "s1")]["status"] == "UP"
        assert by_name[("app", "s1")]["type"] == 2

        # every view's lines render (the curses-free part of hatop's drawing)
        lines = hatop.get_screenlines(data.stat)
        for mode in hatop.SCREEN_MODES[1:5]:
            for line in lines:
                if line.stat:
                    assert hatop.get_screenline(mode, line.stat)

        # what the hotkeys send, on this same session
        sock.send(b"disable server app/s1")
        assert "".join(sock.recv()) == ""
        data.update_info()
        data.update_stat()
        statuses = {s["svname"]: s["status"] for s in data.stat[by_name[("app", "s1")]["iid"]]
                    .values()}
        assert statuses["s1"] == "MAINT"
        sock.send(b"enable server app/s1")
        list(sock.recv())
        sock.send(b"set weight app/s1 100%")
        list(sock.recv())
        sock.send(b"set server app/s2 state drain")
        list(sock.recv())
        data.update_stat()
        statuses = {s["svname"]: s["status"] for s in data.stat[by_name[("app", "s1")]["iid"]]
                    .values()}
        assert (statuses["s1"], statuses["s2"]) == ("UP", "DRAIN")

        # `-p app`: hatop turns a proxy name into a stat filter (`show stat <iid> -1 -1`)
        filtered = hatop.SocketData(sock)
        filtered.register_proxy_filter(["app"])
        filtered.update_stat()
        assert (filtered.pxcount, filtered.svcount) == (1, 3)
    finally:
        sock.close()
    assert stat_rows(lb)[("app", "s2")]["status"] == "DRAIN"
