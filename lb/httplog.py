"""Request logs: one line per HTTP request or TCP connection, in HAProxy's formats.

HAProxy's ``option httplog`` and ``option tcplog`` lines are what operators' parsers, grok
patterns and habits already know, so pylb writes exactly those::

    127.0.0.1:34567 [21/Nov/2026:08:50:01.123] www app/s1 0/0/1/2/3 200 123 - - ---- 1/1/0/0/0 0/0 "GET / HTTP/1.1"
    127.0.0.1:34567 [21/Nov/2026:08:50:01.123] db pg/s1 0/1/3 123 -- 1/1/0/0/0 0/0

A :class:`RequestLog` writes them to stderr, a file (O_APPEND, one write per line, so the
workers can share it) or syslog (``udp@HOST:PORT``, ``unix@PATH``; RFC 3164, local0.info).
Writing is on the request path: it never raises and never waits for a slow receiver.
"""  # noqa: E501

from __future__ import annotations

import errno
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lb.counters import DROPPED_LOGS
from lb.tls import sni_of

if TYPE_CHECKING:
    import ssl

    from lb.counters import Counters
    from lb.httpproxy import HttpSession
    from lb.tcpproxy import TcpSession

__all__ = ["HttpsFields", "Record", "RequestLog", "format_http", "format_https", "format_tcp"]

NOSRV = "<NOSRV>"
BADREQ = "<BADREQ>"
SYSLOG_PRI = 16 * 8 + 6  # facility local0 (16), severity info (6): 134
MAX_DATAGRAM = 8192  # what common syslog daemons accept; longer payloads are cut
RETRY_INTERVAL = 1.0  # seconds between two attempts to reopen a failed target

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# HAProxy escapes these in the logged request line as #XX, so a line stays one line and
# the quotes around the request stay unambiguous.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\U0010ffff"#]')
# ... and in a server name (the client's text too), a blank, which would split the field.
_UNSAFE_SNI = re.compile(r'[\x00-\x20\x7f-\U0010ffff"#]')


@dataclass(frozen=True, slots=True)
class HttpsFields:
    """What HAProxy's ``option httpslog`` adds to a request's line: the client connection's
    TLS (``tls`` False: a plain connection, where HAProxy writes its fields as ``-``)."""

    tls: bool
    resumed: bool = False
    sni: str | None = None
    version: str | None = None
    cipher: str | None = None


@dataclass(slots=True)
class Record:
    """What the proxy knows about one request (HTTP) or connection (TCP) when it ends.

    Timers are in milliseconds, -1 for a phase that never happened. ``termination`` is
    HAProxy's 4-character state (``----``, ``CD--``, ``sC--``, ...); tcp logs show its
    first two characters.
    """

    client_ip: str
    client_port: int
    accept_time: float
    frontend: str
    backend: str
    server: str
    tq: int
    tw: int
    tc: int
    tr: int
    tt: int
    status: int
    bytes_read: int
    termination: str
    actconn: int
    feconn: int
    beconn: int
    srv_conn: int
    retries: int
    srv_queue: int
    backend_queue: int
    request_line: str
    mode: str
    redispatched: bool = False  # shown as a + before the retries, as HAProxy does
    https: HttpsFields | None = None  # option httpslog: the line ends with these


# -- formatting -------------------------------------------------------------------------------

# (epoch second, its text): formatting a date is the costly part of a line, and most lines
# fall in the same second as the previous one. A tuple, so readers never see half an update.
_accept_second: tuple[int, str] = (-1, "")
_syslog_second: tuple[int, str] = (-1, "")


def _clear_caches() -> None:
    """Forget the cached seconds (after a time zone change; used by the tests)."""
    global _accept_second, _syslog_second
    _accept_second = (-1, "")
    _syslog_second = (-1, "")


def accept_date(t: float) -> str:
    """``21/Nov/2026:08:50:01.123`` in local time, milliseconds truncated like HAProxy."""
    global _accept_second
    # Through whole microseconds: 0.123 * 1000 is 122.99999999999999 in binary floats.
    ms = round(t * 1_000_000) // 1000
    sec, msec = divmod(ms, 1000)
    cached_sec, text = _accept_second
    if cached_sec != sec:
        tm = time.localtime(sec)
        text = (
            f"{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year}:"
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}"
        )
        _accept_second = (sec, text)
    return f"{text}.{msec:03d}"


def syslog_timestamp(t: float) -> str:
    """RFC 3164 ``TIMESTAMP``: ``Nov 21 08:50:01``, ``Feb  6 12:14:14`` (day padded with a
    space), local time."""
    global _syslog_second
    sec = int(t)
    cached_sec, text = _syslog_second
    if cached_sec != sec:
        tm = time.localtime(sec)
        text = (
            f"{_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}"
        )
        _syslog_second = (sec, text)
    return text


