"""Replay llhttp's request framing corpus through pylb to a recording backend.

One pylb (one worker) and one raw backend serve every case. Each case first warms pylb's
server connection pool with one valid request, then uses a new client connection: send the
exact bytes, wait for the answer (or a short while), shut our write side, read until pylb
closes.

- reject: the backend saw at most ``complete_before_error`` whole requests, the same ones the
  client sent, and not one byte from the offending request on; the client got a 400 or a
  close.
- accept: pylb answered no 400 (every complete request got the backend's 200), and the
  backend saw every request head and every complete request, with the same method,
  target and body.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from backends import (
    HttpConn,
    RawBackend,
    RawRequest,
    free_port,
    parse_statuses,
    raw_delta,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus" / "llhttp-requests.json"

# llhttp's own harness counts two requests in this case, but under RFC 9112 the second
# "request" is only body bytes of the first (Content-Length: 123, 44 bytes follow): the
# stream holds one request head with a partial body and no complete request.
CL_RESET_TITLE = "Content-Length reset when no body is received"


def _load_cases() -> list[Any]:
    if not CORPUS.exists():
        return [pytest.param(-1, None, id="corpus-missing")]
    cases = json.loads(CORPUS.read_text())["cases"]
    return [pytest.param(i, case, id=f"{i:03d}-{case['expect']}-{case['title']}")
            for i, case in enumerate(cases)]


# ------------------------------------------------------------------------------------------
# RFC 9112 framing of the client's stream (used for valid streams and valid prefixes only)


@dataclass
class ClientRequest:
    method: str
    target: str
    body: bytes
    complete: bool


def _chunked_body(raw: bytes, pos: int) -> tuple[bytes, int, bool]:
    body = bytearray()
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            return bytes(body), len(raw), False
        size = int(raw[pos:eol].split(b";")[0].strip(), 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailer section up to the empty line
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    return bytes(body), len(raw), False
                line, pos = raw[pos:eol], eol + 2
                if not line:
                    return bytes(body), pos, True
        body += raw[pos:pos + size]
        if len(raw) < pos + size + 2:
            return bytes(body), len(raw), False
        pos += size + 2


def split_requests(raw: bytes, limit: int | None = None) -> list[ClientRequest]:
    """Requests with a complete head, in order; the last one may have a partial body."""
    out: list[ClientRequest] = []
    pos = 0
    while limit is None or len(out) < limit:
        while raw.startswith(b"\r\n", pos):  # empty lines before a request line are ignored
            pos += 2
        end = raw.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        lines = raw[pos:end].split(b"\r\n")
        method, target = lines[0].split(b" ")[:2]
        length, chunked = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value.strip(b" \t"))
            elif name.lower() == b"transfer-encoding":
                chunked = value.strip(b" \t").lower().endswith(b"chunked")
        pos = end + 4
        if method == b"CONNECT":  # llhttp: a CONNECT message ends with its head
            body, complete = b"", True
        elif chunked:
            body, pos, complete = _chunked_body(raw, pos)
        else:
            body = raw[pos:pos + length]
            pos += len(body)
            complete = len(body) == length
        out.append(ClientRequest(method.decode("latin-1"), target.decode("latin-1"),
                                 body, complete))
        if not complete:
            break
    return out


def same_target(sent: str, seen: str) -> bool:
    """pylb may forward an absolute-form target as is or in origin form."""
    if sent == seen:
        return True
    parts = urlsplit(sent)
    if not parts.scheme:
        return False
    origin = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return seen == origin


def describe(requests: list[RawRequest]) -> list[tuple[str, str, bytes]]:
    return [(r.method, r.target, r.body) for r in requests]


# ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    received: bytes
    closed: bool
    statuses: list[int]


@pytest.fixture(scope="module")
def corpus_env(pylb_module: Any, backends_module: Any) -> tuple[int, RawBackend]:
    raw = backends_module.raw()
    port = free_port()
    lb = pylb_module({
        "global": {"workers": 1},
        "defaults": {"mode": "http",
                     "timeout": {"connect": "2s", "client": "10s", "server": "5s",
                                 "http-request": "5s"}},
        "frontends": {"corpus": {"bind": f"127.0.0.1:{port}", "default_backend": "raw"}},
        "backends": {"raw": {"servers": {"r1": {"address": raw.address}}}},
    })
    return lb.port("corpus"), raw


def replay(port: int, raw: RawBackend, data: bytes,
           done: Callable[[bytes, bool], bool], wait: float, drain: float) -> Outcome:
    """Send ``data`` on a new connection; read until ``done`` or ``wait``; shut our write
    side; read until pylb closes or ``drain`` seconds pass."""
    received = bytearray()
    closed = False
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(data)

        def pump(seconds: float, until: Callable[[], bool]) -> None:
            nonlocal closed
            deadline = time.monotonic() + seconds
            while not closed and not until() and (left := deadline - time.monotonic()) > 0:
                sock.settimeout(min(left, 0.02))
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    closed = True
                received.extend(chunk)

        pump(wait, lambda: done(bytes(received), closed))
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            closed = True
        pump(drain, lambda: False)
    finally:
        sock.close()
    wait_until(lambda: raw.quiet_for(0.05), 1.0)
    return Outcome(bytes(received), closed, parse_statuses(bytes(received)))


def warm_pool(port: int) -> None:
    """One valid request first, so every case meets pylb with an idle pooled server
    connection (the state of a busy proxy; forwarding is then immediate)."""
    with HttpConn(port) as c:
        assert c.request("GET", "/warm-up").status == 200


@pytest.mark.parametrize(("index", "case"), _load_cases())
def test_corpus_case(index: int, case: dict[str, Any] | None,
                     corpus_env: tuple[int, RawBackend],
                     corpus_summary: dict[str, dict[str, bool]]) -> None:
    if case is None:
        pytest.fail(f"corpus file missing: {CORPUS}")
    port, raw = corpus_env
    data = base64.b64decode(case["raw_b64"])
    title, cbe, kind = case["title"], case["complete_before_error"], case["expect"]
    key = f"{index:03d} {title}"
    corpus_summary[kind][key] = False
    warm_pool(port)
    before = raw.snapshot()

    if kind == "reject":
        out = replay(port, raw, data,
                     lambda got, closed: closed or 400 in parse_statuses(got),
                     wait=0.5, drain=2.0)
        delta = raw_delta(raw, before)
        sent = split_requests(data, limit=cbe)
        assert delta.completes <= cbe, f"backend saw {delta.completes} whole requests"
        assert delta.extra == 0 and delta.heads == delta.completes, (
            f"backend got bytes of the offending request: {delta.bytes_seen!r}")
        assert delta.errors == [], f"backend could not parse: {delta.errors}"
        expected = [(r.method, r.target, r.body) for r in sent[:delta.completes]]
        seen = describe([r for r in delta.requests if r.complete])
        assert [(m, b) for m, _, b in seen] == [(m, b) for m, _, b in expected]
        assert all(same_target(e[1], s[1]) for e, s in zip(expected, seen, strict=True)), seen
        assert out.closed or 400 in out.statuses, (
            f"client got neither a 400 nor a close: {out.received!r}")
    else:
        sent = split_requests(data)
        complete = [r for r in sent if r.complete]
        assert len(complete) == (0 if title == CL_RESET_TITLE else cbe), "corpus framing"

        def answered(got: bytes, closed: bool) -> bool:
            if closed or 400 in parse_statuses(got):
                return True
            d = raw_delta(raw, before)
            return d.heads >= len(sent) and len(parse_statuses(got)) >= len(complete)

        out = replay(port, raw, data, answered, wait=3.0, drain=1.0)
        delta = raw_delta(raw, before)
        assert 400 not in out.statuses, f"pylb refused a valid stream: {out.received!r}"
        assert out.statuses == [200] * len(complete), f"client got {out.received!r}"
        assert delta.errors == [], f"backend could not parse: {delta.errors}"
        assert delta.heads == len(sent), f"backend saw {delta.heads} of {len(sent)} heads"
        assert delta.completes == len(complete), (
            f"backend saw {delta.completes} of {len(complete)} whole requests")
        seen = [r for r in delta.requests if r.method]  # requests whose head arrived
        assert [(r.method, r.complete) for r in seen] == [(r.method, r.complete) for r in sent]
        for s, r in zip(sent, seen, strict=True):
            assert same_target(s.target, r.target), (s.target, r.target)
            if s.complete:
                assert r.body == s.body
            else:
                assert s.body.startswith(r.body), (s.body, r.body)
    corpus_summary[kind][key] = True
