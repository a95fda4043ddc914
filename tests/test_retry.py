"""Layer-7 retries (retry-on, retries, redispatch, retry-buffer, retry-non-idempotent,
http-request disable-l7-retry) and httpclose / http-server-close, through real pylb
processes with two workers; their configuration errors; and, without sockets, the
redispatch interval (lb.retry) and the health check interval (lb.check: inter, fastinter,
downinter, spread-checks).

The retry backends have a failing server s1 and a live echo server s2 declared `backup`:
balancing always picks s1 first, and a request reaches s2 only when pylb moves it there.
Every request has a target of its own, so what each server received is told per request.
The failing servers (tests/backends.py ScriptedBackend, BadBackend) misbehave only once
they have read what the test needs them to, and the client sends the rest of a body only
once pylb has acted: nothing depends on timing but the timeouts under test.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import (
    HOST,
    EchoBackend,
    HttpConn,
    Response,
    ScriptedBackend,
    build_request,
    free_port,
    pattern_bytes,
    recv_until_eof,
    wait_until,
)
from conftest import REPO

from lb import check as lb_check
from lb import config
from lb.check import ServerCheck
from lb.config import ConfigError
from lb.retry import RetryPolicy, redispatch_now
from lb.shared import BE_HOLD, DOWN, MAINT, SRV_ADMIN, SRV_OP, UP, Shared

MB = 1 << 20
# pylb's timeouts run on a coarse clock (lb.timer: a 50ms tick, and a busy or descheduled
# worker reads it late), so one can end up to ~0.1s early; lower bounds below allow for it
EARLY = 0.1
TIMEOUTS = {"connect": "1s", "client": "10s", "server": "5s", "http-request": "5s"}
PREFIX = 32 * 1024  # body bytes s1 reads before its reset: twice the default retry-buffer
# the most a backend can allow: every failure kind, any method, big bodies, another server
LENIENT = {"retry-on": "all-retryable-errors", "retry-non-idempotent": True,
           "retry-buffer": "2m", "redispatch": 1}


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedBackend]]:
    """``scripted(mode, **options)`` -> a running ScriptedBackend, stopped at teardown."""
    started: list[ScriptedBackend] = []

    def start(mode: str, **options: Any) -> ScriptedBackend:
        server = ScriptedBackend(mode, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def pair(s1: str, s2: EchoBackend, **options: Any) -> dict[str, Any]:
    """A backend of s1 (at address `s1`) and its backup s2, with backend `options`."""
    return {**options, "servers": {"s1": {"address": s1},
                                   "s2": {"address": s2.address, "backup": True}}}


def lab_config(backends: dict[str, dict[str, Any]],
               frontends: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """pylb with two workers, a frontend per backend (of the same name) and `frontends`."""
    fronts = {name: {"bind": f"{HOST}:{free_port()}", "default_backend": name}
              for name in backends}
    for name, options in (frontends or {}).items():
        fronts[name] = {"bind": f"{HOST}:{free_port()}", **options}
    return {
        "global": {"workers": 2},
        "defaults": {"mode": "http", "timeout": dict(TIMEOUTS)},
        "frontends": fronts,
        "backends": backends,
    }


def ask(port: int, method: str, target: str, body: bytes | None = None) -> Response:
    """One request on a new connection. pylb's own error answers must be whole responses
    that close the connection."""
    with HttpConn(port, timeout=10) as conn:
        resp = conn.request(method, target, body=body)
        if resp.header("x-server") is None:  # not a server's answer: one of pylb's pages
            assert resp.status >= 500, resp
            assert int(resp.header("content-length") or -1) == len(resp.body) > 0
            assert "close" in (resp.header("connection") or "").lower()
            assert conn.closed_by_peer(), "pylb kept the connection after its error page"
    return resp


def s2_targets(s2: EchoBackend) -> list[str]:
    with s2.lock:
        return [r["target"] for r in s2.requests]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- 1. a body kept in the retry-buffer ---------------------------------------------------------


def test_a_post_reset_mid_body_is_replayed_only_from_a_big_enough_retry_buffer(
        pylb: Any, backends: Any, scripted: Callable[..., ScriptedBackend]) -> None:
    s1 = scripted("reset", reset_after=PREFIX)
    s2 = backends.echo("s2")
    retry = {"retry-on": "all-retryable-errors", "redispatch": 1}
    lb = pylb(lab_config({"kept": pair(s1.address, s2, **retry, **{"retry-buffer": "2m"}),
                          "unkept": pair(s1.address, s2, **retry)}))
    body = pattern_bytes(MB)
    head = build_request("POST", "/kept", headers={"Content-Length": str(MB)})
    with HttpConn(lb.port("kept"), timeout=10) as conn:
        conn.send(head + body[:PREFIX])
        # s1 reads the head and PREFIX bytes, then resets: pylb, which has not sent the
        # request whole (the client still holds the rest), replays what it kept on s2.
        assert wait_until(lambda: s2.connections == 1, 5), "pylb did not move to s2"
        conn.send(body[PREFIX:])
        resp = conn.read_response("POST")
    assert resp.status == 200, resp
    desc = resp.json()
    assert (desc["server"], desc["method"], desc["target"]) == ("s2", "POST", "/kept")
    assert (desc["body_length"], desc["body_sha256"]) == (MB, sha(body))
    [first] = s1.received("/kept")
    assert (first.method, first.length, first.body_length) == ("POST", MB, PREFIX)
    assert first.sha.hexdigest() == sha(body[:PREFIX])

    # The default retry-buffer (16k) could not keep PREFIX bytes: no replay, a whole 502.
    head = build_request("POST", "/unkept", headers={"Content-Length": str(MB)})
    with HttpConn(lb.port("unkept"), timeout=10) as conn:
        conn.send(head + body[:PREFIX])  # no more: s1's reset comes first
        resp = conn.read_response("POST")
        assert resp.status == 502, resp
        assert int(resp.header("content-length") or -1) == len(resp.body) > 0
        assert "close" in (resp.header("connection") or "").lower()
        assert conn.closed_by_peer()
    [first] = s1.received("/unkept")
    assert first.body_length == PREFIX
    assert s2_targets(s2) == ["/kept"]
    assert s2.connections == 1


def test_a_chunked_body_is_replayed_in_its_chunks(
        pylb: Any, backends: Any, scripted: Callable[..., ScriptedBackend]) -> None:
    s1 = scripted("close")  # reads the head (it knows no chunked bodies), then closes
    s2 = backends.echo("s2")
    lb = pylb(lab_config({"app": pair(s1.address, s2, **LENIENT)}))
    pieces = [pattern_bytes(5000), b"x" * 7, pattern_bytes(100_000)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    with HttpConn(lb.port("app"), timeout=10) as conn:
        resp = conn.request("POST", "/chunked", headers={"Transfer-Encoding": "chunked"},
                            body=body)
        again = conn.request("GET", "/after-chunked")  # the framing held on both sides
    desc = resp.json()
    assert (resp.status, desc["server"]) == (200, "s2")
    assert (desc["body_length"], desc["body_sha256"]) == (105_007, sha(b"".join(pieces)))
    assert again.json()["target"] == "/after-chunked"
    assert len(s1.received("/chunked")) == 1


# -- 2. an answer that reached the client ---------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("ending", ["reset", "junk"])
def test_an_answer_the_client_has_begun_to_receive_is_never_replayed(
        pylb: Any, backends: Any, scripted: Callable[..., ScriptedBackend],
        method: str, ending: str) -> None:
    """s1 answers a head and part of a body, then resets (a Content-Length answer) or
    sends junk (a chunked answer whose next chunk size is not one)."""
    chunked = ending == "junk"
    s1 = scripted("partial", chunked=chunked)
    s2 = backends.echo("s2")
    lb = pylb(lab_config({"app": pair(s1.address, s2, **LENIENT)}))
    body = pattern_bytes(1000) if method == "POST" else None
    sent = ScriptedBackend.PARTIAL_SENT
    with HttpConn(lb.port("app"), timeout=10) as conn:
        conn.send(build_request(method, "/started", body=body))
        head = conn.reader.read_until(b"\r\n\r\n").lower()
        assert head.startswith(b"http/1.1 200 "), head
        if chunked:
            assert b"\r\ntransfer-encoding: chunked\r\n" in head
            got = b""
            while len(got) < sent:  # however pylb cut it into chunks
                size = int(conn.reader.read_until(b"\r\n"), 16)
                assert size > 0
                got += conn.reader.read_exact(size)
                assert conn.reader.read_exact(2) == b"\r\n"
        else:
            assert b"\r\ncontent-length: 1000\r\n" in head
            got = conn.reader.read_exact(sent)
        assert got == b"p" * sent
        s1.release()  # s1 fails with the rest of its answer unsent
        rest, ended = recv_until_eof(conn.sock, 5)
        assert (bytes(conn.reader.buf), rest, ended) == (b"", b"", True)
    [req] = s1.received("/started")
    assert (req.method, req.complete) == (method, True)
    assert s1.connections == 1
    assert s2.connections == 0 and s2_targets(s2) == []


def test_a_request_whose_client_saw_100_continue_is_not_replayed(
        pylb: Any, backends: Any, scripted: Callable[..., ScriptedBackend]) -> None:
    """s1 answers 100 Continue, reads the body, then closes without a final answer."""
    s1 = scripted("close", interim=True)
    s2 = backends.echo("s2")
    lb = pylb(lab_config({"app": pair(s1.address, s2, **LENIENT)}))
    body = pattern_bytes(3000)
    with HttpConn(lb.port("app"), timeout=10) as conn:
        conn.send(build_request("PUT", "/continued", headers={
            "Expect": "100-continue", "Content-Length": str(len(body))}))
        assert conn.read_response("PUT").status == 100
        conn.send(body)
        resp = conn.read_response("PUT")
        assert resp.status == 502, resp  # the client saw an answer begin: no replay
        assert conn.closed_by_peer()
    # the same request without Expect is replayed (PUT is idempotent)
    resp = ask(lb.port("app"), "PUT", "/plain-put", body)
    assert (resp.status, resp.json()["body_sha256"]) == (200, sha(body))
    assert [r.complete for r in s1.requests] == [True, True]
    assert s2_targets(s2) == ["/plain-put"]


# -- 3 to 6. failure kinds: retried when retry-on names them, on idempotent requests -------------


def _failing_server(kind: str, backends: Any, scripted: Callable[..., ScriptedBackend]) -> Any:
    if kind in ("garbage", "silent"):
        return backends.bad(kind)
    return scripted(kind)


@pytest.mark.parametrize(("word", "kind", "plain"), [
    ("empty-response", "close", 502),  # s1 reads the request whole, closes without answering
    ("junk-response", "garbage", 502),  # s1 answers something that is not HTTP
    ("response-timeout", "silent", 504),  # s1 never answers (timeout server: 300ms)
    ("503", "status", 503),  # s1 answers 503: pylb passes it on unless told to retry
])
def test_failure_kinds_are_retried_when_retry_on_names_them(
        pylb: Any, backends: Any, scripted: Callable[..., ScriptedBackend],
        word: str, kind: str, plain: int) -> None:
    s1 = _failing_server(kind, backends, scripted)
    s2 = backends.echo("s2")
    retry = {"retry-on": word, "redispatch": 1}
    cfg = lab_config({
        "retry": pair(s1.address, s2, **retry),
        "lenient": pair(s1.address, s2, **retry, **{"retry-non-idempotent": True}),
        "plain": pair(s1.address, s2, redispatch=1),  # retry-on: conn-failure (the default)
    })
    cfg["defaults"]["timeout"]["server"] = "300ms"
    lb = pylb(cfg)
    body = pattern_bytes(2000)
    slow = kind == "silent"

    # an idempotent request is replayed on s2
    start = time.monotonic()
    resp = ask(lb.port("retry"), "GET", "/retry-get")
    elapsed = time.monotonic() - start
    assert (resp.status, resp.json()["server"]) == (200, "s2"), resp
    if slow:
        assert elapsed >= 0.3 - EARLY, elapsed  # replayed once timeout server had passed

    # without the word in retry-on, the client gets s1's failure
    start = time.monotonic()
    resp = ask(lb.port("plain"), "GET", "/plain-get")
    elapsed = time.monotonic() - start
    assert resp.status == plain, resp
    if kind == "status":
        assert (resp.header("x-server"), resp.body) == ("s1", ScriptedBackend.STATUS_BODY)
    if slow:
        assert 0.3 - EARLY <= elapsed < 2.0, elapsed

    # a POST the server received whole may have been acted on: not replayed by default...
    resp = ask(lb.port("retry"), "POST", "/retry-post", body)
    assert resp.status == plain, resp
    # ... but with retry-non-idempotent it is, body intact
    resp = ask(lb.port("lenient"), "POST", "/lenient-post", body)
    desc = resp.json()
    assert (resp.status, desc["server"], desc["method"]) == (200, "s2", "POST")
    assert (desc["body_length"], desc["body_sha256"]) == (len(body), sha(body))

    assert s2_targets(s2) == ["/retry-get", "/lenient-post"]
    if isinstance(s1, ScriptedBackend):  # it tells what it received: each request whole
        for target in ("/retry-get", "/plain-get", "/retry-post", "/lenient-post"):
            [req] = s1.received(target)
            assert req.complete
        assert s1.received("/lenient-post")[0].sha.hexdigest() == sha(body)
    else:
        assert s1.heads == 4


# -- 7. http-request disable-l7-retry -------------------------------------------------------


@pytest.mark.parametrize(("kind", "failure"), [("close", 502), ("status", 503)])
def test_disable_l7_retry_rule_stops_replays_of_the_requests_it_matches(
        pylb: Any, backends: Any, scripted: Callable[..., ScriptedBackend],
        kind: str, failure: int) -> None:
    s1 = scripted(kind)
    s2 = backends.echo("s2")
    rule = ["disable-l7-retry if { method POST }"]
    lenient = {"retry-on": "empty-response 503", "retry-non-idempotent": True, "redispatch": 1}
    lb = pylb(lab_config(
        {"lenient": pair(s1.address, s2, **lenient),
         "dead": pair(f"{HOST}:{free_port()}", s2, redispatch=1)},  # nothing listens on s1
        {"guarded": {"default_backend": "lenient", "http-request": rule},
         "guarded-dead": {"default_backend": "dead", "http-request": rule}},
    ))
    body = pattern_bytes(2000)
    resp = ask(lb.port("guarded"), "POST", "/guarded-post", body)
    assert resp.status == failure, resp  # s1's failure: the rule forbids the replay
    resp = ask(lb.port("guarded"), "GET", "/guarded-get")
    assert (resp.status, resp.json()["server"]) == (200, "s2")  # the rule is for POST only
    resp = ask(lb.port("lenient"), "POST", "/open-post", body)  # the same backend, no rule
    assert (resp.status, resp.json()["body_sha256"]) == (200, sha(body))
    # a connection that could not be opened is retried all the same: the request never
    # reached a server
    resp = ask(lb.port("guarded-dead"), "POST", "/guarded-dead-post", body)
    assert (resp.status, resp.json()["body_sha256"]) == (200, sha(body))
    assert s2_targets(s2) == ["/guarded-get", "/open-post", "/guarded-dead-post"]
    for target in ("/guarded-post", "/guarded-get", "/open-post"):
        [req] = s1.received(target)
        assert req.complete


# -- 8. connection failures, retry-on none, turnaround, redispatch -------------------------


def test_connection_failures_retry_on_none_turnaround_and_redispatch(
        pylb: Any, backends: Any) -> None:
    s2 = backends.echo("s2")
    dead = f"{HOST}:{free_port()}"  # nothing listens there
    slow_turn = {"timeout": {"connect": "1s"}}  # a turnaround would take 1 s
    quick_turn = {"timeout": {"connect": "200ms"}}  # turnarounds of 200ms
    lb = pylb(lab_config({
        "none": pair(dead, s2, **{"retry-on": "none"}, redispatch=1, **slow_turn),
        "first": pair(dead, s2, redispatch=1, **slow_turn),
        # both active: roundrobin sends the first request to s1
        "eager": {"redispatch": True, "retries": 3, **slow_turn,
                  "servers": {"s1": {"address": dead}, "s2": {"address": s2.address}}},
        # a backup is not an active server's immediate stand-in: turnarounds, then the
        # last retry moves
        "backup": pair(dead, s2, redispatch=True, retries=3, **quick_turn),
        "stay": pair(dead, s2, redispatch=False, retries=2, **quick_turn),
        # uri hashing binds each request to s1 (the only active server), so the retries
        # stay there until the last one, which redispatch: true moves
        "last": pair(dead, s2, balance="uri", redispatch=True, retries=3, **quick_turn),
    }))

    def timed(frontend: str) -> tuple[Response, float]:
        start = time.monotonic()
        resp = ask(lb.port(frontend), "GET", f"/{frontend}")
        return resp, time.monotonic() - start

    resp, elapsed = timed("none")
    assert resp.status == 503, resp
    assert elapsed < 0.9, f"retry-on none still waited {elapsed:.2f}s"

    # redispatch 1: the first retry goes to another server, at once
    resp, elapsed = timed("first")
    assert (resp.status, resp.json()["server"]) == (200, "s2")
    assert elapsed < 0.9, f"a redispatch waited {elapsed:.2f}s"
    # redispatch true: a request nothing binds to s1 (roundrobin, no persistence) goes at
    # once to a server that has not failed it
    resp, elapsed = timed("eager")
    assert (resp.status, resp.json()["server"]) == (200, "s2")
    assert elapsed < 0.9, f"a redispatch waited {elapsed:.2f}s"

    # each retry on the same server comes after a turnaround of min(timeout connect, 1s):
    # 2 x 200ms here
    resp, elapsed = timed("stay")
    assert resp.status == 503, resp
    assert 0.4 - 2 * EARLY <= elapsed < 3.0, elapsed
    resp, elapsed = timed("last")
    assert (resp.status, resp.json()["server"]) == (200, "s2")
    assert 0.4 - 2 * EARLY <= elapsed < 3.0, elapsed
    resp, elapsed = timed("backup")
    assert (resp.status, resp.json()["server"]) == (200, "s2")
    assert 0.4 - 2 * EARLY <= elapsed < 3.0, elapsed
    assert s2_targets(s2) == ["/first", "/eager", "/last", "/backup"]


# -- 9. httpclose and http-server-close -----------------------------------------------------


def test_httpclose_and_http_server_close_on_frontends_and_backends(
        pylb: Any, scripted: Callable[..., ScriptedBackend]) -> None:
    # servers that answer 200 and would keep every connection: only pylb closes them
    names = ("be-close", "fe-close", "be-sc", "fe-sc")
    servers = {name: scripted("status", status=200, name=name) for name in names}

    def only(name: str, **options: Any) -> dict[str, Any]:
        return {**options, "servers": {name: {"address": servers[name].address}}}

    lb = pylb(lab_config(
        {"be-close": only("be-close", httpclose=True), "fe-close": only("fe-close"),
         "be-sc": only("be-sc", **{"http-server-close": True}), "fe-sc": only("fe-sc")},
        {"fe-close-front": {"default_backend": "fe-close", "httpclose": True},
         "fe-sc-front": {"default_backend": "fe-sc", "http-server-close": True}},
    ))
    keep = {"Connection": "keep-alive"}

    # httpclose: Connection: close both ways, one connection per request on each side
    for name, frontend in (("be-close", "be-close"), ("fe-close", "fe-close-front")):
        for i in range(3):
            with HttpConn(lb.port(frontend)) as conn:
                resp = conn.request("GET", f"/{name}/{i}", headers=keep)
                assert (resp.status, resp.header("x-server")) == (200, name)
                assert (resp.header("connection") or "").lower() == "close", resp
                assert conn.closed_by_peer(), f"{name}: the client connection stayed open"
        _assert_one_connection_per_request(servers[name], name, 3)

    # http-server-close: the client connection stays, the server's goes after each answer
    for name, frontend in (("be-sc", "be-sc"), ("fe-sc", "fe-sc-front")):
        with HttpConn(lb.port(frontend)) as conn:
            answers = [conn.request("GET", f"/{name}/{i}", headers=keep) for i in range(4)]
        assert [(a.status, a.header("x-server")) for a in answers] == [(200, name)] * 4
        assert all("close" not in (a.header("connection") or "").lower() for a in answers)
        _assert_one_connection_per_request(servers[name], name, 4)


def _assert_one_connection_per_request(server: ScriptedBackend, name: str, count: int) -> None:
    """The server saw `count` requests, each with `Connection: close`, each on a connection
    of its own (pylb closed it, as the server would have kept it)."""
    with server.lock:
        seen = list(server.requests)
    assert [r.target for r in seen] == [f"/{name}/{i}" for i in range(count)]
    assert [[v for n, v in r.headers if n.lower() == "connection"] for r in seen] == [
        ["close"]] * count
    assert sorted(r.conn for r in seen) == list(range(1, count + 1))
    assert server.connections == count


# -- 10. configuration errors -----------------------------------------------------------------

MINIMAL = """\
global:
  workers: 1
