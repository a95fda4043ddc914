"""Rate limiting and abuse recipes end to end: real pylb with 4 workers, clients from several
loopback addresses (127.0.0.2, 127.0.0.3, ...). Stick tables are in shared memory, so a
client over its limit is refused by every worker, and `show table` on the stats socket sees
the counters every worker keeps."""

from __future__ import annotations

import re
import socket
import threading
from typing import Any

from backends import HOST, TCP_BANNER, HttpConn, build_request
from test_runtime import cli, eventually, lb_config, ok, start, stat

LIMIT = 20
STORE = ["http_req_rate(60s)", "conn_cur", "conn_cnt", "http_req_cnt", "gpc0",
         "http_err_rate(60s)"]


def table(store: list[str] | None = None) -> dict[str, Any]:
    return {"type": "ip", "size": "100k", "expire": "30s", "store": store or STORE}


def rate_limited(pylb: Any, backends: Any, limit: int = LIMIT, **frontend: Any) -> tuple[Any, int]:
    echo = backends.echo("s1")
    cfg, port = lb_config({"s1": {"address": echo.address}}, frontend={
        "stick-table": table(),
        "http-request": ["track-sc0 src",
                         f"deny deny_status 429 if {{ sc_http_req_rate(0) gt {limit} }}"],
        **frontend,
    })
    return start(pylb, cfg), port


def get(port: int, source: str, target: str = "/") -> int:
    """One request on a new connection from ``source``; its status."""
    with HttpConn(port, source=source) as conn:
        return conn.request("GET", target).status


def entry(lb: Any, key: str, name: str = "www") -> dict[str, str]:
    """`show table NAME key KEY`: the entry's fields (empty when there is none)."""
    answer = cli(lb, f"show table {name} key {key}")
    lines = [line for line in answer.splitlines() if f" key={key} " in line]
    return dict(re.findall(r"(\S+)=(\S+)", lines[0])) if lines else {}


def workers_of(lb: Any, conns: list[HttpConn]) -> list[str]:
    """The worker serving each connection, from `show sess` (waits until all are seen)."""
    ports = [c.sock.getsockname() for c in conns]

    def find() -> list[str] | None:
        sess = cli(lb, "show sess")
        found = [re.search(rf"src={re.escape(host)}:{port} .* worker=(\d+)/", sess)
                 for host, port in ports]
        return [m[1] for m in found] if all(found) else None  # type: ignore[index]

    return eventually(find, 5, "connections in show sess")


def one_per_worker(lb: Any, port: int, source: str, workers: int = 4) -> dict[str, HttpConn]:
    """Idle connections from ``source``, one served by each worker (the kernel hands
    connections to whichever worker accepts first: open more until each has one)."""
    chosen: dict[str, HttpConn] = {}
    for _ in range(25):
        batch = [HttpConn(port, source=source) for _ in range(8)]
        for conn, worker in zip(batch, workers_of(lb, batch), strict=True):
            if worker in chosen:
                conn.close()
            else:
                chosen[worker] = conn
        if len(chosen) == workers:
            return chosen
    raise AssertionError(f"connections reached only workers {sorted(chosen)}")


def refused(port: int, source: str) -> bool:
    """True when a new connection from ``source`` is closed (or reset) without an answer
    to the request it sends."""
    try:
        with HttpConn(port, source=source, timeout=5) as conn:
            conn.send(build_request())
            return conn.closed_by_peer(5)
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_rate_limit_recipe_holds_on_every_worker(pylb: Any, backends: Any) -> None:
    lb, port = rate_limited(pylb, backends)
    conns = one_per_worker(lb, port, "127.0.0.2")
    held = list(conns.values())
    statuses = [held[i % 4].request("GET", f"/?n={i}").status for i in range(LIMIT)]
    assert statuses == [200] * LIMIT
    # over the limit now: each worker refuses, whichever connection it serves
    assert {worker: conn.request().status for worker, conn in conns.items()} == {
        worker: 429 for worker in conns}
    for conn in held:
        assert conn.closed_by_peer()  # pylb's own answers close
        conn.close()
    # another address is not limited, on any worker
    others = one_per_worker(lb, port, "127.0.0.3")
    assert {w: c.request().status for w, c in others.items()} == {w: 200 for w in others}
    for conn in others.values():
        conn.close()
    assert get(port, "127.0.0.2") == 429
    data = entry(lb, "127.0.0.2")
    assert data["http_req_rate(60000)"] == str(LIMIT + 5)
    assert data["http_req_cnt"] == str(LIMIT + 5)
    assert data["http_err_rate(60000)"] == "5"  # the 429s
    assert entry(lb, "127.0.0.3")["http_req_cnt"] == "4"
    # every request released its conn_cur, whatever the worker and however it ended
    eventually(lambda: entry(lb, "127.0.0.2")["conn_cur"] == "0", 3, "conn_cur back to 0")


