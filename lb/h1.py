"""HTTP/1.x message framing as a sans-IO state machine.

`RequestReader` and `ResponseReader` take bytes and return events; they never touch a
socket, so they are tested on their own. Parsing is llhttp's (through httptools), in its
strict mode; on top of it this module decides the framing of what pylb forwards
(RFC 9112 section 6) and writes the heads it sends on.

Each header is looked at once, as llhttp reports it: end-to-end headers are rendered
straight into the block pylb forwards, hop-by-hop ones are kept aside for the framing
decision. The per-request path then only joins bytes.

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

# Hop-by-hop headers (RFC 9110 7.6.1) and the framing ones: pylb writes its own.
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
# Connection options that name no header to remove.
_PLAIN_TOKENS = frozenset((b"close", b"keep-alive", b"upgrade", b""))

# Methods llhttp accepts only in RTSP/x.y requests: such a request keeps its protocol name.
RTSP_ONLY_METHODS = frozenset(
    (
        b"ANNOUNCE", b"DESCRIBE", b"GET_PARAMETER", b"PAUSE", b"PLAY", b"PLAY_NOTIFY",
        b"RECORD", b"REDIRECT", b"SETUP", b"SET_PARAMETER", b"TEARDOWN", b"FLUSH",
    )
)

Headers = list[tuple[bytes, bytes]]


class HeadTooLarge(Exception):
    pass


class BadFraming(Exception):
    pass


class _Stop(Exception):
    """Raised from a callback to stop llhttp after a closing message."""


class Head:
    """What requests and responses share: headers as received, and as forwarded."""

    __slots__ = ("forward", "hop", "options", "keep_alive", "framing", "length")
    forward: list[bytes]  # rendered `Name: value\r\n` lines of end-to-end headers
    hop: Headers  # hop-by-hop headers, names in lower case
    options: bool  # Connection names headers to remove (rare)
    keep_alive: bool
    framing: int
    length: int

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case), or None."""
        if name in HOP_BY_HOP:
            return next((v for k, v in self.hop if k == name), None)
        prefix = name + b":"
        size = len(prefix)
        for line in self.forward:
            if line[:size].lower() == prefix:
                return line[size:-2].strip()
        return None

    def forward_lines(self, forward: list[bytes], upgrade: bool) -> list[bytes]:
        """The header lines `forward` to pass on, less any that Connection names, plus
        Upgrade when the connection is being upgraded: a new list, to be added to."""
        if self.options:
            named = _connection_options(self.hop)
            lines = [f for f in forward if f.split(b":", 1)[0].lower() not in named]
        else:
            lines = forward.copy()
        if upgrade:
            lines += [b"Upgrade: %s\r\n" % v for k, v in self.hop if k == b"upgrade"]
        return lines


class RequestHead(Head):
    __slots__ = ("method", "target", "version", "upgrade", "expect_continue", "forwarded_for")
    version: str  # "1.1", "1.0"
    method: bytes
    target: bytes
    upgrade: bool
    expect_continue: bool
    forwarded_for: int  # index in `forward` of the last X-Forwarded-For line, or -1


class ResponseHead(Head):
    __slots__ = ("status", "reason")
    status: int
    reason: bytes


def _connection_options(hop: Headers) -> set[bytes]:
    """Header names listed in Connection, to be removed with it (RFC 9110 7.6.1)."""
    names: set[bytes] = set()
    for key, value in hop:
        if key == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token not in _PLAIN_TOKENS:
                    names.add(token)
    return names


def _framing(hop: Headers, request: bool) -> tuple[int, int]:
    """(framing, content length) from the headers llhttp validated."""
    length = -1
    codings: list[bytes] = []
    for name, value in hop:
        if name == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b","))
        elif name == b"content-length":
            length = int(value.strip())
    if codings:
        if codings[-1] != b"chunked":
            if not request:
                return UNTIL_CLOSE, -1  # RFC 9112 6.3: a response then ends at close
            # RFC 9112 6.3: a request whose last coding is not chunked has no knowable
            # length (llhttp would say so only after the head, too late not to forward it).
            raise BadFraming("Transfer-Encoding does not end with chunked")
        return CHUNKED, -1
    if length >= 0:
        return LENGTH, length
    return NO_BODY, 0


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