def _escape_char(m: re.Match[str]) -> str:
    c = m[0]
    if ord(c) < 0x100:
        return f"#{ord(c):02X}"
    try:
        raw = c.encode("utf-8", "surrogateescape")  # undoes a surrogateescape decode
    except UnicodeEncodeError:
        raw = c.encode("utf-8", "surrogatepass")
    return "".join(f"#{b:02X}" for b in raw)


def escape_request(line: str) -> str:
    """The request line as logged: control characters, bytes >= 0x7f, ``"`` and ``#`` as
    ``#XX``; an empty line (unparsable request) is ``<BADREQ>``."""
    if not line:
        return BADREQ
    if _UNSAFE.search(line) is None:
        return line
    return _UNSAFE.sub(_escape_char, line)


def format_http(rec: Record) -> str:
    """HAProxy's ``option httplog`` line (no captured cookies or headers), or its
    ``option httpslog`` line when the record has ``https`` fields."""
    retries = f"+{rec.retries}" if rec.redispatched else rec.retries
    line = (
        f"{rec.client_ip}:{rec.client_port} [{accept_date(rec.accept_time)}] "
        f"{rec.frontend} {rec.backend}/{rec.server} "
        f"{rec.tq}/{rec.tw}/{rec.tc}/{rec.tr}/{rec.tt} {rec.status} {rec.bytes_read} "
        f"- - {rec.termination} "
        f"{rec.actconn}/{rec.feconn}/{rec.beconn}/{rec.srv_conn}/{retries} "
        f'{rec.srv_queue}/{rec.backend_queue} "{escape_request(rec.request_line)}"'
    )
    return line if rec.https is None else f"{line} {format_https(rec.https)}"


PLAIN_HTTPS = "0/-/-/-/0 -/-/-"  # httpslog's fields for a connection without TLS


def format_https(fields: HttpsFields) -> str:
    """HAProxy's httpslog fields: ``%[fc_err]/%[ssl_fc_err,hex]/%[ssl_c_err]/
    %[ssl_c_ca_err]/%[ssl_fc_is_resumed] %[ssl_fc_sni]/%sslv/%sslc``. A request is only read
    once the handshake succeeded (and a client certificate, when asked for, verified), so
    the error codes are 0, ``ssl_fc_err`` through ``hex`` being 8 bytes of zeros; a fetch
    with no sample is ``-``. Over plain TCP, ``fc_err`` and ``ssl_fc_is_resumed`` are 0 and
    the rest ``-``."""
    if not fields.tls:
        return PLAIN_HTTPS
    sni = fields.sni
    if sni is None:
        sni = "-"
    elif _UNSAFE_SNI.search(sni) is not None:
        sni = _UNSAFE_SNI.sub(_escape_char, sni)
    return (
        f"0/0000000000000000/0/0/{int(fields.resumed)} "
        f"{sni}/{fields.version or '-'}/{fields.cipher or '-'}"
    )


def format_tcp(rec: Record) -> str:
    """HAProxy's ``option tcplog`` line."""
    retries = f"+{rec.retries}" if rec.redispatched else rec.retries
    return (
        f"{rec.client_ip}:{rec.client_port} [{accept_date(rec.accept_time)}] "
        f"{rec.frontend} {rec.backend}/{rec.server} "
        f"{rec.tw}/{rec.tc}/{rec.tt} {rec.bytes_read} {rec.termination[:2]} "
        f"{rec.actconn}/{rec.feconn}/{rec.beconn}/{rec.srv_conn}/{retries} "
        f"{rec.srv_queue}/{rec.backend_queue}"
    )


def format_record(rec: Record) -> str:
    """The line for ``rec`` in the format of its mode."""
    return format_tcp(rec) if rec.mode == "tcp" else format_http(rec)


# -- sinks ------------------------------------------------------------------------------------

# Send errors after which the message is dropped but the socket is kept: the receiver is
# busy (full buffer) or the message is too big, not gone.
_TRANSIENT = {errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EMSGSIZE, errno.EINTR}


class RequestLog:
    """Writes request log lines to ``target``: ``stderr``, a file path, ``udp@HOST:PORT`` or
    ``unix@PATH`` (a datagram socket such as /dev/log).

    Nothing here raises once constructed (a malformed target is a ValueError from the
    constructor): a line that cannot be written is dropped and counted in ``dropped``, the
    reason kept in ``last_error``, and a target that failed is tried again at most once per
    ``RETRY_INTERVAL``. A file is opened O_APPEND and each line is one write(), so several
    worker processes may append to the same file without tearing lines.
    """

    def __init__(self, target: str, tag: str = "pylb") -> None:
        self.target = target
        self.tag = tag
        self.dropped = 0
        self.counters: Counters | None = None  # its frontend's, shared: show info DroppedLogs
        self.last_error: str | None = None
        self._fd: int | None = None  # stderr or file
        self._sock: socket.socket | None = None
        self._sockaddr: tuple[socket.AddressFamily, object] | None = None  # resolved
        self._next_retry = 0.0
        self._closed = False
        if target == "stderr":
            self._kind = "stderr"
        elif target.startswith("udp@"):
            self._kind = "udp"
            self._udp = _split_host_port(target[4:])
        elif target.startswith("unix@"):
            self._kind = "unix"
            if not target[5:]:
                raise ValueError(f"log target {target!r} has no path")
        elif target:
            self._kind = "file"
        else:
            raise ValueError("empty log target")
        self._open()

    def _drop(self) -> None:
        self.dropped += 1
        if self.counters is not None:
            self.counters.w[DROPPED_LOGS] += 1

    # -- opening ----------------------------------------------------------------------------

    def _open(self) -> None:
        """(Re)open the target; on failure remember why and retry later."""
        try:
            if self._kind == "stderr":
                self._fd = 2
            elif self._kind == "file":
                new = os.open(
                    self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
                old, self._fd = self._fd, new
                if old is not None:
                    os.close(old)
            else:
                self._connect(resolve=self._kind == "udp")
        except OSError as exc:
            self._failed(exc)

    def _connect(self, *, resolve: bool) -> None:
        """A non-blocking datagram socket connected to the syslog receiver. Host names are
        resolved only here when ``resolve`` (never on the request path)."""
        if self._kind == "unix":
            family, address = socket.AF_UNIX, self.target[5:]
        elif resolve or self._sockaddr is None:
            host, port = self._udp
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, address = info[0][0], info[0][4]
        else:
            family, address = self._sockaddr
        self._sockaddr = (family, address)
        self._drop_socket()
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _failed(self, exc: OSError) -> None:
        self.last_error = f"{self.target}: {exc.strerror or exc}"
        self._next_retry = time.monotonic() + RETRY_INTERVAL

    def _usable(self) -> bool:
        """Whether there is something to write to, retrying a failed target when due."""
        if self._closed:
            return False
        if self._fd is not None or self._sock is not None:
            return True
        if time.monotonic() < self._next_retry:
            return False
        if self._kind in ("udp", "unix"):
            try:
                # A host name that never resolved waits for reopen(): no DNS on this path.
                if self._kind == "unix" or self._sockaddr is not None:
                    self._connect(resolve=False)
            except OSError as exc:
                self._failed(exc)
        else:
            self._open()
        return self._fd is not None or self._sock is not None

    # -- the API -----------------------------------------------------------------------------

    def write(self, rec: Record) -> None:
        """Log ``rec`` in the format of its mode. Never raises: logging must not break a
        request."""
        try:
            self.write_line(format_record(rec))
        except Exception as exc:  # a malformed record must not kill a request
            self._drop()
            self.last_error = f"cannot format a log line: {exc!r}"

    def write_line(self, line: str) -> None:
        """Write one already formatted line (no newline). Never raises."""
        if not self._usable():
            self._drop()
            return
        if self._sock is not None:
            self._send(line)
            return
        fd = self._fd
        assert fd is not None
        data = (line + "\n").encode("utf-8", "backslashreplace")
        try:
            os.write(fd, data)  # one write of the whole line: O_APPEND keeps it whole
        except OSError as exc:
            self._drop()
            if exc.errno in _TRANSIENT:
                self.last_error = f"{self.target}: {exc.strerror}"
                return
            if self._kind == "file":  # e.g. EIO, ENOSPC, EBADF: open it again later
                self._fd = None
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._failed(exc)

    def _send(self, line: str) -> None:
        now = time.time()
        header = f"<{SYSLOG_PRI}>{syslog_timestamp(now)} {self.tag}[{os.getpid()}]: "
        data = (header + line).encode("utf-8", "backslashreplace")[:MAX_DATAGRAM]
        try:
            self._sock.send(data)  # type: ignore[union-attr]
        except OSError as exc:
            self._drop()
            if exc.errno in _TRANSIENT:
                self.last_error = f"{self.target}: {exc.strerror}"
                return
            # The receiver went away (syslog restarted, /dev/log replaced, ICMP refused):
            # reconnect on a later write.
            self._drop_socket()
            self._failed(exc)

    def reopen(self) -> None:
        """Files: close and reopen by path (after logrotate renamed it). Sockets: resolve
        and reconnect. Never raises."""
        if self._closed:
            return
        self._next_retry = 0.0
        if self._kind == "file":
            self._open()
        elif self._kind in ("udp", "unix"):
            self._drop_socket()
            self._open()

    def close(self) -> None:
        """Release the file or socket; later writes are dropped silently."""
        self._closed = True
        self._drop_socket()
        if self._kind == "file" and self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_host_port(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT of a udp@ target."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected udp@HOST:PORT, got {'udp@' + text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


# -- records from sessions -----------------------------------------------------------------


class Times:
    """When each step of one request happened (monotonic seconds), for its log line.
    Only kept when the frontend logs requests."""

    __slots__ = ("wall", "begin", "head", "queued", "granted", "connect", "sent", "response",
                 "status", "bytes_out", "retries", "redispatched")

    def __init__(self, begin: float) -> None:
        self.wall = time.time() - (time.monotonic() - begin)
        self.begin = begin
        self.head = self.queued = self.granted = self.connect = self.sent = -1.0
        self.response = -1.0
        self.status = -1  # the server's answer, once it came
        self.bytes_out = 0
        self.retries = 0
        self.redispatched = False  # a retry went to another server


def _ms(start: float, end: float) -> int:
    return -1 if start < 0 or end < 0 else int((end - start) * 1000)


def http_record(session: HttpSession, times: Times, status: int, termination: str) -> Record:
    """The log record of one HTTP request of `session`."""
    end = time.monotonic()
    frontend = session.frontend
    backend, server, head = session.backend, session.server, session.head
    peer = session.transport.get_extra_info("peername") or ("", 0)
    cookie = backend.cfg.cookie if backend is not None else None
    flags = "--"
    if cookie is not None:  # persistence: did the client bring one, did we set one
        flags = ("V" if session.cookie_server is not None else "N") + (
            "N" if server is None or not server.cookie or session.cookie_server is server
            else "I"
        )
    return Record(
        client_ip=peer[0], client_port=peer[1], accept_time=times.wall,
        frontend=frontend.name,
        backend=backend.name if backend is not None else frontend.name,
        server=server.name if server is not None else "<NOSRV>",
        tq=_ms(times.begin, times.head),
        tw=_ms(times.queued, times.granted) if times.queued >= 0 else
        (0 if times.head >= 0 and server is not None else -1),
        tc=_ms(times.connect, times.sent),
        tr=_ms(times.sent, times.response),
        tt=_ms(times.begin, end),
        status=status, bytes_read=times.bytes_out,
        termination=termination + flags,
        actconn=frontend.worker.connections(), feconn=frontend.current(),
        beconn=backend.conns() if backend is not None else 0,
        srv_conn=server.conns if server is not None else 0,
        retries=times.retries, redispatched=times.redispatched, srv_queue=0, backend_queue=0,
        request_line=(
            f"{head.method.decode('latin-1')} {head.target.decode('latin-1')} "
            f"HTTP/{head.version}" if head is not None else ""
        ),
        mode="http",
        https=https_fields(session.ssl) if frontend.cfg.httpslog else None,
    )


_PLAIN = HttpsFields(False)


def https_fields(tls: ssl.SSLObject | None) -> HttpsFields:
    """The httpslog fields of a client connection (``tls`` None: a plain one)."""
    if tls is None:
        return _PLAIN
    cipher = tls.cipher()
    return HttpsFields(True, tls.session_reused, sni_of(tls), tls.version(),
                       cipher[0] if cipher else None)


def tcp_record(session: TcpSession, bytes_out: int, termination: str) -> Record:
    """The log record of one TCP connection."""
    now = time.monotonic()
    frontend = session.frontend
    server, backend = session.server, frontend.default_backend
    peer = session.peer
    wait = session.connect - session.queued if session.queued >= 0 else 0.0
    return Record(
        client_ip=peer[0], client_port=peer[1],
        accept_time=time.time() - (now - session.begin), frontend=frontend.name,
        backend=backend.name if backend is not None else frontend.name,
        server=server.name if server is not None else "<NOSRV>",
        tq=0, tw=int(wait * 1000),
        tc=int((session.connected - session.connect) * 1000) if session.connected >= 0 else -1,
        tr=-1, tt=int((now - session.begin) * 1000), status=-1, bytes_read=bytes_out,
        termination=termination + "--", actconn=frontend.worker.connections(),
        feconn=frontend.current(), beconn=backend.conns() if backend is not None else 0,
        srv_conn=server.conns if server is not None else 0, retries=session.retries,
        srv_queue=0, backend_queue=0, request_line="", mode="tcp",
    )