def test_many_abusers_are_denied_while_others_pass(pylb: Any, backends: Any) -> None:
    lb, port = rate_limited(pylb, backends, limit=10)
    results: dict[str, list[int]] = {}

    def client(source: str, count: int) -> None:
        results[source] = [get(port, source, f"/?i={i}") for i in range(count)]

    abusers = [f"127.0.0.{n}" for n in range(10, 20)]
    others = [f"127.0.0.{n}" for n in range(30, 35)]
    threads = [threading.Thread(target=client, args=(source, 14)) for source in abusers]
    threads += [threading.Thread(target=client, args=(source, 5)) for source in others]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 15
    for source in abusers:
        assert results[source] == [200] * 10 + [429] * 4, source
    for source in others:
        assert results[source] == [200] * 5, source
    summary = cli(lb, "show table www data.http_req_rate gt 10")
    assert sorted(re.findall(r"key=(\S+)", summary)) == sorted(abusers)
    assert "# table: www, type: ip, size:102400, used:15" in summary


def test_show_table_shows_what_every_worker_counted(pylb: Any, backends: Any) -> None:
    echo = backends.echo("s1")
    cfg, port = lb_config({"s1": {"address": echo.address}}, frontend={
        "stick-table": table(["http_req_rate(10s)", "conn_cur", "http_err_cnt"]),
        "http-request": ["track-sc0 src"],
    })
    lb = start(pylb, cfg)
    assert [get(port, "127.0.0.5", f"/?status={s}") for s in (200, 404, 200, 404, 200)] == [
        200, 404, 200, 404, 200]
    expected = " conn_cur=0 http_req_rate(10000)=5 http_err_cnt=2"

    def line() -> str | None:  # conn_cur drops just after the answer is sent
        answer = cli(lb, "show table www")
        assert answer.startswith("# table: www, type: ip, size:102400, used:1\n")
        found = next(line for line in answer.splitlines() if "key=127.0.0.5 " in line)
        return found if found.endswith(expected) else None

    assert re.search(r" exp=\d+ ", eventually(line, 3, expected))
    assert cli(lb, "show table www data.http_req_rate gt 100") == (
        "# table: www, type: ip, size:102400, used:1\n\n")


def test_abuser_flag_recipe_and_operator_commands(pylb: Any, backends: Any) -> None:
    echo = backends.echo("s1")
    cfg, port = lb_config({"s1": {"address": echo.address}}, frontend={
        "stick-table": table(),
        "http-request": ["track-sc0 src",
                         "sc-inc-gpc0(0) if { sc_http_err_rate(0) gt 3 }",
                         "deny if { sc_get_gpc0(0) gt 0 }"],
    })
    lb = start(pylb, cfg)
    abuser, other, flagged = "127.0.0.2", "127.0.0.3", "127.0.0.4"
    assert [get(port, abuser, "/?status=404") for _ in range(4)] == [404] * 4
    assert [get(port, abuser) for _ in range(3)] == [403] * 3  # flagged, even when polite
    assert get(port, other) == 200
    assert entry(lb, abuser)["gpc0"] == "3"
    assert re.findall(r"key=(\S+)", cli(lb, "show table www data.gpc0 gt 0")) == [abuser]
    assert int(stat(lb, "www", "FRONTEND", "dreq")) == 3
    # the operator forgives: the entry goes, and with it the flag and the error rate
    ok(lb, f"clear table www key {abuser}")
    assert entry(lb, abuser) == {}
    assert get(port, abuser) == 200
    # ... or flags a client by hand
    ok(lb, f"set table www key {flagged} data.gpc0 1")
    assert get(port, flagged) == 403
    ok(lb, f"set table www key {flagged} data.gpc0 0")
    assert get(port, flagged) == 200


