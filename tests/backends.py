"""Test servers (backends behind pylb) and a small blocking HTTP client.

Every server runs on 127.0.0.1 on its own asyncio loop in a daemon thread:

- EchoBackend: HTTP/1.1 server answering every request with a JSON description of what it
  received. Behaviour per request through the query string: ``delay`` (seconds before
  answering), ``size`` (stream that many pattern bytes instead of JSON), ``chunked=1``
  (send the response chunked), ``events=N`` (Server-Sent Events: ``data: 0`` to
  ``data: N-1``, one chunk each, ``every`` seconds apart), ``status``, ``setcookie``
  (``NAME=VALUE...``: a ``Set-Cookie`` header in the response). A request with
  ``Upgrade: websocket`` gets a ``101`` and the connection becomes a byte echo (the
  server first sends ``WS_GREETING``).
- RawBackend: records every byte of every connection, parses it one byte at a time with
  httptools (so it knows exactly where each request ends) and answers each complete
  request with a tiny 200 (405 for CONNECT, so that no tunnel is ever legitimate).
- BadBackend: scripted misbehaviour after a request head: close, garbage, bad-cl, silent.
- ScriptedBackend: misbehaviour after reading a request (whole, or its head and part of its
  body): reset, close, a cut-short answer, or a chosen status; records what it received.
- TcpBackend: plain TCP modes echo, source, sink, eof-first.

The client side (HttpConn, parse_statuses) uses its own small parser, independent of the
httptools/llhttp parser pylb itself uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools
import psutil

HOST = "127.0.0.1"
WS_GREETING = b"ws-ready\n"
TCP_BANNER = b"HELLO\n"

_BLOCK = random.Random(20240601).randbytes(65536)
_BLOCK2 = _BLOCK * 2


def workers_of(master: int) -> list[Any]:
    """The worker processes of the pylb master `master` (psutil.Process): its children
    less its worker template (lb.template), which serves no client."""
    try:
        children = psutil.Process(master).children()
    except psutil.NoSuchProcess:
        return []
    return [child for child in children if not _is_template(child)]


def template_of(master: int) -> Any:
    """The worker template of the pylb master `master` (psutil.Process), or None."""
    try:
        children = psutil.Process(master).children()
    except psutil.NoSuchProcess:
        return None
    return next((child for child in children if _is_template(child)), None)


def _is_template(process: Any) -> bool:
    try:
        return "pylb: worker template" in " ".join(process.cmdline())
    except psutil.Error:
        return False


_GIVEN: set[int] = set()  # ports free_port returned: not returned twice by one test run


def stats_command(path: str | os.PathLike[str], line: str, timeout: float = 5.0) -> str:
    """One command on a stats socket, and its whole answer (the socket closes after it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(line.encode() + b"\n")
        out = bytearray()
        while data := sock.recv(65536):
            out += data
    return out.decode()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that this process
    has not been given before (the kernel may hand the same free port to two calls, and a
    test binding both would fail)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def pattern_chunks(size: int, chunk: int = 65536) -> Iterator[bytes]:
    """The first ``size`` bytes of an endless deterministic pseudo-random stream, in pieces
    of at most ``chunk`` bytes (the stream does not depend on ``chunk``)."""
    block = len(_BLOCK)
    sent = 0
    while sent < size:
        start = sent % block
        n = min(chunk, size - sent, block)
        yield _BLOCK2[start:start + n]
        sent += n


def pattern_bytes(size: int) -> bytes:
    return b"".join(pattern_chunks(size))


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    for piece in pattern_chunks(size):
        h.update(piece)
    return h.hexdigest()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(interval)
    return True


# --------------------------------------------------------------------------------------------
# server plumbing


class _LoopThread:
    """An asyncio loop in a daemon thread serving one listening socket."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _start(self, factory: Callable[[], Any]) -> None:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(factory(), self.loop)
        self._server = fut.result(timeout=5)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.loop.close()


def _stream_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
) -> Callable[[], Any]:
    async def quiet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:  # server stopping
            writer.close()

    async def start() -> asyncio.AbstractServer:
        return await asyncio.start_server(quiet, HOST, 0, limit=1 << 20)

    return start


# --------------------------------------------------------------------------------------------
# echo HTTP backend


@dataclass
class EchoRequest:
    method: str = ""
    target: str = ""
    version: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body_length: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    keep_alive: bool = True
    upgrade: bool = False

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def describe(self, server: str, conn: int, seq: int) -> dict[str, Any]:
        return {
            "server": server,
            "conn": conn,
            "seq": seq,
            "method": self.method,
            "target": self.target,
            "version": self.version,
            "headers": [[n, v] for n, v in self.headers],
            "body_length": self.body_length,
            "body_sha256": self.sha.hexdigest(),
        }


class _EchoParser:
    """httptools callbacks for one connection; finished requests go to ``on_request``."""

    def __init__(self, on_headers: Callable[[EchoRequest], None],
                 on_request: Callable[[EchoRequest], None]) -> None:
        self.on_headers_cb = on_headers
        self.on_request_cb = on_request
        self.parser = httptools.HttpRequestParser(self)
        self.current = EchoRequest()
        self._url = b""

    def on_message_begin(self) -> None:
        self.current = EchoRequest()
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        req = self.current
        req.method = self.parser.get_method().decode("latin-1")
        req.target = self._url.decode("latin-1")
        req.version = self.parser.get_http_version()
        req.keep_alive = bool(self.parser.should_keep_alive())
        req.upgrade = (req.header("upgrade") or "").lower() == "websocket"
        self.on_headers_cb(req)

    def on_body(self, body: bytes) -> None:
        self.current.body_length += len(body)
        self.current.sha.update(body)

    def on_message_complete(self) -> None:
        self.on_request_cb(self.current)


class EchoBackend(_LoopThread):
    """HTTP/1.1 echo server; see the module docstring for the per-request options."""

    def __init__(self, name: str = "echo", *, read_delay: float = 0.0,
                 send_continue: bool = True) -> None:
        super().__init__(name)
        self.read_delay = read_delay
        self.send_continue = send_continue
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        self._start(_stream_server(self._serve))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
            conn_id = self.connections
        queue: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()
        stall = False
        tunnel = False

        def on_headers(req: EchoRequest) -> None:
            nonlocal stall
            if self.read_delay:
                stall = True
            if self.send_continue and (req.header("expect") or "").lower() == "100-continue":
                queue.put_nowait(("raw", b"HTTP/1.1 100 Continue\r\n\r\n"))

        parser = _EchoParser(on_headers, lambda req: queue.put_nowait(("request", req)))
        answering = asyncio.create_task(self._answer_loop(queue, writer, conn_id))
        try:
            while not answering.done():
                data = await reader.read(262144)
                if not data:
                    break
                if tunnel:
                    queue.put_nowait(("raw", data))
                    continue
                try:
                    parser.parser.feed_data(data)
                except httptools.HttpParserUpgrade as exc:
                    rest = data[exc.args[0]:]
                    if parser.current.upgrade:
                        tunnel = True
                        if rest:
                            queue.put_nowait(("raw", rest))
                    else:  # not a protocol we speak: keep parsing HTTP
                        parser = _EchoParser(on_headers, parser.on_request_cb)
                        parser.parser.feed_data(rest)
                except httptools.HttpParserError:
                    queue.put_nowait(("raw", b"HTTP/1.1 400 Bad Request\r\n"
                                             b"Content-Length: 0\r\nConnection: close\r\n\r\n"))
                    break
                if stall:
                    stall = False
                    await asyncio.sleep(self.read_delay)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await answering
            writer.close()

    async def _answer_loop(self, queue: asyncio.Queue[tuple[str, Any] | None],
                           writer: asyncio.StreamWriter, conn_id: int) -> None:
        seq = 0
        while (item := await queue.get()) is not None:
            kind, value = item
            if kind == "raw":
                writer.write(value)
                await writer.drain()
                continue
            req: EchoRequest = value
            seq += 1
            desc = req.describe(self.name, conn_id, seq)
            with self.lock:
                self.requests.append(desc)
            if req.upgrade:
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n\r\n" + WS_GREETING)
                await writer.drain()
                continue
            keep = await self._respond(req, desc, writer)
            if not keep:
                return

    async def _respond(self, req: EchoRequest, desc: dict[str, Any],
                       writer: asyncio.StreamWriter) -> bool:
        query = {k: v[-1] for k, v in parse_qs(urlsplit(req.target).query).items()}
        if "delay" in query:
            await asyncio.sleep(float(query["delay"]))
        status = int(query.get("status", "200"))
        head = [f"HTTP/1.1 {status} X", f"X-Server: {self.name}"]
        if "setcookie" in query:
            head.append(f"Set-Cookie: {query['setcookie']}")
        if not req.keep_alive:
            head.append("Connection: close")
        if "events" in query:  # Server-Sent Events: `data: N` every `every` seconds, chunked
            head += ["Content-Type: text/event-stream", "Transfer-Encoding: chunked"]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            for number in range(int(query["events"])):
                event = b"data: %d\n\n" % number
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(float(query.get("every", "0.01")))
            writer.write(b"0\r\n\r\n")
        elif "size" in query:
            size = int(query["size"])
            chunked = query.get("chunked") == "1"
            head.append("Content-Type: application/octet-stream")
            head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            if req.method != "HEAD":
                for piece in pattern_chunks(size, 50000):
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    await writer.drain()
                if chunked:
                    writer.write(b"0\r\n\r\n")
        else:
            body = json.dumps(desc).encode()
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            if req.method != "HEAD":
                writer.write(body)
        await writer.drain()
        return req.keep_alive


# --------------------------------------------------------------------------------------------
# raw recording HTTP backend (corpus)


@dataclass
class RawRequest:
    method: str = ""
    target: str = ""
    body: bytes = b""
    complete: bool = False


@dataclass
class RawConn:
    """What one connection received, with exact request boundaries."""

    cid: int
    data: bytearray = field(default_factory=bytearray)
    requests: list[RawRequest] = field(default_factory=list)
    heads: int = 0
    completes: int = 0
    complete_end: int = 0  # offset just after the last complete request
    errors: list[str] = field(default_factory=list)

    @property
    def extra(self) -> int:
        """Bytes received after the end of the last complete request."""
        return len(self.data) - self.complete_end


class _RawProtocol(asyncio.Protocol):
    def __init__(self, backend: RawBackend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.conn = RawConn(cid=0)
        self.parser = httptools.HttpRequestParser(self)
        self.req = RawRequest()
        self.url = b""
        self.content_length = 0
        self.keep_alive = True
        self.upgrade_body = 0  # body bytes of an upgrade request llhttp hands over raw
        self.offset = 0

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.req = RawRequest()
        self.url = b""
        self.content_length = 0
        self.conn.requests.append(self.req)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-length" and value.strip().isdigit():
            self.content_length = int(value.strip())

    def on_headers_complete(self) -> None:
        self.req.method = self.parser.get_method().decode("latin-1")
        self.req.target = self.url.decode("latin-1")
        self.keep_alive = bool(self.parser.should_keep_alive())
        self.conn.heads += 1

    def on_body(self, body: bytes) -> None:
        self.req.body += body

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade() and self.req.method != "CONNECT" and self.content_length:
            # llhttp stops at an Upgrade head and hands the body over as raw bytes. We never
            # switch protocols, so the request still owns its Content-Length body (llhttp's
            # own "Emitting part of body and pausing" semantics): read it before completing.
            self.upgrade_body = self.content_length
            return
        self._complete(self.offset + 1)

    def _complete(self, end: int) -> None:
        self.req.complete = True
        self.conn.completes += 1
        self.conn.complete_end = end
        assert self.transport is not None
        status = b"405 Method Not Allowed" if self.req.method == "CONNECT" else b"200 OK"
        keep = self.keep_alive
        self.transport.write(b"HTTP/1.1 %s\r\nContent-Length: 0\r\n%s\r\n"
                             % (status, b"" if keep else b"Connection: close\r\n"))
        if not keep:  # like any server: a non-persistent request ends the connection
            self.transport.close()

    # asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        with self.backend.lock:
            self.conn.cid = len(self.backend.conns) + 1
            self.backend.conns.append(self.conn)

    def data_received(self, data: bytes) -> None:
        with self.backend.lock:
            for i in range(len(data)):
                self._feed_byte(data[i:i + 1])
            self.backend.last_event = time.monotonic()

    def _feed_byte(self, byte: bytes) -> None:
        self.offset = len(self.conn.data)
        self.conn.data += byte
        assert self.transport is not None
        if self.transport.is_closing():  # recorded (as extra bytes), never parsed
            return
        if self.upgrade_body:
            self.req.body += byte
            self.upgrade_body -= 1
            if not self.upgrade_body:
                self._complete(self.offset + 1)
            return
        try:
            self.parser.feed_data(byte)
        except httptools.HttpParserUpgrade:
            # An Upgrade or CONNECT head: we answer without switching, the connection stays
            # HTTP, so parse what follows as a new request.
            self.parser = httptools.HttpRequestParser(self)
        except httptools.HttpParserError as exc:
            self.conn.errors.append(f"{type(exc).__name__}: {exc}")
            self.transport.close()


class RawBackend(_LoopThread):
    """Records bytes per connection; ``snapshot`` and ``raw_delta`` give per-case accounting."""

    def __init__(self, name: str = "raw") -> None:
        super().__init__(name)
        self.conns: list[RawConn] = []
        self.last_event = time.monotonic()

        async def start() -> asyncio.AbstractServer:
            return await self.loop.create_server(lambda: _RawProtocol(self), HOST, 0)

        self._start(start)

    def snapshot(self) -> dict[int, tuple[int, int, int, int]]:
        with self.lock:
            return {c.cid: (len(c.data), c.heads, c.completes, len(c.requests))
                    for c in self.conns}

    def quiet_for(self, seconds: float) -> bool:
        return time.monotonic() - self.last_event >= seconds


@dataclass
class RawDelta:
    """What the raw backend received between two snapshots."""

    heads: int
    completes: int
    extra: int
    requests: list[RawRequest]
    errors: list[str]
    bytes_seen: bytes


def raw_delta(backend: RawBackend, before: dict[int, tuple[int, int, int, int]]) -> RawDelta:
    heads = completes = extra = 0
    requests: list[RawRequest] = []
    errors: list[str] = []
    seen = bytearray()
    with backend.lock:
        for c in backend.conns:
            nbytes, nheads, ncompletes, nreqs = before.get(c.cid, (0, 0, 0, 0))
            if len(c.data) == nbytes:
                continue
            seen += c.data[nbytes:]
            heads += c.heads - nheads
            completes += c.completes - ncompletes
            extra += c.extra
            requests += c.requests[nreqs:]
            errors += c.errors
    return RawDelta(heads, completes, extra, requests, errors, bytes(seen))


# --------------------------------------------------------------------------------------------
# misbehaving HTTP backend


class BadBackend(_LoopThread):
    """After each request head: ``close`` (no answer), ``garbage`` (not HTTP), ``bad-cl``
    (invalid Content-Length) or ``silent`` (never answers)."""

    ANSWERS = {
        "garbage": b"SSH-2.0-OpenSSH_9.2\r\nthis is not http\r\n\r\n",
        "bad-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\nhello",
    }

    def __init__(self, mode: str) -> None:
        assert mode in ("close", "garbage", "bad-cl", "silent"), mode
        super().__init__(f"bad-{mode}")
        self.mode = mode
        self.connections = 0
        self.heads = 0
        self._start(_stream_server(self._serve))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            with self.lock:
                self.heads += 1
            if self.mode != "close":
                writer.write(self.ANSWERS.get(self.mode, b""))
                await writer.drain()
                while await reader.read(65536):  # hold the connection until pylb drops it
                    pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@dataclass
class ScriptedRequest:
    """What a ScriptedBackend received of one request."""

    conn: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    length: int  # the Content-Length it announced (0 without one)
    body_length: int = 0  # body bytes received
    sha: Any = field(default_factory=hashlib.sha256)

    @property
    def complete(self) -> bool:
        return self.body_length == self.length

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None


class ScriptedBackend(_LoopThread):
    """An HTTP server that fails on purpose once it has read a request (Content-Length
    bodies only), one mode for all its connections:

    - ``reset``: reads the head and ``reset_after`` body bytes (all of a smaller body), then
      resets the connection (SO_LINGER 0 close) without a byte of answer;
    - ``close``: reads the whole request, then closes without a byte of answer;
    - ``partial``: reads the whole request, answers a head announcing PARTIAL_LENGTH body
      bytes and only the first PARTIAL_SENT of them, waits for ``release()``, then resets.
      With ``chunked``: a chunked answer whose first chunk has PARTIAL_SENT bytes, and
      after ``release()`` a chunk size that is not one (junk), then nothing until EOF;
    - ``status``: reads the whole request and answers it in full with ``status`` and the
      body ``STATUS_BODY``, keeping the connection for the next one.

    With ``interim``, a request head with ``Expect: 100-continue`` gets a ``100 Continue``
    before its body is read. ``requests`` records every request as it arrives (its body
    counted as it is read).
    """

    MODES = ("reset", "close", "partial", "status")
    PARTIAL_LENGTH = 1000
    PARTIAL_SENT = 100
    STATUS_BODY = b"scripted answer\n"

    def __init__(self, mode: str, *, reset_after: int = 0, status: int = 503,
                 chunked: bool = False, interim: bool = False, name: str = "s1") -> None:
        assert mode in self.MODES, mode
        super().__init__(f"scripted-{mode}")
        self.server_name = name
        self.mode = mode
        self.chunked = chunked
        self.interim = interim
        self.reset_after = reset_after
        self.status = status
        self.connections = 0
        self.requests: list[ScriptedRequest] = []
        self._releases: asyncio.Semaphore | None = None
        self._start(self._make_server)

    async def _make_server(self) -> asyncio.AbstractServer:
        self._releases = asyncio.Semaphore(0)
        return await _stream_server(self._serve)()

    def release(self) -> None:
        """Lets one ``partial`` answer end (in a reset)."""
        assert self._releases is not None
        self.loop.call_soon_threadsafe(self._releases.release)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
            conn = self.connections
        try:
            while True:
                req = await self._read_head(reader, conn)
                if req is None:
                    return
                if self.interim and (req.header("expect") or "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                want = min(req.length, self.reset_after) if self.mode == "reset" else req.length
                while req.body_length < want:
                    data = await reader.read(min(want - req.body_length, 65536))
                    if not data:
                        return
                    with self.lock:
                        req.sha.update(data)
                        req.body_length += len(data)
                if self.mode == "reset":
                    _reset(writer)
                    return
                if self.mode == "close":
                    return
                if self.mode == "partial":
                    await self._partial(reader, writer)
                    return
                writer.write(b"HTTP/1.1 %d Scripted\r\nX-Server: %s\r\nContent-Length: %d\r\n"
                             b"\r\n%s" % (self.status, self.server_name.encode(),
                                          len(self.STATUS_BODY), self.STATUS_BODY))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _partial(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        part = b"p" * self.PARTIAL_SENT
        if self.chunked:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"%x\r\n%s\r\n" % (len(part), part))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                         % (self.PARTIAL_LENGTH, part))
        await writer.drain()
        assert self._releases is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._releases.acquire(), 10)
        if not self.chunked:
            _reset(writer)
            return
        writer.write(b"zz\r\n")  # not a chunk size
        await writer.drain()
        while await reader.read(65536):  # until the proxy lets go
            pass

    async def _read_head(self, reader: asyncio.StreamReader, conn: int) -> ScriptedRequest | None:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # the connection ended between requests
        lines = raw[:-4].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [(n.strip(), v.strip())
                   for n, _, v in (line.partition(":") for line in lines[1:])]
        length = next((int(v) for n, v in headers if n.lower() == "content-length"), 0)
        req = ScriptedRequest(conn, method, target, headers, length)
        with self.lock:
            self.requests.append(req)
        return req

    def received(self, target: str) -> list[ScriptedRequest]:
        with self.lock:
            return [r for r in self.requests if r.target == target]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a reset, not an end of stream."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --------------------------------------------------------------------------------------------
# TCP backend


class TcpBackend(_LoopThread):
    """Plain TCP server.

    - ``echo``: sends TCP_BANNER, echoes everything, and on the client's EOF sends
      ``BYE <bytes received>\\n`` and closes.
    - ``source``: sends ``size`` pattern bytes (respecting backpressure), then closes.
    - ``sink``: sleeps ``read_delay``, then reads to EOF and answers ``<length> <sha256>\\n``.
    - ``eof-first``: sends TCP_BANNER, shuts its write side at once, then records everything
      it still receives (``received``) until the client's EOF.
    """

    def __init__(self, mode: str, *, size: int = 0, read_delay: float = 0.0) -> None:
        assert mode in ("echo", "source", "sink", "eof-first"), mode
        super().__init__(f"tcp-{mode}")
        self.mode = mode
        self.size = size
        self.read_delay = read_delay
        self.connections = 0
        self.received: list[bytes] = []
        self.finished = threading.Event()
        self._start(_stream_server(self._serve))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
        got = bytearray()
        try:
            if self.mode == "echo":
                writer.write(TCP_BANNER)
                while data := await reader.read(65536):
                    got += data
                    writer.write(data)
                    await writer.drain()
                writer.write(b"BYE %d\n" % len(got))
                await writer.drain()
            elif self.mode == "source":
                for piece in pattern_chunks(self.size):
                    writer.write(piece)
                    await writer.drain()
            elif self.mode == "sink":
                await asyncio.sleep(self.read_delay)
                sha = hashlib.sha256()
                total = 0
                while data := await reader.read(262144):  # count only: memory stays flat
                    sha.update(data)
                    total += len(data)
                writer.write(f"{total} {sha.hexdigest()}\n".encode())
                await writer.drain()
            else:  # eof-first
                writer.write(TCP_BANNER)
                await writer.drain()
                writer.write_eof()
                while data := await reader.read(65536):
                    got += data
        except ConnectionError:
            pass
        finally:
            with self.lock:
                self.received.append(bytes(got))
            self.finished.set()
            writer.close()


# --------------------------------------------------------------------------------------------
# client side


class IncompleteResponse(Exception):
    pass


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return ", ".join(values) if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class _Reader:
    """Buffered reader over a ``recv`` callable that returns b"" at end of stream."""

    def __init__(self, recv: Callable[[], bytes]) -> None:
        self._recv = recv
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> None:
        if self.eof:
            raise IncompleteResponse("end of stream")
        try:
            data = self._recv()
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            raise IncompleteResponse("end of stream")
        self.buf += data

    def read_until(self, sep: bytes, limit: int = 1 << 20) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            if len(self.buf) > limit:
                raise IncompleteResponse("line too long")
            self._fill()
        out = bytes(self.buf[:i + len(sep)])
        del self.buf[:i + len(sep)]
        return out

    def read_some(self, n: int) -> bytes:
        if not self.buf:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        return self.read_some(n)

    def at_eof(self) -> bool:
        """True when the stream ended with nothing buffered (reads if needed)."""
        if self.buf:
            return False
        try:
            self._fill()
        except IncompleteResponse:
            return True
        return False

    def read_response(self, method: str = "GET",
                      sink: Callable[[bytes], None] | None = None) -> Response:
        """One response (a 1xx counts as one). Body goes to ``sink`` if given."""
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        lines = head[:-4].split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not code.isdigit():
            raise IncompleteResponse(f"bad status line {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        resp = Response(version, int(code), reason, headers)
        parts: list[bytes] = []
        out = sink or parts.append
        status = resp.status
        if method == "HEAD" or status < 200 or status in (204, 304):
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        if te:
            if not te.endswith("chunked"):
                raise IncompleteResponse(f"response Transfer-Encoding {te!r}")
            while True:
                size_line = self.read_until(b"\r\n").split(b";")[0].strip()
                size = int(size_line, 16)
                if size == 0:
                    while self.read_until(b"\r\n") != b"\r\n":  # trailers
                        pass
                    break
                left = size
                while left:
                    piece = self.read_some(min(left, 262144))
                    left -= len(piece)
                    out(piece)
                if self.read_exact(2) != b"\r\n":
                    raise IncompleteResponse("bad chunk end")
        elif (cl := resp.header("content-length")) is not None:
            left = int(cl)
            while left:
                piece = self.read_some(min(left, 262144))
                left -= len(piece)
                out(piece)
        else:  # until close
            while True:
                try:
                    out(self.read_some(262144))
                except IncompleteResponse:
                    break
        resp.body = b"".join(parts)
        return resp


def parse_statuses(data: bytes) -> list[int]:
    """Status codes of the complete responses at the start of ``data`` (1xx included)."""
    chunks = [data]
    reader = _Reader(lambda: chunks.pop() if chunks else b"")
    statuses: list[int] = []
    while True:
        try:
            statuses.append(reader.read_response().status)
        except (IncompleteResponse, ValueError):
            return statuses


class HttpConn:
    """A blocking client connection to 127.0.0.1:``port``."""

    def __init__(self, port: int, *, timeout: float = 5.0, rcvbuf: int | None = None,
                 source: str | None = None) -> None:
        """``source``: the client's address (any of 127.0.0.0/8 works on loopback)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.reader = _Reader(lambda: self.sock.recv(262144))

    def __enter__(self) -> HttpConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str = "GET", target: str = "/", *,
                headers: dict[str, str] | None = None, body: bytes | None = None,
                version: str = "HTTP/1.1") -> Response:
        self.send(build_request(method, target, headers=headers, body=body, version=version))
        return self.read_response(method)

    def read_response(self, method: str = "GET",
                      sink: Callable[[bytes], None] | None = None) -> Response:
        return self.reader.read_response(method, sink)

    def read_final_response(self, method: str = "GET") -> tuple[list[int], Response]:
        """Skips 1xx answers; returns their codes and the final response."""
        informational = []
        while True:
            resp = self.read_response(method)
            if resp.status >= 200 or resp.status == 101:
                return informational, resp
            informational.append(resp.status)

    def closed_by_peer(self, timeout: float = 2.0) -> bool:
        """True if the peer closes (EOF or reset) within ``timeout`` with nothing more sent."""
        self.sock.settimeout(timeout)
        try:
            return self.reader.at_eof()
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def build_request(method: str = "GET", target: str = "/", *,
                  headers: dict[str, str] | None = None, body: bytes | None = None,
                  version: str = "HTTP/1.1") -> bytes:
    hdrs = {"Host": "test"} | (headers or {})
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding")
                                    for k in hdrs):
        hdrs["Content-Length"] = str(len(body))
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return head.encode("latin-1") + b"\r\n" + (body or b"")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