# What on_header must tell apart, by lower-case name: hop-by-hop headers (the name is the
# code), Expect and X-Forwarded-For; every other header is forwarded as it is. Codes are
# told apart by identity.
_PLAIN, _EXPECT, _FORWARDED_FOR = "plain", "expect", "x-forwarded-for"
_SPECIAL: dict[bytes, bytes | str] = {
    **{name: name for name in HOP_BY_HOP}, b"expect": _EXPECT, b"x-forwarded-for": _FORWARDED_FOR,
}
_SPECIAL_LENGTHS = frozenset(map(len, _SPECIAL))
# Header names as commonly spelt, with their codes: most headers are told apart by one
# dict lookup, without lower-casing their names.
_CODES: dict[bytes, bytes | str] = {
    spelling: code
    for name, code in _SPECIAL.items()
    for spelling in (name, name.title(), name.upper(), name.capitalize())
}
_CODES.update(
    (name, _PLAIN)
    for name in (
        b"Host", b"User-Agent", b"Accept", b"Accept-Encoding", b"Accept-Language", b"Cookie",
        b"Referer", b"Origin", b"Authorization", b"Cache-Control", b"Pragma", b"Server", b"Date",
        b"Content-Type", b"Last-Modified", b"ETag", b"Vary", b"Expires", b"Location",
        b"Set-Cookie", b"Accept-Ranges", b"If-None-Match", b"If-Modified-Since", b"Range",
    )
    if name.lower() not in _SPECIAL
)


class _Reader:
    """What request and response readers share: event list, header intake, size limit."""

    def __init__(self, max_head: int) -> None:
        self.max_head = max_head
        self.events: list[tuple[int, object]] = []
        self.forward: list[bytes] = []
        self.hop: Headers = []
        self.options = False
        self.head_size = 0
        self.in_head = False
        self.closed = False  # after an error or a final message: read nothing more
        self.upgraded = False  # an Upgrade went through: what follows is not HTTP
        # At least as many bytes as the head being read has: bytes fed since the read in
        # which it began (counted generously), so small heads need no exact count.
        self._head_bound = 0
        self._fed = 0  # size of the bytes being fed now
        self._expect: bytes | None = None  # the last Expect value
        self._forwarded_for = -1  # index in `forward` of the last X-Forwarded-For

    def _begin(self) -> None:
        """A message begins: its head is read afresh."""
        self.forward = []
        self.hop = []
        self.options = False
        self.head_size = 0
        self.in_head = True
        self._head_bound = 0
        self._expect = None
        self._forwarded_for = -1

    # per header: keep this one lean (httptools calls it from C)
    def on_header(self, name: bytes, value: bytes) -> None:
        code = _CODES.get(name)
        if code is None:
            code = _SPECIAL.get(name.lower(), _PLAIN) if len(name) in _SPECIAL_LENGTHS else _PLAIN
        if code is _PLAIN:
            self.forward.append(b"".join((name, b": ", value, b"\r\n")))
        elif code is _FORWARDED_FOR:
            self._forwarded_for = len(self.forward)
            self.forward.append(b"".join((name, b": ", value, b"\r\n")))
        elif code is _EXPECT:
            self._expect = value
            self.forward.append(b"".join((name, b": ", value, b"\r\n")))
        else:
            self.hop.append((code, value))  # type: ignore[arg-type]
            if code == b"connection" and value.lower() not in _PLAIN_TOKENS:
                self.options = bool(_connection_options([(code, value)]))  # type: ignore[list-item]

    def _new_head(self, head: Head) -> None:
        """Hand the headers read so far to `head`; refuse a head over the size limit."""
        if self._head_bound + self._fed > self.max_head:
            size = self.head_size + sum(map(len, self.forward))
            for key, value in self.hop:
                size += len(key) + len(value) + 4
            if size > self.max_head:
                raise HeadTooLarge
        head.forward = self.forward
        head.hop = self.hop
        head.options = self.options

    def on_body(self, body: bytes) -> None:
        self.events.append((DATA, body))

    def _fail(self, reason: str) -> list[tuple[int, object]]:
        events = self.events
        events.append((ERROR, reason))
        self.events = []
        self.closed = True
        return events


class RequestReader(_Reader):
    """Reads the requests a client sends on one connection."""

    def __init__(self, max_head: int = 16384) -> None:
        super().__init__(max_head)
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._pending_bytes = 0  # bytes of a head not yet complete, for the size limit
        self.head: RequestHead | None = None

    def on_message_begin(self) -> None:
        self._begin()
        self._url = []
        self._pending_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self.head_size += len(url)

    def on_headers_complete(self) -> None:
        parser = self._parser
        self.in_head = False
        hop = self.hop
        upgrade = parser.should_upgrade()
        version = parser.get_http_version()
        keep_alive = parser.should_keep_alive()
        if hop:
            framing, length = _framing(hop, True)
            if upgrade and framing != NO_BODY:
                # llhttp does not read the body of an upgrade request: refuse rather than
                # send a server a head announcing a body it would never get.
                raise BadFraming("upgrade request with a body")
            if framing == CHUNKED and (version == "1.0" or length >= 0):
                keep_alive = False  # RFC 9112 6.1: faulty framing, close after it
        else:
            framing, length = NO_BODY, 0
        head = RequestHead()
        self._new_head(head)
        head.method = parser.get_method()
        url = self._url
        head.target = url[0] if len(url) == 1 else b"".join(url)
        head.version = version
        expect = self._expect
        head.expect_continue = (
            expect is not None and version == "1.1" and expect.strip().lower() == b"100-continue"
        )
        head.forwarded_for = self._forwarded_for
        head.keep_alive = keep_alive
        head.framing = framing
        head.length = length
        head.upgrade = upgrade
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
        self._fed = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            head = self.head
            if head is not None and head.method == b"PRI":
                return self._fail("HTTP/2 preface on an HTTP/1.1 listener")
            self.events.append((UPGRADE, data[upgrade.args[0] :]))
            self.closed = self.upgraded = True
        except httptools.HttpParserCallbackError as err:
            failure = _callback_failure(err)
            if failure is not None:
                return self._fail(failure)
        except httptools.HttpParserError as err:
            return self._fail(str(err) or type(err).__name__)
        if self.in_head:
            self._head_bound += len(data)
            if was_in_head:
                # A head still incomplete after several reads: llhttp only reports a
                # header once it is whole, so count raw bytes too (slow or endless lines).
                self._pending_bytes += len(data)
                if self._pending_bytes > self.max_head:
                    return self._fail("request head too large")
        events = self.events
        self.events = []
        return events


class ResponseReader(_Reader):
    """Reads the responses a server sends on one connection, one request at a time.

    Call `expect(method)` before each response: a response to HEAD has no body, which
    llhttp cannot know, so that head is cut out and parsed on its own.
    """

    def __init__(self, max_head: int = 16384) -> None:
        super().__init__(max_head)
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._head_only = False
        self._buffer = b""
        self.head: ResponseHead | None = None
        self._chunk_end = False  # the last chunk read is whole (lb.handover)
        self._last = b""  # the last bytes fed

    def at_chunk_boundary(self) -> bool:
        """Is a chunked body read exactly up to the end of a chunk (nothing of the next
        chunk's size line read yet)? Then another parser can take over from here."""
        return self._chunk_end and self._last.endswith(b"\r\n")

    def resume_body(self, framing: int, left: int) -> None:
        """Read the rest of a body whose head another process read: `left` bytes
        (LENGTH), chunks from a boundary (CHUNKED), or up to the close (UNTIL_CLOSE)."""
        if framing == LENGTH:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % left
        elif framing == CHUNKED:
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        else:
            head = b"HTTP/1.1 200 OK\r\n\r\n"
        self._head_only = False
        self.feed(head)  # its HEAD event is dropped: only the parser's state matters

    def on_chunk_header(self) -> None:
        self._chunk_end = False

    def on_chunk_complete(self) -> None:
        self._chunk_end = True

    def expect(self, method: bytes) -> None:
        self._head_only = method == b"HEAD"

    def on_message_begin(self) -> None:
        self._begin()
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason  # once, unless the status line came in pieces

    def on_headers_complete(self) -> None:
        parser = self._parser
        self.in_head = False
        hop = self.hop
        status = parser.get_status_code()
        framing, length = _framing(hop, False) if hop else (NO_BODY, 0)
        if status < 200 or status in (204, 304) or self._head_only:
            framing, length = NO_BODY, 0
        elif framing == NO_BODY:
            framing = UNTIL_CLOSE
        head = ResponseHead()
        self._new_head(head)
        head.status = status
        head.reason = self._reason
        head.keep_alive = parser.should_keep_alive() and framing != UNTIL_CLOSE
        head.framing = framing
        head.length = length
        self.head = head
        self.events.append((HEAD, head))

    def on_message_complete(self) -> None:
        self.events.append((END, None))

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        if self.closed:
            return []
        if self._head_only:
            return self._feed_head_only(data)
        self._last = data
        self._fed = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.events.append((UPGRADE, data[upgrade.args[0] :]))
            self.closed = self.upgraded = True
        except httptools.HttpParserCallbackError as err:
            return self._fail(_callback_failure(err) or "stopped")
        except httptools.HttpParserError as err:
            return self._fail(str(err) or type(err).__name__)
        if self.in_head:
            self._head_bound += len(data)
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
        self._fed = len(head_bytes)
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

def request_head_bytes(
    head: RequestHead, forwarded_for: bytes | None = None, close: bool = False
) -> bytes:
    """The head pylb sends to a server: HTTP/1.1, hop-by-hop headers replaced, and the
    client's address appended to X-Forwarded-For when `forwarded_for` is given;
    `Connection: close` when `close` (httpclose, http-server-close)."""
    forward = head.forward
    if forwarded_for is not None:
        index = head.forwarded_for
        if index >= 0:  # appended to the last one, as a list
            forward = forward.copy()
            forward[index] = forward[index][:-2] + b", " + forwarded_for + b"\r\n"
        else:
            forward = [*forward, b"X-Forwarded-For: " + forwarded_for + b"\r\n"]
    lines = head.forward_lines(forward, head.upgrade)
    keep_alive = False
    if head.method in RTSP_ONLY_METHODS:
        first = b"%s %s RTSP/%s\r\n" % (head.method, head.target, head.version.encode())
    elif head.version == "1.0" and not _has_host(forward):
        # HTTP/1.1 requires a Host (RFC 9112 3.2), and servers refuse one without: it goes
        # on as HTTP/1.0, as HAProxy sends it, asking to keep the server connection
        first = b"%s %s HTTP/1.0\r\n" % (head.method, head.target)
        keep_alive = not close
    else:
        first = b"%s %s HTTP/1.1\r\n" % (head.method, head.target)
    lines.insert(0, first)
    framing = head.framing
    if framing == CHUNKED:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif framing == LENGTH:
        lines.append(b"Content-Length: %d\r\n" % head.length)
    if head.upgrade:
        lines.append(b"Connection: upgrade\r\n")
    elif close:
        lines.append(b"Connection: close\r\n")
    elif keep_alive:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def _has_host(lines: list[bytes]) -> bool:
    return any(line[:5].lower() == b"host:" for line in lines)


def response_head_bytes(head: ResponseHead, framing: int, keep_alive: bool, version: str) -> bytes:
    """The head pylb sends to a client speaking HTTP/`version`, with the given framing."""
    status = head.status
    lines = head.forward_lines(head.forward, status == 101)
    lines.insert(0, b"HTTP/%s %d %s\r\n" % (version.encode(), status, head.reason))
    if framing == CHUNKED:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif framing == LENGTH:
        lines.append(b"Content-Length: %d\r\n" % head.length)
    elif framing == NO_BODY:
        # A bodiless answer (to HEAD, a 304) keeps the length its body would have had.
        length = head.header(b"content-length")
        if length is not None:
            lines.append(b"Content-Length: %s\r\n" % length)
    if status == 101:
        lines.append(b"Connection: upgrade\r\n")
    elif status >= 200:
        if not keep_alive:
            lines.append(b"Connection: close\r\n")
        elif version == "1.0":
            lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