def test_connection_cap_per_address_across_workers(pylb: Any, backends: Any) -> None:
    echo = backends.echo("s1")
    cap = 4
    cfg, port = lb_config({"s1": {"address": echo.address}}, frontend={
        "stick-table": table(["conn_cur", "conn_cnt", "http_req_cnt", "conn_rate(60s)"]),
        "tcp-request connection": ["track-sc0 src",
                                   f"reject if {{ sc_conn_cur(0) gt {cap} }}"],
    })
    lb = start(pylb, cfg)
    held = [HttpConn(port, source="127.0.0.2") for _ in range(cap)]
    assert [conn.request().status for conn in held] == [200] * cap  # keep-alive: still open
    workers = set(workers_of(lb, held))
    for _ in range(8):  # whichever worker takes it, the 5th connection is refused
        assert refused(port, "127.0.0.2")
    assert get(port, "127.0.0.3") == 200
    assert int(stat(lb, "www", "FRONTEND", "dreq")) == 8
    data = entry(lb, "127.0.0.2")
    assert (data["conn_cur"], data["conn_cnt"], data["http_req_cnt"]) == (
        str(cap), str(cap + 8), str(cap))
    # a connection that ends frees its place, on any worker
    held.pop().close()
    eventually(lambda: entry(lb, "127.0.0.2")["conn_cur"] == str(cap - 1), 3, "a place")
    with HttpConn(port, source="127.0.0.2") as conn:
        assert conn.request().status == 200
    for conn in held:
        conn.close()
    eventually(lambda: entry(lb, "127.0.0.2")["conn_cur"] == "0", 3, "all places free")
    assert len(workers) >= 1


def test_tcp_mode_connection_cap(pylb: Any, backends: Any) -> None:
    echo = backends.tcp("echo")
    cfg, port = lb_config({}, frontend={
        "mode": "tcp",
        "stick-table": table(["conn_cur", "conn_cnt"]),
        "tcp-request connection": ["track-sc1 src", "reject if { sc1_conn_cur gt 2 }"],
    })
    cfg["defaults"]["mode"] = "tcp"
    cfg["backends"]["app"] = {"servers": {"s1": {"address": echo.address}}}
    lb = start(pylb, cfg)
    held = []
    for _ in range(2):
        sock = socket.create_connection((HOST, port), timeout=5, source_address=("127.0.0.2", 0))
        sock.sendall(b"ping\n")
        got = b""
        while len(got) < len(TCP_BANNER + b"ping\n") and (data := sock.recv(100)):
            got += data
        assert got == TCP_BANNER + b"ping\n"  # relayed to the echo server and back
        held.append(sock)
    try:  # the reset may come before connect() even returns
        with socket.create_connection((HOST, port), timeout=5,
                                      source_address=("127.0.0.2", 0)) as extra:
            extra.sendall(b"ping\n")
            assert extra.recv(100) == b""  # no banner: never relayed
    except (ConnectionResetError, BrokenPipeError):
        pass
    for sock in held:
        sock.close()
    eventually(lambda: entry(lb, "127.0.0.2").get("conn_cur") == "0", 3, "released")
    assert entry(lb, "127.0.0.2")["conn_cnt"] == "3"


def test_handed_over_connections_keep_their_count(pylb: Any, backends: Any) -> None:
    echo = backends.echo("s1")
    cfg, port = lb_config({"s1": {"address": echo.address}}, workers=2, frontend={
        "stick-table": table(["conn_cur", "conn_cnt", "http_req_cnt"]),
        "tcp-request connection": ["track-sc0 src"],
    })
    lb = start(pylb, cfg)
    conn = HttpConn(port, source="127.0.0.2")
    assert conn.request().status == 200
    assert entry(lb, "127.0.0.2")["conn_cur"] == "1"
    answer = cli(lb, "reload", timeout=30)
    assert answer.startswith("Success=1"), answer
    # the idle connection went to the new generation: still one connection, counted once
    assert conn.request().status == 200
    data = eventually(lambda: (d := entry(lb, "127.0.0.2"))["conn_cur"] == "1" and d, 3,
                      "one connection")
    assert (data["conn_cnt"], data["http_req_cnt"]) == ("1", "2")
    conn.close()
    eventually(lambda: entry(lb, "127.0.0.2")["conn_cur"] == "0", 3, "released")


def test_a_worker_stopped_hard_lets_go_of_its_connections(pylb: Any, backends: Any) -> None:
    echo = backends.echo("s1")
    cfg, port = lb_config({"s1": {"address": echo.address}}, workers=2, frontend={
        "stick-table": table(["conn_cur", "conn_cnt"]),
        "tcp-request connection": ["track-sc0 src"],
        "http-request": ["track-sc1 src"],
    })
    cfg["global"]["hard-stop-after"] = "300ms"
    lb = start(pylb, cfg)
    conn = HttpConn(port, source="127.0.0.2", timeout=10)
    conn.send(build_request("GET", "/?delay=5"))  # busy when the reload comes
    eventually(lambda: entry(lb, "127.0.0.2").get("conn_cur") == "2", 3, "connection and request")
    answer = cli(lb, "reload", timeout=30)
    assert answer.startswith("Success=1"), answer
    # the old worker gave up on the request after hard-stop-after, and exited
    assert conn.closed_by_peer(5)
    conn.close()
    eventually(lambda: entry(lb, "127.0.0.2")["conn_cur"] == "0", 5, "released")
