"""Dashboards against real pylb processes: the Prometheus endpoint (checked by promtool),
counters that survive every kind of reload and a killed worker, true `show info` figures
under load (wrk) and at rest, `clear counters`, the stats page over HTTP (curl), and the
configuration's `stats:` and `prometheus:` keys.

The stats page in a real browser is tests/test_stats_browser.py.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from backends import HOST, HttpConn, free_port, stats_command, wait_until
from conftest import refused
from prometheus_client.parser import text_string_to_metric_families
from test_reload import Reloader
from test_takeover import PYLB, start_daemon, terminate

from lb import promex

SOCK = "lb.sock"
AUTH = ("admin", "s3cret")


def config(servers: list[str], *, workers: int = 2, stats: dict[str, Any] | None = None,
           www: dict[str, Any] | None = None) -> dict[str, Any]:
    """www proxies to app; the `stats` frontend serves the page and /metrics."""
    page = {"uri": "/stats", "refresh": "5s", "admin": True,
            "auth": f"{AUTH[0]}:{AUTH[1]}", "realm": "pylb test"}
    return {
        "global": {"workers": workers,
                   "stats": {"socket": SOCK, "level": "admin", "expose-fd": "listeners"}},
        "defaults": {"timeout": {"connect": "2s", "client": "10s", "server": "10s"}},
        "frontends": {
            "www": {"bind": f"{HOST}:{free_port()}", "default_backend": "app", **(www or {})},
            "stats": {"bind": f"{HOST}:{free_port()}", "stats": stats or page,
                      "prometheus": {"uri": "/metrics"}},
        },
        "backends": {"app": {"servers": {
            f"s{i}": {"address": address} for i, address in enumerate(servers, 1)}}},
    }


def port_of(cfg: dict[str, Any], frontend: str) -> int:
    return int(cfg["frontends"][frontend]["bind"].rsplit(":", 1)[1])


def get(port: int, target: str = "/", headers: dict[str, str] | None = None,
        data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: status, headers, body (4xx/5xx included)."""
    request = urllib.request.Request(f"http://{HOST}:{port}{target}", data=data,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def metrics(cfg: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels."""
    status, headers, body = get(port_of(cfg, "stats"), "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests_of(cfg: dict[str, Any], proxy: str = "www") -> int:
    return int(metrics(cfg)[("haproxy_frontend_http_requests_total", (("proxy", proxy),))])


def send(port: int, count: int, keepalive: bool) -> None:
    """`count` requests to www, all answered 200: on one connection, or one each."""
    if keepalive:
        with HttpConn(port) as conn:
            for i in range(count):
                assert conn.request("GET", f"/k{i}").status == 200
        return
    for i in range(count):
        assert get(port, f"/n{i}")[0] == 200


def stat_rows(lb: Any) -> dict[tuple[str, str], dict[str, str]]:
    answer = stats_command(lb.workdir / SOCK, "show stat")
    header, *lines = [line for line in answer.splitlines() if line]
    names = header[2:].split(",")
    rows = {}
    for line in lines:
        row = dict(zip(names, line.split(","), strict=False))
        rows[(row["pxname"], row["svname"])] = row
    return rows


def show_info(lb: Any) -> dict[str, str]:
    answer = stats_command(lb.workdir / SOCK, "show info")
    return dict(line.split(": ", 1) for line in answer.splitlines() if ": " in line)


def start(pylb: Any, backends: Any, **options: Any) -> tuple[Any, dict[str, Any]]:
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    cfg = config([s1.address, s2.address], **options)
    lb = pylb(cfg)
    assert wait_until(lambda: (lb.workdir / SOCK).exists(), 5), "no stats socket"
    return lb, cfg


# -- counters across reloads, respawns and takeovers ---------------------------------------


def test_request_counter_equals_requests_sent_through_every_reload_and_a_kill(pylb, backends):
    lb, cfg = start(pylb, backends)
    port = port_of(cfg, "www")
    reload = Reloader(lb)
    sent = 0
    steps = ["SIGUSR2", "SIGHUP", "socket", "kill -9"]
    for step in steps:
        send(port, 7, keepalive=False)
        send(port, 5, keepalive=True)
        sent += 12
        assert requests_of(cfg) == sent, f"before {step}"
        if step == "kill -9":
            # one of the current generation's (the older ones have left once two remain)
            assert wait_until(lambda: len(lb.workers()) == 2, 10)
            victim = lb.workers()[0].pid
            mark = len(lb.lines)
            os.kill(victim, signal.SIGKILL)
            lb.wait_log(rf"\(pid {victim}\) exited: killed by signal 9", 10, start=mark)
            assert wait_until(lambda v=victim: len(lb.workers()) == 2 and v not in
                              {p.pid for p in lb.workers()}, 10), "not replaced"
        else:
            reload(step)
        # right after: the older generation may still be finishing, counted where it is
        assert requests_of(cfg) == sent, f"right after {step}"
    # and once every older generation is gone (its counts moved into the current memory)
    assert wait_until(lambda: len(lb.workers()) == 2, 10)
    send(port, 3, keepalive=False)
    sent += 3
    assert requests_of(cfg) == sent
    rows = stat_rows(lb)
    assert int(rows[("www", "FRONTEND")]["req_tot"]) == sent
    assert int(rows[("app", "BACKEND")]["stot"]) == sent
    assert int(rows[("app", "s1")]["stot"]) + int(rows[("app", "s2")]["stot"]) == sent
    samples = metrics(cfg)
    assert samples[("pylb_reloads_total", ())] == 3
    assert samples[("pylb_reload_duration_seconds_count", ())] == 3
    assert samples[("pylb_generation", ())] == 4


def test_counts_of_a_finishing_generation_are_kept(pylb, backends):
    """Requests the old generation serves after the reload count, during and after."""
    slow = backends.echo("slow")
    cfg = config([slow.address])
    lb = pylb(cfg)
    reload = Reloader(lb)
    port = port_of(cfg, "www")
    with HttpConn(port) as conn:
        assert conn.request("GET", "/a").status == 200
        # the answer is slow: the reload happens while the old worker relays it
        conn.send(b"GET /b?delay=1.0 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)  # (the request reaches the old worker before the reload)
        reload("SIGUSR2")
        assert conn.read_response().status == 200
    assert wait_until(lambda: requests_of(cfg) == 2, 5), requests_of(cfg)
    assert wait_until(lambda: len(lb.workers()) == 2, 10)
    assert requests_of(cfg) == 2


def test_a_reload_removing_a_server_keeps_the_backend_total(pylb, backends):
    lb, cfg = start(pylb, backends)
    send(port_of(cfg, "www"), 10, keepalive=False)
    before = stat_rows(lb)
    assert int(before[("app", "BACKEND")]["stot"]) == 10
    del cfg["backends"]["app"]["servers"]["s2"]
    lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    Reloader(lb)("SIGUSR2")
    after = stat_rows(lb)
    assert ("app", "s2") not in after
    assert int(after[("app", "BACKEND")]["stot"]) == 10  # s2's share stays in its backend
    assert int(after[("app", "s1")]["stot"]) == int(before[("app", "s1")]["stot"])


def test_a_reload_removing_a_frontend_keeps_what_it_counted_in_show_info(pylb, backends):
    lb, cfg = start(pylb, backends)
    cfg["frontends"]["old"] = {"bind": f"{HOST}:{free_port()}", "default_backend": "app"}
    lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    reload = Reloader(lb)
    reload("SIGUSR2")
    send(port_of(cfg, "old"), 4, keepalive=False)
    send(port_of(cfg, "www"), 3, keepalive=False)
    assert int(show_info(lb)["CumReq"]) == 7
    del cfg["frontends"]["old"]
    lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    reload("socket")
    assert wait_until(lambda: len(lb.workers()) == 2, 10)  # the old generation is gone
    info = show_info(lb)
    assert int(info["CumReq"]) == 7 and int(info["CumConns"]) == 7
    assert ("old", "FRONTEND") not in stat_rows(lb)


def test_a_takeover_carries_the_counters(tmp_path: Path, backends):
    s1 = backends.echo("s1")
    cfg = config([s1.address])
    (tmp_path / "lb.cfg").write_text(yaml.safe_dump(cfg, sort_keys=False))
    pids = [start_daemon(tmp_path)]
    try:
        send(port_of(cfg, "www"), 9, keepalive=False)
        assert requests_of(cfg) == 9
        pids.append(start_daemon(tmp_path, "-sf", str(pids[0])))
        assert wait_until(lambda: not _alive(pids[0]), 15), "the old pylb did not exit"
        assert requests_of(cfg) == 9
        send(port_of(cfg, "www"), 2, keepalive=True)
        assert requests_of(cfg) == 11
        assert metrics(cfg)[("pylb_reloads_total", ())] == 1  # the takeover
    finally:
        terminate(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the Prometheus endpoint ---------------------------------------------------------------


def test_promtool_accepts_the_metrics_and_most_haproxy_families_are_there(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    cfg = config([s1.address, s2.address])
    for server in cfg["backends"]["app"]["servers"].values():
        server["check"] = True  # (the check families are for checked servers)
    pylb(cfg)
    send(port_of(cfg, "www"), 5, keepalive=True)
    # the request times are averaged at the master's next sample
    assert wait_until(lambda: ("haproxy_server_total_time_average_seconds",
                               (("proxy", "app"), ("server", "s1"))) in metrics(cfg), 3)
    status, _, body = get(port_of(cfg, "stats"), "/metrics")
    assert status == 200
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                           timeout=30)
    problems = (check.stdout + check.stderr).decode().strip()
    assert check.returncode == 0 and not problems, problems  # not even a lint remark
    present = promex.families(body)
    exposed = [name for name in promex.HAPROXY_FAMILIES if name in present]
    share = len(exposed) / len(promex.HAPROXY_FAMILIES)
    print(f"HAProxy 2.6 exporter families exposed: {len(exposed)} of "
          f"{len(promex.HAPROXY_FAMILIES)} ({share:.0%})")
    assert share >= 0.8
    samples = metrics(cfg)
    assert samples[("haproxy_server_status", (("proxy", "app"), ("server", "s1"),
                                               ("state", "UP")))] == 1
    assert samples[("haproxy_process_current_connections", ())] >= 0
    assert samples[("pylb_generation", ())] == 1
    # scopes, as HAProxy's exporter reads them
    _, _, only = get(port_of(cfg, "stats"), "/metrics?scope=server")
    assert promex.families(only) and all(
        name.startswith("haproxy_server_") for name in promex.families(only))
    assert get(port_of(cfg, "stats"), "/metrics?scope=bogus")[0] == 400


# -- show info: true figures ---------------------------------------------------------------


def test_show_info_measures_rates_and_idle_time(pylb, backends):
    lb, cfg = start(pylb, backends)
    # at rest: the workers' loops are idle
    assert wait_until(lambda: int(show_info(lb)["Idle_pct"]) >= 90, 5), show_info(lb)
    info = show_info(lb)
    assert int(info["Pid"]) == lb.pid and info["Run_queue"].isdigit()
    assert int(info["Start_time_sec"]) <= time.time()
    # a connection per request: sessions (connections) come at the request rate
    wrk = subprocess.Popen(
        ["wrk", "-t1", "-c16", "-d4s", "-H", "Connection: close",
         f"http://{HOST}:{port_of(cfg, 'www')}/"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        busy: list[dict[str, str]] = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            time.sleep(0.5)
            busy.append(show_info(lb))
        assert max(int(i["SessRate"]) for i in busy) > 0, busy
        assert max(int(i["ConnRate"]) for i in busy) > 0
        assert min(int(i["Idle_pct"]) for i in busy) < 100, busy
    finally:
        out = wrk.communicate(timeout=15)[0].decode()
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    info = show_info(lb)
    assert int(info["MaxSessRate"]) >= max(int(i["SessRate"]) for i in busy)
    assert int(info["CumReq"]) >= done  # (plus what wrk sent and did not count at its end)
    rows = stat_rows(lb)
    assert int(rows[("www", "FRONTEND")]["req_rate_max"]) > 0
    assert int(rows[("www", "FRONTEND")]["smax"]) >= 1
    assert all(row["pid"] == str(lb.pid) for row in rows.values())
    # once the load stops, the rate falls to 0 and the loops are idle again
    assert wait_until(lambda: show_info(lb)["SessRate"] == "0", 5)
    assert wait_until(lambda: int(show_info(lb)["Idle_pct"]) >= 90, 5), show_info(lb)


def test_show_sess_names_the_protocol(pylb, backends):
    s1 = backends.echo("s1")
    four, six = free_port(), free_port()
    cfg = config([s1.address], www={"bind": [f"{HOST}:{four}", f"[::1]:{six}"]})
    lb = pylb(cfg)
    with socket.create_connection(("::1", six)) as v6, \
            socket.create_connection((HOST, four)) as v4:
        for conn in (v6, v4):
            conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")  # an unfinished head: it stays
        assert wait_until(lambda: stats_command(lb.workdir / SOCK, "show sess").count(
            "fe=www") == 2, 5)
        answer = stats_command(lb.workdir / SOCK, "show sess")
        assert "proto=tcpv6 src=::1:" in answer and "proto=tcpv4 src=127.0.0.1:" in answer


# -- clear counters ------------------------------------------------------------------------


def test_clear_counters_all_starts_again_from_zero_and_stays_so(pylb, backends):
    lb, cfg = start(pylb, backends)
    port = port_of(cfg, "www")
    send(port, 6, keepalive=False)
    assert requests_of(cfg) == 6
    # plain `clear counters` clears the maxima only
    assert stats_command(lb.workdir / SOCK, "clear counters") == "\n"
    assert requests_of(cfg) == 6
    assert stat_rows(lb)[("www", "FRONTEND")]["smax"] == "0"
    assert stats_command(lb.workdir / SOCK, "clear counters all") == "\n"
    assert requests_of(cfg) == 0
    assert int(stat_rows(lb)[("app", "BACKEND")]["stot"]) == 0
    send(port, 4, keepalive=True)
    assert requests_of(cfg) == 4
    Reloader(lb)("SIGUSR2")
    assert requests_of(cfg) == 4
    assert wait_until(lambda: len(lb.workers()) == 2, 10)
    send(port, 1, keepalive=False)
    assert requests_of(cfg) == 5
    assert int(stat_rows(lb)[("app", "BACKEND")]["stot"]) == 5
    assert stats_command(lb.workdir / SOCK, "clear counters bogus").startswith("Usage:")


# -- the stats page over HTTP --------------------------------------------------------------


def test_stats_page_asks_for_credentials_and_serves_html_and_csv(pylb, backends):
    lb, cfg = start(pylb, backends)
    port = port_of(cfg, "stats")
    status, headers, _ = get(port, "/stats")
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="pylb test"'
    assert get(port, "/stats", basic("admin", "wrong"))[0] == 401
    status, headers, page = get(port, "/stats", basic(*AUTH))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'id="server-app-s1"' in page and b'id="server-app-s2"' in page
    assert headers["Connection"] == "close"
    status, headers, csv = get(port, "/stats;csv", basic(*AUTH))
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert csv.decode().splitlines()[0] == stats_command(lb.workdir / SOCK,
                                                          "show stat").splitlines()[0]
    assert get(port, "/nothing-here", basic(*AUTH))[0] == 503  # no backend: HAProxy's 503


def test_an_admin_form_post_drains_a_server_and_a_forged_one_is_refused(pylb, backends):
    lb, cfg = start(pylb, backends)
    port = port_of(cfg, "stats")
    _, _, page = get(port, "/stats", basic(*AUTH))
    token = re.search(rb'name="csrf" value="([0-9a-f]+)"', page).group(1).decode()  # type: ignore[union-attr]
    form = {"Content-Type": "application/x-www-form-urlencoded", **basic(*AUTH)}
    forged = get(port, "/stats", {**form, "Origin": "http://evil.example"},
                 f"b=app&s=s1&action=drain&csrf={token}".encode())
    assert forged[0] == 403
    assert get(port, "/stats", form, b"b=app&s=s1&action=drain&csrf=00")[0] == 403
    assert stat_rows(lb)[("app", "s1")]["status"] != "DRAIN"
    status, headers, _ = get(port, "/stats", {**form, "Origin": f"http://{HOST}:{port}"},
                             f"b=app&s=s1&action=drain&csrf={token}".encode())
    # urllib follows the 303 to the page, which shows the notice
    assert status == 200
    assert stat_rows(lb)[("app", "s1")]["status"] == "DRAIN"
    # the same token works after a reload (the master keeps its secret)
    Reloader(lb)("socket")
    get(port, "/stats", {**form, "Origin": f"http://{HOST}:{port}"},
        f"b=app&s=s1&action=ready&csrf={token}".encode())
    assert stat_rows(lb)[("app", "s1")]["status"] != "DRAIN"


def test_stats_on_a_proxying_frontend_like_seed_004(pylb, backends):
    """HAProxy's `stats uri /haproxy?stats` in defaults: every HTTP frontend answers it,
    and proxies everything else."""
    s1 = backends.echo("s1")
    cfg = config([s1.address])
    cfg["defaults"]["stats"] = {"uri": "/haproxy?stats", "realm": "Haproxy Statistics",
                                "auth": "haproxy:stats"}
    lb = pylb(cfg)
    port = port_of(cfg, "www")
    assert get(port, "/")[0] == 200
    status, headers, _ = get(port, "/haproxy?stats")
    assert status == 401 and "Haproxy Statistics" in headers["WWW-Authenticate"]
    status, _, page = get(port, "/haproxy?stats", basic("haproxy", "stats"))
    assert status == 200 and b"server-app-s1" in page
    assert get(port, "/other")[0] == 200
    rows = stat_rows(lb)
    assert int(rows[("www", "FRONTEND")]["intercepted"]) == 2
    assert int(rows[("app", "BACKEND")]["stot"]) == 2


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(("frontend", "message"), [
    ({"mode": "tcp", "stats": True}, r"frontends\.www\.stats: stats needs mode http"),
    ({"stats": {"auth": "nocolon"}},
     r"frontends\.www\.stats\.auth: expected USER:PASSWORD, or a list of them, got 'nocolon'"),
    ({"stats": {"uri": "stats"}}, r"frontends\.www\.stats\.uri: expected a path starting"),
    ({"stats": {"refresh": "soon"}}, r"frontends\.www\.stats\.refresh: "),
    ({"prometheus": {"uri": "/m etrics"}}, r"frontends\.www\.prometheus\.uri: "),
    ({"stats": {"colour": "red"}}, r"frontends\.www\.stats\.colour"),
])
def test_bad_page_settings_are_refused_with_file_line_and_key(tmp_path: Path, frontend,
                                                              message):
    cfg = {"frontends": {"www": {"bind": f"{HOST}:{free_port()}", **frontend}}}
    error = refused(tmp_path, cfg)
    assert re.search(rf"lb\.cfg:\d+: {message}", error), error


def test_the_example_configuration_serves_both_pages(tmp_path: Path):
    """conf/lb.cfg: the page and /metrics on 127.0.0.1:8404, without a password."""
    text = (Path(__file__).resolve().parent.parent / "conf" / "lb.cfg").read_text()
    cfg = yaml.safe_load(text)
    stats = cfg["frontends"]["stats"]
    assert stats["bind"] == "127.0.0.1:8404"
    assert stats["stats"]["uri"] == "/stats" and "auth" not in stats["stats"]
    assert stats["prometheus"]["uri"] == "/metrics"
    done = subprocess.run([*PYLB, "-c", "-f", "conf/lb.cfg"], capture_output=True, text=True,
                          timeout=20, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr

