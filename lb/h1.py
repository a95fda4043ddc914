"""HTTP/1.x message framing as a sans-IO state machine.

`RequestReader` and `ResponseReader` take bytes and return events; they never touch a
socket, so they are tested on their own. Parsing is llhttp's (through httptools), in its
strict mode; on top of it this module decides the framing of what pylb forwards
(RFC 9112 section 6) and writes the heads it sends on.

Events are tuples, cheap on the per-request path:
    (HEAD, RequestHead | ResponseHead)
    (DATA, bytes)           decoded body bytes (chunk framing removed)
    (END, None)             the message is complete
    (UPGRADE, bytes)        the message asks for a tunnel; bytes already read past it
    (ERROR, str)            the stream is not valid HTTP/1.x: answer 400 (or 502) and close
"""

from __future__ import annotations

import httptools

HEAD, DATA, END, UPGRADE, ERROR = range(5)

# Framing of a body, as pylb forwards it.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)

# Hop-by-hop headers: consumed here, never forwarded as they came (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"content-length",
        b"te",
        b"trailer",
        b"upgrade",
    )
)

# Methods llhttp accepts only in RTSP/x.y requests: such a request keeps its protocol name.
RTSP_ONLY_METHODS = frozenset(
    (
        b"ANNOUNCE", b"DESCRIBE", b"GET_PARAMETER", b"PAUSE", b"PLAY", b"PLAY_NOTIFY",
        b"RECORD", b"REDIRECT", b"SETUP", b"SET_PARAMETER", b"TEARDOWN", b"FLUSH",
    )
)

Headers = list[tuple[bytes, bytes]]


class RequestHead:
    __slots__ = (
        "method",
        "target",
        "version",
        "headers",
        "keep_alive",
        "framing",
        "length",
        "upgrade",
        "expect_continue",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: str,
        headers: Headers,
        keep_alive: bool,
        framing: int,
        length: int,
        upgrade: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.framing = framing
        self.length = length
        self.upgrade = upgrade
        self.expect_continue = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class ResponseHead:
    __slots__ = ("status", "reason", "version", "headers", "keep_alive", "framing", "length")

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: str,
        headers: Headers,
        keep_alive: bool,
        framing: int,
        length: int,
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.framing = framing
        self.length = length


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def _framing(headers: Headers, request: bool = True) -> tuple[int, int, bool]:
    """(framing, content length, saw transfer-encoding) from headers llhttp validated."""
    length = -1
    codings: list[bytes] = []
    for key, value in headers:
        name = key.lower()
        if name == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b","))
        elif name == b"content-length":
            length = int(value.strip())
    if codings:
        if codings[-1] != b"chunked":
            if not request:
                return UNTIL_CLOSE, -1, True  # RFC 9112 6.3: a response then ends at close
            # RFC 9112 6.3: a request whose last coding is not chunked has no knowable
            # length (llhttp would say so only after the head, too late to not forward it).
            raise BadFraming("Transfer-Encoding does not end with chunked")
        return CHUNKED, -1, True
    if length >= 0:
        return LENGTH, length, False
    return NO_BODY, 0, False


class _Reader:
    """What request and response readers share: event list, head size limit."""

    def __init__(self, max_head: int) -> None:
        self.max_head = max_head
        self.events: list[tuple[int, object]] = []
        self.headers: Headers = []
        self.head_size = 0
        self.in_head = False
        self.closed = False  # after an error or a final message: read nothing more

    # httptools callbacks (names fixed by httptools)
    def on_message_begin(self) -> None:
        self.headers = []
        self.head_size = 0
        self.in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            raise HeadTooLarge

    def on_body(self, body: bytes) -> None:
        self.events.append((DATA, body))

    def _fail(self, reason: str) -> list[tuple[int, object]]:
        events = self.events
        events.append((ERROR, reason))
        self.events = []
        self.closed = True
        return events


class HeadTooLarge(Exception):
    pass


class BadFraming(Exception):
    pass


