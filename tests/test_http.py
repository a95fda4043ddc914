"""HTTP mode through real pylb processes, with raw sockets and curl as clients."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from backends import (
    WS_GREETING,
    EchoBackend,
    HttpConn,
    build_request,
    free_port,
    pattern_bytes,
    pattern_chunks,
    pattern_sha256,
    recv_until_eof,
)

MB = 1 << 20
TIMEOUTS = {"connect": "1s", "client": "10s", "server": "5s", "http-request": "2s"}


def http_config(frontends: dict[str, dict[str, Any]], backends: dict[str, dict[str, Any]],
                **global_: Any) -> dict[str, Any]:
    return {
        "global": {"workers": 1, **global_},
        "defaults": {"mode": "http", "timeout": dict(TIMEOUTS)},
        "frontends": frontends,
        "backends": backends,
    }


def servers(*backends: Any) -> dict[str, Any]:
    return {"servers": {b.name: {"address": b.address} for b in backends}}


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args],
                          capture_output=True, text=True, timeout=20)


def headers_of(desc: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in desc["headers"] if n.lower() == name.lower()]


@dataclass
class Web:
    """The shared pylb of this module and its backends."""

    lb: Any
    app: EchoBackend
    pool: EchoBackend
    rr_a: EchoBackend
    rr_b: EchoBackend

    def port(self, frontend: str) -> int:
        return int(self.lb.port(frontend))


@pytest.fixture(scope="module")
def web(pylb_module: Any, backends_module: Any) -> Web:
    app = backends_module.echo("app")
    pool = backends_module.echo("pool")
    rr_a, rr_b = backends_module.echo("a"), backends_module.echo("b")
    bind = {name: f"127.0.0.1:{free_port()}" for name in ("web", "xff", "pool", "rr", "slow")}
    lb = pylb_module(http_config(
        frontends={
            "web": {"bind": bind["web"], "default_backend": "app"},
            "xff": {"bind": bind["xff"], "default_backend": "app", "forwardfor": True},
            "pool": {"bind": bind["pool"], "default_backend": "pool"},
            "rr": {"bind": bind["rr"], "default_backend": "rr"},
            "slow": {"bind": bind["slow"], "default_backend": "app",
                     "timeout": {"http-request": "300ms"}},
        },
        backends={
            "app": servers(app),
            "pool": servers(pool),
            "rr": {"balance": "roundrobin", **servers(rr_a, rr_b)},
        },
        **{"max-header-size": "4k"},
    ))
    return Web(lb, app, pool, rr_a, rr_b)


def app_targets(web: Web) -> list[str]:
    with web.app.lock:
        return [r["target"] for r in web.app.requests]


# ------------------------------------------------------------------------------------------
# keep-alive, pooling, pipelining


def test_keepalive_requests_share_one_pooled_server_connection(web: Web) -> None:
    with HttpConn(web.port("pool")) as c:
        descs = [c.request("GET", f"/ka/{i}").json() for i in range(20)]
    assert [d["target"] for d in descs] == [f"/ka/{i}" for i in range(20)]
    assert {d["conn"] for d in descs} == {1}
    assert [d["seq"] for d in descs] == list(range(1, 21))
    # a later client connection reuses the idle server connection from the pool
    with HttpConn(web.port("pool")) as c:
        later = [c.request("GET", f"/ka2/{i}").json() for i in range(5)]
    assert {d["conn"] for d in later} == {1}
    assert web.pool.connections == 1


def test_pipelined_requests_answered_in_order(web: Web) -> None:
    with HttpConn(web.port("web")) as c:
        c.send(build_request("GET", "/pipe/1?delay=0.2")
               + build_request("HEAD", "/pipe/2")
               + build_request("GET", "/pipe/3?delay=0.1")
               + build_request("POST", "/pipe/4", body=b"four")
               + build_request("GET", "/pipe/5"))
        r1 = c.read_response()
        r2 = c.read_response("HEAD")
        r3, r4, r5 = c.read_response(), c.read_response(), c.read_response()
    assert [r.status for r in (r1, r2, r3, r4, r5)] == [200] * 5
    assert r2.body == b"" and int(r2.header("content-length") or "0") > 0
    assert [r.json()["target"] for r in (r1, r3, r4, r5)] == [
        "/pipe/1?delay=0.2", "/pipe/3?delay=0.1", "/pipe/4", "/pipe/5"]
    assert r4.json()["body_length"] == 4


def test_curl_keepalive_several_urls(web: Web) -> None:
    port = web.port("web")
    res = curl("-w", "\\n", f"http://127.0.0.1:{port}/curl/1", f"http://127.0.0.1:{port}/curl/2")
    assert res.returncode == 0, res.stderr
    descs = [json.loads(line) for line in res.stdout.splitlines() if line]
    assert [d["target"] for d in descs] == ["/curl/1", "/curl/2"]
    assert headers_of(descs[0], "user-agent")[0].startswith("curl/")


# ------------------------------------------------------------------------------------------
# bodies


def test_content_length_request_body(web: Web) -> None:
    body = pattern_bytes(MB)
    with HttpConn(web.port("web")) as c:
        desc = c.request("PUT", "/cl", body=body).json()
    assert desc["method"] == "PUT"
    assert desc["body_length"] == MB
    assert desc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert headers_of(desc, "content-length") == [str(MB)]


def test_chunked_request_body(web: Web) -> None:
    pieces = [b"a", pattern_bytes(100), pattern_bytes(70000)]
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    with HttpConn(web.port("web")) as c:
        desc = c.request("POST", "/chunked", headers={"Transfer-Encoding": "chunked"},
                         body=body).json()
        again = c.request("GET", "/after-chunked").json()  # framing kept on the connection
    assert desc["body_length"] == 70101
    assert desc["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert again["target"] == "/after-chunked"


def test_chunked_response_streamed(web: Web) -> None:
    size = 300_000
    with HttpConn(web.port("web")) as c:
        resp = c.request("GET", f"/stream?size={size}&chunked=1")
        after = c.request("GET", "/after-stream")
    assert resp.status == 200
    assert resp.header("transfer-encoding") == "chunked"
    assert resp.header("content-length") is None
    assert len(resp.body) == size and resp.body == pattern_bytes(size)
    assert after.json()["target"] == "/after-stream"


def _bounded_config(port: int, backend: EchoBackend) -> dict[str, Any]:
    return http_config({"web": {"bind": f"127.0.0.1:{port}", "default_backend": "app"}},
                       {"app": servers(backend)})


def test_large_chunked_response_slow_reader_bounded_memory(pylb: Any, backends: Any) -> None:
    app = backends.echo("app")
    lb = pylb(_bounded_config(free_port(), app))
    port = lb.port("web")
    with HttpConn(port) as c:  # warm up the worker before measuring
        for _ in range(3):
            assert len(c.request("GET", f"/warm?size={MB}&chunked=1").body) == MB
    base = lb.workers_rss()
    size = 40 * MB
    sha = hashlib.sha256()
    received = 0
    peak = base

    def slow_sink(piece: bytes) -> None:
        nonlocal received, peak
        sha.update(piece)
        before, received = received, received + len(piece)
        if before // (2 * MB) != received // (2 * MB):
            peak = max(peak, lb.workers_rss())
        time.sleep(0.0005)

    with HttpConn(port, rcvbuf=65536, timeout=20) as c:
        c.send(build_request("GET", f"/big?size={size}&chunked=1"))
        time.sleep(0.6)  # the reader stalls: pylb must stop reading from the server
        peak = max(peak, lb.workers_rss())
        resp = c.read_response(sink=slow_sink)
    assert resp.status == 200 and resp.header("transfer-encoding") == "chunked"
    assert received == size
    assert sha.hexdigest() == pattern_sha256(size)
    assert peak - base < 15 * MB, f"worker RSS grew by {(peak - base) / MB:.1f} MB"


def test_large_upload_slow_server_bounded_memory(pylb: Any, backends: Any) -> None:
    app = backends.echo("app", read_delay=1.0)  # stops reading for 1 s after each head
    lb = pylb(_bounded_config(free_port(), app))
    port = lb.port("web")
    with HttpConn(port) as c:
        for _ in range(3):
            assert c.request("POST", "/warm", body=pattern_bytes(MB)).json()["body_length"] == MB
    base = lb.workers_rss()
    size = 40 * MB
    with HttpConn(port, timeout=20) as c:
        c.send(build_request("POST", "/upload", headers={"Content-Length": str(size)}))

        def send_body() -> None:
            for piece in pattern_chunks(size, 256 * 1024):
                c.sock.sendall(piece)

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        peak = base
        deadline = time.monotonic() + 30
        while sender.is_alive() and time.monotonic() < deadline:
            peak = max(peak, lb.workers_rss())
            sender.join(0.05)
        assert not sender.is_alive(), "upload did not finish"
        desc = c.read_response().json()
    assert desc["body_length"] == size
    assert desc["body_sha256"] == pattern_sha256(size)
    assert peak - base < 15 * MB, f"worker RSS grew by {(peak - base) / MB:.1f} MB"


# ------------------------------------------------------------------------------------------
# connection management, HTTP/1.0, Expect, Upgrade


def test_http10_client_gets_close_and_no_chunked(web: Web) -> None:
    size = 100_000
    with HttpConn(web.port("web")) as c:
        c.send(b"GET /h10?size=%d&chunked=1 HTTP/1.0\r\nHost: a\r\n\r\n" % size)
        resp = c.read_response()
        assert c.closed_by_peer(), "pylb kept the HTTP/1.0 connection open"
    assert resp.status == 200
    assert resp.header("transfer-encoding") is None
    assert resp.body == pattern_bytes(size)
    with HttpConn(web.port("web")) as c:
        c.send(b"GET /h10-json HTTP/1.0\r\nHost: a\r\n\r\n")
        desc = c.read_response().json()
        assert c.closed_by_peer()
    assert desc["version"] == "1.1"  # pylb talks HTTP/1.1 to servers


def test_http10_request_without_host_goes_on_as_http10_over_a_pooled_connection(
        web: Web) -> None:
    """An HTTP/1.1 request needs a Host (nginx answers 400 without): a Host-less HTTP/1.0
    request is not upgraded, and still keeps the server connection alive."""
    descs = []
    for index in range(2):
        with HttpConn(web.port("pool")) as c:
            c.send(b"GET /no-host/%d HTTP/1.0\r\n\r\n" % index)
            descs.append(c.read_response().json())
            assert c.closed_by_peer()
    assert [d["version"] for d in descs] == ["1.0", "1.0"]
    assert [headers_of(d, "connection") for d in descs] == [["keep-alive"]] * 2
    assert descs[0]["conn"] == descs[1]["conn"]  # the second came on the pooled connection


def test_connection_close_stops_after_one_request(web: Web) -> None:
    with HttpConn(web.port("web")) as c:
        c.send(build_request("GET", "/close-1", headers={"Connection": "close"})
               + build_request("GET", "/close-2"))
        resp = c.read_response()
        assert c.closed_by_peer(), "pylb did not close after Connection: close"
    assert resp.json()["target"] == "/close-1"
    assert "close" in (resp.header("connection") or "").lower()
    time.sleep(0.1)  # give a wrongly forwarded second request time to arrive
    assert "/close-2" not in app_targets(web)


def test_expect_100_continue_raw(web: Web) -> None:
    with HttpConn(web.port("web")) as c:
        c.send(b"POST /expect HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n"
               b"Expect: 100-continue\r\n\r\n")
        interim = c.read_response()
        assert interim.status == 100
        c.send(b"hello world")
        final = c.read_response()
    desc = final.json()
    assert final.status == 200
    assert desc["body_length"] == 11
    assert desc["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()


def test_expect_100_continue_curl(web: Web, tmp_path: Path) -> None:
    body = pattern_bytes(200_000)
    (tmp_path / "body").write_bytes(body)
    start = time.monotonic()
    res = curl("-v", "--expect100-timeout", "5", "-H", "Expect: 100-continue",
               "--data-binary", f"@{tmp_path / 'body'}",
               f"http://127.0.0.1:{web.port('web')}/expect-curl")
    elapsed = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    assert "< HTTP/1.1 100 Continue" in res.stderr
    assert elapsed < 3.0, "curl waited for its expect timeout: no 100 Continue reached it"
    desc = json.loads(res.stdout)
    assert desc["body_length"] == len(body)
    assert desc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert headers_of(desc, "expect") == ["100-continue"]


def test_websocket_upgrade_then_bytes_both_ways(web: Web) -> None:
    with HttpConn(web.port("web")) as c:
        c.send(build_request("GET", "/ws", headers={
            "Connection": "Upgrade", "Upgrade": "websocket",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}))
        resp = c.read_response()
        assert resp.status == 101
        assert (resp.header("upgrade") or "").lower() == "websocket"
        assert c.reader.read_exact(len(WS_GREETING)) == WS_GREETING  # server speaks first
        c.send(b"ping")
        assert c.reader.read_exact(4) == b"ping"
        blob = pattern_bytes(300_000)
        c.send(blob)
        assert c.reader.read_exact(len(blob)) == blob
        c.sock.shutdown(socket.SHUT_WR)
        rest, ended = recv_until_eof(c.sock, timeout=3)
    assert (rest, ended) == (b"", True)


# ------------------------------------------------------------------------------------------
# X-Forwarded-For


def test_forwardfor_added(web: Web) -> None:
    with HttpConn(web.port("xff")) as c:
        desc = c.request("GET", "/xff").json()
    assert headers_of(desc, "x-forwarded-for") == ["127.0.0.1"]


def test_forwardfor_appended_to_existing(web: Web) -> None:
    with HttpConn(web.port("xff")) as c:
        desc = c.request("GET", "/xff2", headers={"X-Forwarded-For": "10.1.2.3"}).json()
    values = headers_of(desc, "x-forwarded-for")
    assert ", ".join(values) == "10.1.2.3, 127.0.0.1", values


def test_forwardfor_off_by_default(web: Web) -> None:
    with HttpConn(web.port("web")) as c:
        desc = c.request("GET", "/noxff").json()
    assert headers_of(desc, "x-forwarded-for") == []


# ------------------------------------------------------------------------------------------
# error answers

MALFORMED = {
    "te-and-cl": b"POST /m HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate-cl": b"POST /m HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                    b"Content-Length: 4\r\n\r\nabcd",
    "invalid-cl": b"POST /m HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\na",
    "te-not-chunked-last": b"POST /m HTTP/1.1\r\nHost: a\r\n"
                           b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": b"POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\nabc\r\n0\r\n\r\n",
    "bare-lf-in-head": b"GET /m HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
    "bare-cr-in-value": b"GET /m HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n",
    "space-before-colon": b"GET /m HTTP/1.1\r\nHost : a\r\n\r\n",
    "space-in-target": b"GET /m n HTTP/1.1\r\nHost: a\r\n\r\n",
    "not-http": b"HELLO WORLD\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_400_then_close(web: Web, raw: bytes) -> None:
    before = len(app_targets(web))
    with HttpConn(web.port("web")) as c:
        c.send(raw + build_request("GET", "/after-malformed"))
        resp = c.read_response()
        assert resp.status == 400
        assert "close" in (resp.header("connection") or "").lower()
        assert c.closed_by_peer(), "pylb kept the connection open after a 400"
    assert app_targets(web)[before:] == []


def test_oversized_head_400(web: Web) -> None:
    with HttpConn(web.port("web")) as c:
        ok = c.request("GET", "/small-head", headers={"X-Pad": "a" * 1000})
    assert ok.status == 200
    with HttpConn(web.port("web")) as c:
        c.send(build_request("GET", "/big-head", headers={"X-Pad": "a" * 8000}))
        resp = c.read_response()
        assert resp.status == 400
        assert c.closed_by_peer()
    assert "/big-head" not in app_targets(web)


def test_request_head_timeout_408(web: Web) -> None:
    with HttpConn(web.port("slow")) as c:
        start = time.monotonic()
        c.send(b"GET /half HTTP/1.1\r\nHost: a\r\n")
        resp = c.read_response()
        elapsed = time.monotonic() - start
        assert resp.status == 408
        assert c.closed_by_peer()
    assert 0.25 <= elapsed < 2.0, elapsed
    assert "/half" not in app_targets(web)


@dataclass
class Broken:
    lb: Any
    backends: dict[str, Any]


@pytest.fixture(scope="module")
def broken(pylb_module: Any, backends_module: Any) -> Broken:
    bad = {mode: backends_module.bad(mode) for mode in ("close", "garbage", "bad-cl", "silent")}
    addresses = {mode: b.address for mode, b in bad.items()}
    addresses["refused"] = f"127.0.0.1:{free_port()}"  # nothing listens there
    frontends = {m: {"bind": f"127.0.0.1:{free_port()}", "default_backend": m}
                 for m in addresses}
    backends = {m: {"servers": {"s1": {"address": a}}} for m, a in addresses.items()}
    config = http_config(frontends, backends)
    config["defaults"]["timeout"]["server"] = "300ms"
    return Broken(pylb_module(config), bad)


@pytest.mark.parametrize(("mode", "status"), [
    ("close", 502), ("garbage", 502), ("bad-cl", 502), ("refused", 503), ("silent", 504),
])
def test_server_failure_answers(broken: Broken, mode: str, status: int) -> None:
    with HttpConn(broken.lb.port(mode)) as c:
        start = time.monotonic()
        resp = c.request("GET", f"/{mode}")
        elapsed = time.monotonic() - start
        assert resp.status == status, resp
        assert "close" in (resp.header("connection") or "").lower()
        assert c.closed_by_peer()
    if mode != "refused":
        assert broken.backends[mode].heads >= 1  # the request did reach the server
    if mode == "silent":
        assert 0.25 <= elapsed < 2.0, elapsed


# ------------------------------------------------------------------------------------------
# load balancing


def test_round_robin_alternates_with_curl(web: Web) -> None:
    names = []
    for i in range(6):
        res = curl(f"http://127.0.0.1:{web.port('rr')}/rr/{i}")
        assert res.returncode == 0, res.stderr
        names.append(json.loads(res.stdout)["server"])
    assert sorted(set(names)) == ["a", "b"]
    assert names == [names[0], names[1]] * 3, names