frontends:
  web:
    bind: 127.0.0.1:8080
    default_backend: app
backends:
  app:
    servers:
      s1:
        address: 127.0.0.1:9001
"""
RETRY_WORDS = ("none, all-retryable-errors, conn-failure, empty-response, junk-response, "
               "response-timeout, 0rtt-rejected or a status among "
               "401 403 404 408 425 500 501 502 503 504")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.loads(text, "t.cfg")
    return str(info.value)


def edit(old: str, new: str) -> str:
    assert old in MINIMAL
    return MINIMAL.replace(old, new, 1)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("  app:\n", "  app:\n    retry-on: conn-failure bogus\n",
     f"t.cfg:9: backends.app.retry-on: unknown retry-on word 'bogus' (expected retry-on "
     f"words: {RETRY_WORDS})"),
    ("  app:\n", "  app:\n    retry-on:\n      - 503\n      - 418\n",
     f"t.cfg:11: backends.app.retry-on: unknown retry-on word '418' (expected retry-on "
     f"words: {RETRY_WORDS})"),
    ("  app:\n", "  app:\n    retry-on: none 503\n",
     "t.cfg:9: backends.app.retry-on: retry-on none cannot be combined with other words"),
    ("  app:\n", "  app:\n    retry-on: ''\n",
     f"t.cfg:9: backends.app.retry-on: expected retry-on words: {RETRY_WORDS}, got nothing"),
    ("  app:\n", "  app:\n    redispatch: maybe\n",
     "t.cfg:9: backends.app.redispatch: expected true, false or a retry interval like 1 or "
     "-1, got 'maybe'"),
    ("  app:\n", "  app:\n    retry-buffer: lots\n",
     "t.cfg:9: backends.app.retry-buffer: expected a size like 16k or 1m, got 'lots'"),
    ("  workers: 1\n", "  workers: 1\n  spread-checks: 80\n",
     "t.cfg:3: global.spread-checks: expected an integer from 0 to 50, got 80"),
    ("        address: 127.0.0.1:9001\n", "        address: 127.0.0.1:9001\n"
     "        fastinter: fast\n",
     "t.cfg:12: backends.app.servers.s1.fastinter: expected a duration like 5s or 250ms, "
     "got 'fast'"),
    ("        address: 127.0.0.1:9001\n", "        address: 127.0.0.1:9001\n"
     "        downinter: 0s\n",
     "t.cfg:12: backends.app.servers.s1.downinter: expected a duration greater than 0, "
     "got '0s'"),
    ("    default_backend: app\n", "    default_backend: app\n"
     "    http-request: disable-l7-retry if\n",
     "t.cfg:7: frontends.web.http-request: if needs a condition"),
])
def test_configuration_errors(old: str, new: str, expected: str) -> None:
    assert error_of(edit(old, new)) == expected


def test_retry_settings_load() -> None:
    text = edit("  app:\n", "  app:\n    retry-on: [empty-response, 503 504, 503]\n"
                "    redispatch: -2\n    retry-buffer: 2m\n    retry-non-idempotent: true\n"
                "    httpclose: true\n")
    app = config.loads(text, "t.cfg").backends["app"]
    assert (app.retry_on, app.redispatch, app.retry_buffer) == (
        ("empty-response", 503, 504), -2, 2 * MB)
    assert (app.retry_non_idempotent, app.httpclose, app.http_server_close) == (
        True, True, False)
    words = {"all-retryable-errors": ("conn-failure", "empty-response", "junk-response",
                                      "response-timeout", "0rtt-rejected", 500, 502, 503, 504),
             "none": (), "conn-failure": ("conn-failure",)}
    for word, parsed in words.items():
        text = edit("  app:\n", f"  app:\n    retry-on: {word}\n")
        assert config.loads(text, "t.cfg").backends["app"].retry_on == parsed
    defaults = config.loads(MINIMAL, "t.cfg").backends["app"]
    assert (defaults.retries, defaults.redispatch, defaults.retry_on) == (3, 0, ("conn-failure",))
    assert (defaults.retry_buffer, defaults.retry_non_idempotent) == (16 * 1024, False)
    for written, interval in (("true", -1), ("false", 0), ("1", 1), ("-3", -3)):
        text = edit("  app:\n", f"  app:\n    redispatch: {written}\n")
        assert config.loads(text, "t.cfg").backends["app"].redispatch == interval


def test_check_mode_names_file_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cfg"
    bad.write_text(edit("  app:\n", "  app:\n    retries: 2\n    retry-on: conn-failure bogus\n"))
    done = subprocess.run([sys.executable, str(REPO / "bin" / "pylb"), "-c", "-f", "bad.cfg"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"bad.cfg:10: backends.app.retry-on: unknown retry-on word 'bogus' "
        f"(expected retry-on words: {RETRY_WORDS})")


# -- 11. without sockets: redispatch interval, check interval ---------------------------------


@pytest.mark.parametrize(("interval", "moves"), [
    (1, [True, True, True]),  # every retry
    (2, [False, True, False]),  # every second retry
    (-1, [False, False, True]),  # the last retry (redispatch: true)
    (-2, [False, True, False]),  # the retry before the last
    (0, [False, False, False]),  # never (redispatch: false)
])
def test_redispatch_interval_over_three_retries(interval: int, moves: list[bool]) -> None:
    # the retries leave 2, 1, then 0 retries
    assert [redispatch_now(interval, 3, left) for left in (2, 1, 0)] == moves


def test_redispatch_interval_edges_and_the_retry_policy() -> None:
    # further back than the first retry: every retry
    assert [redispatch_now(-5, 3, left) for left in (2, 1, 0)] == [True, True, True]
    # HAProxy's negative interval repeats: every (retries + 1 + N)th retry
    assert [redispatch_now(-4, 5, left) for left in (4, 3, 2, 1, 0)] == [
        False, True, False, True, False]
    assert [redispatch_now(-1, 1, 0), redispatch_now(1, 1, 0)] == [True, True]
    text = edit("  app:\n", "  app:\n    retries: 3\n    redispatch: -2\n"
                "    retry-on: empty-response 503\n    timeout: {connect: 300ms}\n")
    policy = RetryPolicy(config.loads(text, "t.cfg").backends["app"])
    assert [policy.moves(left) for left in (2, 1, 0)] == [False, True, False]
    assert policy.on == {"empty-response", 503} and policy.statuses == {503}
    assert policy.turnaround == pytest.approx(0.3)
    assert (policy.buffer, policy.non_idempotent) == (16 * 1024, False)
    assert policy.replays(b"GET", True) and policy.replays(b"PUT", True)
    assert policy.replays(b"POST", False)  # not received whole: cannot have been acted on
    assert not policy.replays(b"POST", True) and not policy.replays(b"PATCH", True)
    slow = RetryPolicy(config.loads(MINIMAL, "t.cfg").backends["app"])  # timeout connect 5s
    assert slow.turnaround == 1.0


def _server_check(*, hold: bool = False, spread: int = 0, **intervals: str) -> ServerCheck:
    extra = "".join(f", {key}: {value}" for key, value in intervals.items())
    cfg = config.loads(
        "frontends: {www: {bind: '127.0.0.1:1', default_backend: app}}\n"
        f"backends: {{app: {{hold-when-down: {str(hold).lower()}, servers: {{"
        f"s1: {{address: '127.0.0.1:1', check: true, rise: 2, fall: 3, inter: 2s{extra}}},"
        " s2: {address: '127.0.0.1:2'}}}}\n"
    )
    backend = cfg.backends["app"]
    return ServerCheck(backend, backend.servers[0], Shared.create(cfg), spread)


def _set(check: ServerCheck, server: str, field: int, value: int) -> None:
    check.shared.words[check.shared.layout.servers[("app", server)] + field] = value


def test_check_interval_follows_the_health_counter() -> None:
    check = _server_check(fastinter="500ms", downinter="5s")
    by_health = {}
    for health in range(5):  # rise 2 + fall 3 - 1 = 4 at the top
        check.health = health
        by_health[health] = check.interval()
    assert by_health == {4: 2.0, 3: 0.5, 2: 0.5, 1: 0.5, 0: 5.0}
    plain = _server_check()  # fastinter and downinter default to inter
    for health in range(5):
        plain.health = health
        assert plain.interval() == 2.0


def test_held_requests_want_down_servers_checked_at_fastinter() -> None:
    check = _server_check(hold=True, fastinter="500ms", downinter="5s")
    check.health = 0
    _set(check, "s1", SRV_OP, DOWN)
    assert check.interval() == 5.0  # s2 is still usable: nothing waits for s1
    _set(check, "s2", SRV_OP, DOWN)
    assert check.interval() == 0.5  # no usable server: held requests wait for one
    _set(check, "s2", SRV_OP, UP)
    _set(check, "s2", SRV_ADMIN, MAINT)
    assert check.interval() == 0.5  # in maintenance is not usable either
    hold = check.shared.layout.backends["app"] + BE_HOLD
    check.shared.words[hold] = 0  # set backend app hold-when-down off
    assert check.interval() == 5.0
    check.health = 4
    check.shared.words[hold] = 1
    assert check.interval() == 2.0  # the top of the counter is inter whatever else
    unheld = _server_check(fastinter="500ms", downinter="5s")
    unheld.health = 0
    _set(unheld, "s1", SRV_OP, DOWN)
    _set(unheld, "s2", SRV_OP, DOWN)
    assert unheld.interval() == 5.0  # no hold-when-down: downinter


@pytest.mark.parametrize("spread", [10, 50])
def test_spread_checks_jitters_within_its_percentage(
        monkeypatch: pytest.MonkeyPatch, spread: int) -> None:
    monkeypatch.setattr(lb_check, "random", random.Random(20240601))
    check = _server_check(spread=spread, fastinter="500ms")
    for health, base in ((4, 2.0), (2, 0.5)):
        check.health = health
        values = [check.interval() for _ in range(500)]
        low, high = base * (1 - spread / 100), base * (1 + spread / 100)
        assert all(low <= v <= high for v in values), (min(values), max(values))
        # spread both ways, over most of the range
        assert min(values) < base * (1 - spread / 200) and max(values) > base * (1 + spread / 200)
    assert _server_check().interval() == 2.0  # spread-checks 0: no jitter