class RequestReader(_Reader):
    """Reads the requests a client sends on one connection."""

    def __init__(self, max_head: int = 16384) -> None:
        super().__init__(max_head)
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._pending_bytes = 0  # bytes of a head not yet complete, for the size limit
        self.head: RequestHead | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._url = []
        self._pending_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self.head_size += len(url)
        if self.head_size > self.max_head:
            raise HeadTooLarge

    def on_headers_complete(self) -> None:
        parser = self._parser
        headers = self.headers
        self.in_head = False
        self._pending_bytes = 0
        framing, length, has_te = _framing(headers)
        version = parser.get_http_version()
        keep_alive = parser.should_keep_alive()
        method = parser.get_method()
        if has_te and version == "1.0":
            keep_alive = False  # RFC 9112 6.1: faulty framing, close after it
        if has_te and length >= 0:
            keep_alive = False
        upgrade = parser.should_upgrade()
        if upgrade and framing != NO_BODY:
            # llhttp does not read the body of an upgrade request: refuse rather than
            # send a server a head announcing a body it would never get.
            raise BadFraming("upgrade request with a body")
        head = RequestHead(
            method, b"".join(self._url), version, headers, keep_alive, framing, length, upgrade
        )
        if version == "1.1":
            expect = head.header(b"expect")
            head.expect_continue = expect is not None and expect.lower() == b"100-continue"
        self.head = head
        self.events.append((HEAD, head))

    def on_message_complete(self) -> None:
        self.events.append((END, None))
        head = self.head
        if head is not None and not head.keep_alive:
            # RFC 9112 9.6: nothing after a request that closes the connection is read.
            self.closed = True
            raise _Stop

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        if self.closed:
            return []
        was_in_head = self.in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            head = self.head
            if head is not None and head.method == b"PRI":
                return self._fail("HTTP/2 preface on an HTTP/1.1 listener")
            self.events.append((UPGRADE, data[upgrade.args[0] :]))
            self.closed = True
        except httptools.HttpParserCallbackError as err:
            failure = _callback_failure(err)
            if failure is not None:
                return self._fail(failure)
        except httptools.HttpParserError as err:
            return self._fail(str(err) or type(err).__name__)
        if self.in_head and was_in_head:
            # A head still incomplete after several reads: llhttp only reports a header
            # once it is whole, so count raw bytes too (slow or endless header lines).
            self._pending_bytes += len(data)
            if self._pending_bytes > self.max_head:
                return self._fail("request head too large")
        events = self.events
        self.events = []
        return events


class _Stop(Exception):
    """Raised from a callback to stop llhttp after a closing message."""


def _callback_failure(err: Exception) -> str | None:
    """What went wrong in one of our callbacks: None for a deliberate stop."""
    cause = err.__context__
    if isinstance(cause, _Stop):
        return None
    if isinstance(cause, HeadTooLarge):
        return "head too large"
    if isinstance(cause, BadFraming):
        return str(cause)
    if cause is not None:
        raise cause  # a bug of ours, not bad input
    return str(err)