def ws_upgrade(sock: socket.socket) -> None:
    """A WebSocket-style Upgrade on `sock`; the echo backend answers 101 and its greeting."""
    sock.sendall(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, f"closed during the upgrade: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    assert recv_exact(sock, len(WS_GREETING)) == WS_GREETING


def recv_until_eof(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything until EOF/reset; the flag says whether the stream really ended."""
    sock.settimeout(timeout)
    out = bytearray()
    try:
        while data := sock.recv(262144):
            out += data
    except ConnectionResetError:
        pass
    except TimeoutError:
        return bytes(out), False
    return bytes(out), True


# --------------------------------------------------------------------------------------------
# echo HTTP backend over TLS (servers with `ssl: true`, tests/test_server_tls.py)


class TlsEchoBackend(EchoBackend):
    """EchoBackend behind TLS, with ``cert`` (a trustme LeafCert). It records the server
    name each ClientHello asked for (``snis``, None when none was sent) and the ALPN
    protocol each connection agreed on (``alpns``); ``connections`` counts the completed
    handshakes (the handler runs once a handshake is done)."""

    def __init__(self, name: str, cert: Any, **options: Any) -> None:
        import ssl

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.context)
        self.context.set_alpn_protocols(["http/1.1"])
        self.context.sni_callback = self._sni
        self.snis: list[str | None] = []
        self.alpns: list[str | None] = []
        super().__init__(name, **options)

    def _sni(self, ssl_object: Any, server_name: str | None, context: Any) -> None:
        with self.lock:
            self.snis.append(server_name)

    def _start(self, factory: Callable[[], Any]) -> None:
        """EchoBackend's server (``factory`` is the plain one), listening with TLS."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with self.lock:
                self.alpns.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
            try:
                await self._serve(reader, writer)
            except asyncio.CancelledError:  # server stopping
                writer.close()

        async def start() -> asyncio.AbstractServer:
            return await asyncio.start_server(serve, HOST, 0, limit=1 << 20, ssl=self.context)

        super()._start(start)
