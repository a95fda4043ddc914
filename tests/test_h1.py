"""lb.h1 on its own: bytes in, events and forwarded heads out, no sockets.

The per-request path of lb.h1 is written for speed; these pin what it must still do: the
same events whatever way the bytes are split, hop-by-hop headers replaced, the framing
pylb forwards, and the heads it writes. Every test runs on the module as built (compiled,
see setup.py) and on lb/h1.py itself.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

import lb.h1

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus" / "llhttp-requests.json"


def _from_source() -> ModuleType:
    spec = importlib.util.spec_from_file_location("h1_from_source", REPO / "lb" / "h1.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMPLEMENTATIONS = {"as-built": lb.h1, "python": _from_source()}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def h1(request: pytest.FixtureRequest) -> ModuleType:
    return IMPLEMENTATIONS[request.param]


def feed_all(reader: lb.h1._Reader, data: bytes, step: int = 0) -> list[tuple[int, object]]:
    """Events for `data` fed at once (step 0) or `step` bytes at a time."""
    if not step:
        return reader.feed(data)
    events: list[tuple[int, object]] = []
    for start in range(0, len(data), step):
        piece = data[start : start + step]
        if reader.upgraded:  # what follows is the tunnel's (lb.httpproxy keeps it so)
            kind, value = events[-1]
            events[-1] = (kind, value + piece)  # type: ignore[operator]
        else:
            events += reader.feed(piece)
    return events


def summary(events: list[tuple[int, object]], h1: ModuleType) -> list[tuple[object, ...]]:
    """Events as comparable values: heads by what pylb forwards of them; data joined."""
    out: list[tuple[object, ...]] = []
    for kind, value in events:
        if kind == h1.HEAD and type(value).__name__ == "RequestHead":
            out.append(("REQ", value.method, value.target, value.version, value.keep_alive,
                        value.framing, value.length, value.upgrade, value.expect_continue,
                        h1.request_head_bytes(value, b"10.0.0.1")))
        elif kind == h1.HEAD:
            out.append(("RESP", value.status, value.reason, value.keep_alive,
                        value.framing, value.length,
                        h1.response_head_bytes(value, value.framing, value.keep_alive, "1.1")))
        elif kind == h1.DATA:
            if out and out[-1][0] == "DATA":
                out[-1] = ("DATA", out[-1][1] + value)  # type: ignore[operator]
            else:
                out.append(("DATA", value))
        elif kind == h1.ERROR:
            out.append(("ERROR",))
        else:
            out.append((kind, value))
    return out


REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"
    b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n"
    b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: x\r\nX-Other: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nx-forwarded-for: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n",
    b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nrest",
    b"GET / HTTP/1.1\r\nHost: a\r\nCONTENT-LENGTH: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1; SRV=s1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost a\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"DESCRIBE rtsp://x RTSP/1.0\r\nCSeq: 1\r\n\r\n",
]

RESPONSES = [
    (b"GET", b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 6\r\n"
             b"Connection: keep-alive\r\n\r\nhello\n"),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close"),
    (b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    (b"GET", b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    (b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"),
    (b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\n\r\nframes"),
    (b"GET", b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
             b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n"),
    (b"GET", b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
    (b"GET", b"HTTX/1.1 200 OK\r\n\r\n"),
]


@pytest.mark.parametrize("data", REQUESTS, ids=range(len(REQUESTS)))
def test_request_events_do_not_depend_on_how_bytes_are_split(h1: ModuleType, data: bytes) -> None:
    whole = summary(feed_all(h1.RequestReader(), data), h1)
    for step in (1, 2, 7):
        assert summary(feed_all(h1.RequestReader(), data, step), h1) == whole, step


@pytest.mark.parametrize(("method", "data"), RESPONSES, ids=range(len(RESPONSES)))
def test_response_events_do_not_depend_on_how_bytes_are_split(
    h1: ModuleType, method: bytes, data: bytes
) -> None:
    def read(step: int) -> list[tuple[object, ...]]:
        reader = h1.ResponseReader()
        reader.expect(method)
        return summary(feed_all(reader, data, step), h1)

    whole = read(0)
    for step in (1, 3, 11):
        assert read(step) == whole, step


def test_a_plain_request_is_forwarded_as_sent_with_the_client_appended(h1: ModuleType) -> None:
    [(kind, head), (end, _)] = h1.RequestReader().feed(REQUESTS[0])
    assert (kind, end) == (h1.HEAD, h1.END)
    assert h1.request_head_bytes(head, b"10.0.0.1") == (  # type: ignore[arg-type]
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
    )
    assert h1.request_head_bytes(head) == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"  # type: ignore[arg-type]


def test_an_http_1_0_request_without_host_goes_on_as_http_1_0(h1: ModuleType) -> None:
    """HTTP/1.1 needs a Host: without one, the request is not upgraded (as in HAProxy)."""
    [(_, head), _] = h1.RequestReader().feed(b"GET /x HTTP/1.0\r\nAccept: */*\r\n\r\n")
    assert h1.request_head_bytes(head) == (  # type: ignore[arg-type]
        b"GET /x HTTP/1.0\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n"
    )
    assert h1.request_head_bytes(head, close=True) == (  # type: ignore[arg-type]
        b"GET /x HTTP/1.0\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    [(_, head), _] = h1.RequestReader().feed(b"GET /x HTTP/1.0\r\nhost: a\r\n\r\n")
    assert h1.request_head_bytes(head) == b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n"  # type: ignore[arg-type]


def test_hop_by_hop_headers_and_those_connection_names_are_not_forwarded(h1: ModuleType) -> None:
    [(_, head), _] = h1.RequestReader().feed(REQUESTS[7])
    assert h1.request_head_bytes(head, close=True) == (  # type: ignore[arg-type]
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Other: 2\r\nConnection: close\r\n\r\n"
    )
    assert head.header(b"x-other") == b"2"  # type: ignore[attr-defined]
    assert head.header(b"connection") == b"keep-alive, X-Private"  # type: ignore[attr-defined]
    assert head.header(b"x-absent") is None  # type: ignore[attr-defined]


def test_forwarded_for_is_appended_to_the_last_one(h1: ModuleType) -> None:
    [(_, head), _] = h1.RequestReader().feed(REQUESTS[9])
    assert h1.request_head_bytes(head, b"9.9.9.9") == (  # type: ignore[arg-type]
        b"GET / HTTP/1.1\r\nHost: a\r\nx-forwarded-for: 1.2.3.4\r\n"
        b"X-Forwarded-For: 5.6.7.8, 9.9.9.9\r\n\r\n"
    )


def test_framing_of_bodies(h1: ModuleType) -> None:
    [(_, head), (data, body), (end, _)] = h1.RequestReader().feed(REQUESTS[2])
    assert (head.framing, head.length, body, end) == (h1.LENGTH, 5, b"hello", h1.END)  # type: ignore[attr-defined]
    events = h1.RequestReader().feed(REQUESTS[3])
    head = events[0][1]
    assert head.framing == h1.CHUNKED  # type: ignore[attr-defined]
    assert b"".join(v for k, v in events if k == h1.DATA) == b"abcde"  # type: ignore[misc]
    assert h1.request_head_bytes(head).endswith(b"Transfer-Encoding: chunked\r\n\r\n")  # type: ignore[arg-type]
    assert summary(h1.RequestReader().feed(REQUESTS[15]), h1)[-1] == ("ERROR",)  # two lengths
    assert summary(h1.RequestReader().feed(REQUESTS[16]), h1)[-1] == ("ERROR",)  # not chunked


def test_a_closing_request_stops_the_reader(h1: ModuleType) -> None:
    reader = h1.RequestReader()
    events = reader.feed(REQUESTS[4])
    assert [k for k, _ in events] == [h1.HEAD, h1.END]
    assert reader.closed and reader.feed(b"GET / HTTP/1.1\r\n\r\n") == []


def test_upgrade_keeps_the_bytes_after_the_head(h1: ModuleType) -> None:
    reader = h1.RequestReader()
    events = reader.feed(REQUESTS[11])
    assert events[0][1].upgrade and events[-1] == (h1.UPGRADE, b"rest")  # type: ignore[attr-defined]
    assert b"Upgrade: websocket\r\nConnection: upgrade\r\n" in h1.request_head_bytes(events[0][1])  # type: ignore[arg-type]


def test_heads_too_large_are_refused(h1: ModuleType) -> None:
    reader = h1.RequestReader(max_head=100)
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 200 + b"\r\n\r\n"
    assert summary(reader.feed(big), h1) == [("ERROR",)]
    reader = h1.RequestReader(max_head=100)
    assert summary(feed_all(reader, big, 10), h1)[-1] == ("ERROR",)
    response = h1.ResponseReader(max_head=100)
    response.expect(b"GET")
    assert summary(response.feed(b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 200 + b"\r\n\r\n"), h1) == [
        ("ERROR",)
    ]


def test_response_heads_as_forwarded(h1: ModuleType) -> None:
    reader = h1.ResponseReader()
    reader.expect(b"GET")
    [(_, head), (_, body), _] = reader.feed(RESPONSES[0][1])
    assert body == b"hello\n"
    assert h1.response_head_bytes(head, h1.LENGTH, True, "1.1") == (  # type: ignore[arg-type]
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 6\r\n\r\n"
    )
    assert h1.response_head_bytes(head, h1.LENGTH, False, "1.0") == (  # type: ignore[arg-type]
        b"HTTP/1.0 200 OK\r\nServer: nginx\r\nContent-Length: 6\r\nConnection: close\r\n\r\n"
    )
    reader = h1.ResponseReader()
    reader.expect(b"GET")
    head = reader.feed(RESPONSES[10][1])[0][1]
    assert h1.response_head_bytes(head, h1.LENGTH, True, "1.1") == (  # type: ignore[arg-type]
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n"
    )
    assert not head.keep_alive  # type: ignore[attr-defined]


def test_a_head_response_keeps_its_length_and_the_connection_goes_on(h1: ModuleType) -> None:
    reader = h1.ResponseReader()
    reader.expect(b"HEAD")
    events = reader.feed(RESPONSES[6][1])
    head = events[0][1]
    assert [k for k, _ in events] == [h1.HEAD, h1.END]
    assert h1.response_head_bytes(head, head.framing, True, "1.1") == (  # type: ignore[arg-type, attr-defined]
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    )
    reader.expect(b"GET")
    assert [k for k, _ in reader.feed(RESPONSES[0][1])] == [h1.HEAD, h1.DATA, h1.END]


def _corpus() -> list[dict[str, object]]:
    if not CORPUS.exists():
        return []
    return json.loads(CORPUS.read_text())["cases"]  # type: ignore[no-any-return]


@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared")
def test_llhttp_corpus_refusals_do_not_depend_on_how_bytes_are_split(h1: ModuleType) -> None:
    """Every case of the corpus gives the same events fed at once or a byte at a time,
    and the cases to refuse end in an error (or never complete a request)."""
    import base64

    for case in _corpus():
        data = base64.b64decode(case["raw_b64"])  # type: ignore[arg-type]
        whole = summary(feed_all(h1.RequestReader(), data), h1)
        assert summary(feed_all(h1.RequestReader(), data, 1), h1) == whole, case["title"]
        if case["expect"] == "reject":
            complete = sum(1 for event in whole if event[0] == h1.END)
            assert complete <= case["complete_before_error"], case["title"]  # type: ignore[operator]