class ResponseReader(_Reader):
    """Reads the responses a server sends on one connection, one request at a time.

    Call `expect(method)` before each response: a response to HEAD has no body, which
    llhttp cannot know, so that head is cut out and parsed on its own.
    """

    def __init__(self, max_head: int = 16384) -> None:
        super().__init__(max_head)
        self._parser = httptools.HttpResponseParser(self)
        self._status_reason: list[bytes] = []
        self._head_only = False
        self._buffer = b""
        self.head: ResponseHead | None = None

    def expect(self, method: bytes) -> None:
        self._head_only = method == b"HEAD"

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._status_reason = []

    def on_status(self, reason: bytes) -> None:
        self._status_reason.append(reason)

    def on_headers_complete(self) -> None:
        parser = self._parser
        headers = self.headers
        self.in_head = False
        status = parser.get_status_code()
        framing, length, _ = _framing(headers, request=False)
        if status < 200 or status in (204, 304) or self._head_only:
            framing, length = NO_BODY, 0
        elif framing == NO_BODY:
            framing = UNTIL_CLOSE
        keep_alive = parser.should_keep_alive() and framing != UNTIL_CLOSE
        head = ResponseHead(
            status,
            b"".join(self._status_reason),
            parser.get_http_version(),
            headers,
            keep_alive,
            framing,
            length,
        )
        self.head = head
        self.events.append((HEAD, head))

    def on_message_complete(self) -> None:
        self.events.append((END, None))

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        if self.closed:
            return []
        if self._head_only:
            return self._feed_head_only(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.events.append((UPGRADE, data[upgrade.args[0] :]))
            self.closed = True
        except httptools.HttpParserCallbackError as err:
            return self._fail(_callback_failure(err) or "stopped")
        except httptools.HttpParserError as err:
            return self._fail(str(err) or type(err).__name__)
        events = self.events
        self.events = []
        return events

    def _feed_head_only(self, data: bytes) -> list[tuple[int, object]]:
        """Parse a head with no body, then start a fresh parser for what follows."""
        buffer = self._buffer + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > self.max_head:
                return self._fail("response head too large")
            self._buffer = buffer
            return []
        self._buffer = b""
        head_bytes, rest = buffer[: end + 4], buffer[end + 4 :]
        try:
            self._parser.feed_data(head_bytes)
        except httptools.HttpParserCallbackError as err:
            return self._fail(_callback_failure(err) or "stopped")
        except httptools.HttpParserError as err:
            return self._fail(str(err) or type(err).__name__)
        head = self.head
        if head is not None and head.status < 200:
            # An interim answer: the final one still has to come, still without a body.
            events = self.events
            self.events = []
            return events + self._feed_head_only(rest) if rest else events
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = False
        self.events.append((END, None))
        events = self.events
        self.events = []
        return events + self.feed(rest) if rest else events


# -- writing heads -------------------------------------------------------------------

def request_head_bytes(head: RequestHead, forwarded_for: bytes | None = None) -> bytes:
    """The head pylb sends to a server: HTTP/1.1, hop-by-hop headers replaced, and the
    client's address appended to X-Forwarded-For when `forwarded_for` is given."""
    drop = _connection_tokens(head.headers) - {b"close", b"keep-alive", b"upgrade"}
    if head.method in RTSP_ONLY_METHODS:
        lines = [b"%s %s RTSP/%s\r\n" % (head.method, head.target, head.version.encode())]
    else:
        lines = [b"%s %s HTTP/1.1\r\n" % (head.method, head.target)]
    xff = -1
    for key, value in head.headers:
        name = key.lower()
        if name in HOP_BY_HOP or name in drop:
            if head.upgrade and name == b"upgrade":
                lines.append(b"%s: %s\r\n" % (key, value))
            continue
        if name == b"x-forwarded-for":
            xff = len(lines)
        lines.append(b"%s: %s\r\n" % (key, value))
    if forwarded_for is not None:
        if xff >= 0:
            lines[xff] = lines[xff][:-2] + b", " + forwarded_for + b"\r\n"
        else:
            lines.append(b"X-Forwarded-For: %s\r\n" % forwarded_for)
    if head.framing == CHUNKED:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif head.framing == LENGTH:
        lines.append(b"Content-Length: %d\r\n" % head.length)
    if head.upgrade:
        lines.append(b"Connection: upgrade\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def response_head_bytes(head: ResponseHead, framing: int, keep_alive: bool, version: str) -> bytes:
    """The head pylb sends to a client speaking HTTP/`version`, with the given framing."""
    drop = _connection_tokens(head.headers) - {b"close", b"keep-alive", b"upgrade"}
    upgrade = head.status == 101
    lines = [b"HTTP/%s %d %s\r\n" % (version.encode(), head.status, head.reason)]
    for key, value in head.headers:
        name = key.lower()
        if name in HOP_BY_HOP or name in drop:
            # A bodiless answer (to HEAD, 304) keeps the length the body would have had.
            if (upgrade and name == b"upgrade") or (
                framing == NO_BODY and name == b"content-length"
            ):
                lines.append(b"%s: %s\r\n" % (key, value))
            continue
        lines.append(b"%s: %s\r\n" % (key, value))
    if framing == CHUNKED:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif framing == LENGTH:
        lines.append(b"Content-Length: %d\r\n" % head.length)
    if upgrade:
        lines.append(b"Connection: upgrade\r\n")
    elif head.status >= 200:
        if not keep_alive:
            lines.append(b"Connection: close\r\n")
        elif version == "1.0":
            lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
