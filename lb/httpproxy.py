"""HTTP mode: one client connection, its requests forwarded one at a time to servers.

The request side and the response side each run on events from lb.h1. A request is an
*exchange*: its head chooses a server connection (pooled or new), its body streams to
the server as it arrives, the response streams back. Pipelined requests wait, unread,
until the exchange before them is answered, so answers keep their order and memory stays
bounded by one read. Backpressure is passed through in both directions: a slow reader on
one side pauses reading on the other.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from time import monotonic
from typing import TYPE_CHECKING, Any

from lb import h1, handover, httplog, persist
from lb.applet import ANSWER_TIMEOUT
from lb.balance import Context
from lb.counters import (
    BIN,
    BOUT,
    CLI_ABRT,
    CONNECT,
    CTIME_MAX,
    CTIME_SUM,
    DREQ,
    ECON,
    EREQ,
    ERESP,
    HRSP_OTHER,
    INTERCEPTED,
    LASTSESS,
    LBTOT,
    QTIME_MAX,
    QTIME_SUM,
    REQ_TOT,
    REUSE,
    RTIME_MAX,
    RTIME_SUM,
    SRV_ABRT,
    STOT,
    TIMED,
    TTIME_MAX,
    TTIME_SUM,
    WREDIS,
    WRETR,
)
from lb.errors import PAGES
from lb.h1 import chunk, request_head_bytes, response_head_bytes
from lb.retry import CONN_FAILURE, EMPTY_RESPONSE, JUNK_RESPONSE, RESPONSE_TIMEOUT
from lb.serverconn import ServerConnection
from lb.streamtunnel import TransportTunnel, is_tls
from lb.timer import clock
from lb.tunnel import Held, Tunnel, drained, take_socket

if TYPE_CHECKING:
    from lb.applet import WebRequest
    from lb.backend import Backend, Server
    from lb.frontend import Frontend
    from lb.rules import StickCounters

# Session phases. TURNAROUND: waiting to retry a server that failed the request.
IDLE, QUEUED, TURNAROUND, CONNECTING, EXCHANGE, TUNNEL, CLOSED = range(7)
_PHASES = ("idle", "queued", "turnaround", "connecting", "exchange", "tunnel", "closed")

# A pseudo-event after lb.h1's: the client half-closed, after the events before it.
CLIENT_EOF = 100

# Reasons to stop reading from the client (a bit each)
PIPELINE, SERVER_FULL, BUFFER_FULL = 1, 2, 4

MAX_BUFFERED_BODY = 256 * 1024  # request body held while the server connection opens


class BadResponse(Exception):
    """A server's answer that cannot be passed on."""


class HttpSession:
    """One client connection in HTTP mode: an asyncio protocol (not derived from
    asyncio.Protocol, so that the compiled build can make it an extension type)."""

    __slots__ = (
        "frontend",
        "transport",
        "reader",
        "client_ip",
        "deadline",
        "phase",
        "requests",
        "paused",
        "pending",
        "close_after",
        "head",
        "backend",
        "server",
        "conn",
        "connect_task",
        "retries_left",
        "head_bytes",
        "body_buffer",
        "buffered",
        "kept",
        "kept_size",
        "failed",
        "l7_retry",
        "server_close",
        "touched",
        "req_done",
        "resp_started",
        "resp_done",
        "resp_framing",
        "interim",
        "server_keep_alive",
        "server_until_close",
        "server_paused",
        "tunnel_bytes",
        "sticky",
        "cookie_server",
        "stick_key",
        "queue_id",
        "slot",
        "held",
        "times",
        "begin",
        "tunnel",
        "received",
        "resume",
        "tracked",
        "adopted",
        "stays",
        "moving",
        "resp_left",
        "fe_counters",
        "pool",
        "ssl",
        "applet",
        "t_head",
        "t_queued",
        "q_secs",
        "t_connect",
        "t_sent",
        "t_resp",
    )

    def __init__(self, frontend: Frontend, adopted: bool = False) -> None:
        self.frontend = frontend
        self.fe_counters = frontend.counters  # the frontend's and the worker's, at hand
        self.pool = frontend.worker.pool
        self.adopted = adopted  # handed over by an older generation
        self.tracked: StickCounters | None = None  # stick counters (track-sc), if any
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.reader = h1.RequestReader(frontend.max_head)
        self.client_ip = b""
        self.deadline = 0.0
        self.phase = IDLE
        self.requests = 0
        self.paused = 0
        self.pending: list[tuple[int, object]] | None = None
        self.close_after = False
        self.held: list[bytes] | None = None  # bytes read while over the frontend's limit
        self.begin = time.monotonic()  # when the current request began (for its log)
        self.resume: list[int] | None = None  # a queue place held in an older generation
        self.tunnel: Tunnel | None = None
        self.stays = ""  # why this connection cannot move to the next generation
        self.moving: dict[str, Any] | None = None  # on its way there (lb.handover)
        self.ssl: ssl.SSLObject | None = None  # a TLS connection's TLS state
        self.applet: WebRequest | None = None  # a request pylb answers itself (lb.applet)
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.head: h1.RequestHead | None = None
        self.backend: Backend | None = None
        self.server: Server | None = None
        self.conn: ServerConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.retries_left = 0
        self.head_bytes = b""
        self.body_buffer: list[bytes] = []  # body not yet sent to the server
        self.buffered = 0
        # Body sent to the server and kept for a replay (see lb.retry); None once it outgrew
        # the backend's retry-buffer: the request can no longer be sent again.
        self.kept: list[bytes] | None = []
        self.kept_size = 0
        self.failed: list[Server] | None = None  # servers that failed this request
        self.l7_retry = True  # False: http-request disable-l7-retry
        self.server_close = False  # httpclose / http-server-close: no keep-alive to the server
        self.touched = False  # an interim answer (100 Continue) reached the client
        self.req_done = False
        self.resp_started = False
        self.resp_done = False
        self.resp_framing = h1.NO_BODY
        self.resp_left = -1  # body bytes still to come from the server (LENGTH framing)
        self.interim = False
        # when the steps of this request happened (monotonic), for the servers' times
        self.t_head = self.t_queued = self.t_connect = self.t_sent = self.t_resp = -1.0
        self.q_secs = 0.0  # seconds it waited in a queue
        self.server_keep_alive = False
        self.server_until_close = False
        self.server_paused = False
        self.tunnel_bytes = b""
        self.sticky: Server | None = None  # the server persistence names for this request
        self.cookie_server: Server | None = None  # ... when it is the client's cookie
        self.stick_key: bytes | None = None  # this request's key in the stick table
        self.queue_id = 0  # waiting for a slot on a limited server (see lb.queue)
        self.slot: Server | None = None  # the limited server whose slot this exchange holds
        self.received: list[bytes] = []  # the head's lines as the client sent them
        self.times: httplog.Times | None = None

    # -- client connection ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.phase == EXCHANGE:
            return  # a response moving in from an older generation: admitted there
        self.ssl = transport.get_extra_info("ssl_object")
        if self.ssl is not None:
            self.frontend.tls_opened(self, self.ssl)  # show info's CurrSslConns...
            # uvloop's TLS transport reads ahead of a paused protocol, and drops what it
            # read if the connection then ends: pipelined requests would be lost
            transport.set_read_buffer_limits(high=1, low=0)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0].encode() if peer else b""
        frontend = self.frontend
        if frontend.connection_rules is not None and not frontend.connected(
            self, peer[0] if peer else "", self.adopted
        ):
            self.phase = CLOSED  # rejected by tcp-request connection: reset already
            self.held = []  # and should uvloop still read once, the bytes stay unread
            return
        if frontend.admit(self):
            self.admitted()
        else:
            self.held = []  # over the limit: wait for a place, reading no further

    def admitted(self) -> None:
        """The frontend's limits let this connection in: start reading requests."""
        self.deadline = clock.now + self.frontend.timeouts.http_request
        clock.watched.add(self)
        if self.frontend.stopping:  # accepted as the worker stopped accepting
            if self.frontend.worker.handing_over and self.held is None and self.ssl is None:
                self._leave()
                return
            self.close_after = True  # serve what it sends, then close
        held = self.held
        if held is not None:
            self.held = None
            self.transport.resume_reading()
            if held:
                self.data_received(b"".join(held))

    def data_received(self, data: bytes) -> None:
        if self.held is not None:
            # uvloop reads once even when told not to in connection_made: keep that read
            self.held.append(data)
            self.transport.pause_reading()
            return
        self.fe_counters.w[BIN] += len(data)
        if self.reader.upgraded:
            # Sent after the Upgrade request, before the server's answer: for the tunnel
            # (a server that refuses the upgrade closes the connection after its answer).
            self.tunnel_bytes += data
            self.transport.pause_reading()
            return
        if self.phase == IDLE and not self.reader.in_head:
            self.deadline = clock.now + self.frontend.timeouts.http_request
            if self.frontend.request_log is not None and self.requests:
                self.begin = time.monotonic()
        events = self.reader.feed(data)
        if events and events[-1][0] == h1.ERROR:
            events = _without_failed_request(events)
        if self.pending is not None:
            self.pending.extend(events)
            return
        self._process(events)

    def eof_received(self) -> bool:
        # True: keep writing, requests already read still get their answers. A TLS
        # transport closes whatever we say (asyncio cannot half-close TLS): False there,
        # or uvloop logs a warning each time.
        if self.reader.upgraded and self.phase < TUNNEL and self.pending is None:
            self.pending = [(CLIENT_EOF, None)]  # for the tunnel, once it begins
            return self.ssl is None
        if self.pending is not None:
            self.pending.append((CLIENT_EOF, None))  # after the requests it sent before
        else:
            self._client_eof()
        return self.ssl is None

    def _client_eof(self) -> None:
        if self.phase == IDLE:
            self._close()  # an unfinished head is abandoned, not answered
        elif not self.req_done:
            self._abort("CR")  # the client gave up mid-request
        elif self.phase < EXCHANGE and self.backend.cfg.abortonclose:  # type: ignore[union-attr]
            self._abort("CQ" if self.phase == QUEUED else "CC")  # it left while waiting
        else:
            self.close_after = True  # answer what was asked, then close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == TUNNEL:
            return
        self.phase = CLOSED
        clock.watched.discard(self)
        if self.times is not None:
            self._log(self.times.status, "CD")  # the client went away mid-exchange
        self._drop_server(reusable=False)
        self.frontend.closed(self)

    def pause_writing(self) -> None:
        conn = self.conn
        if conn is not None and not self.server_paused:
            self.server_paused = True
            conn.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.moving is not None:  # the client has all we wrote: the rest moves
            handover.send_stream(self)
            return
        conn = self.conn
        if conn is not None and self.server_paused:
            self.server_paused = False
            conn.transport.resume_reading()

    def _pause(self, reason: int) -> None:
        if not self.paused and self.phase < TUNNEL:
            self.transport.pause_reading()
        self.paused |= reason

    def _unpause(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.phase < TUNNEL:
                self.transport.resume_reading()

    def on_timeout(self) -> None:
        phase = self.phase
        if phase == IDLE:
            if self.requests and not self.reader.in_head:
                self._close()  # http-keep-alive expired: a silent close
            else:
                self._reply(408, "cR")
        elif phase == QUEUED:
            self._reply(503, "sQ")  # timeout queue
        elif phase == TURNAROUND:
            server = self.server
            assert server is not None
            usable = server.persistable if server is self.sticky else server.selectable
            if usable or not self.backend.retry.redispatch:  # type: ignore[union-attr]
                self._use(server)
            else:  # marked down meanwhile: any other server (its turnaround passed too)
                context = Context(self.client_ip, None, self.head)
                self._redispatch(self.backend.pick(context, server))  # type: ignore[union-attr]
        elif phase == CONNECTING:
            self._connect_failed()
        elif not self.resp_started and self.req_done:
            if not self._retry(RESPONSE_TIMEOUT):
                self._reply(504, "sH")
        else:
            self._abort("cD" if self.resp_started else "cR")  # a side stalled mid-message

    # -- request side ---------------------------------------------------------------

    def _process(self, events: list[tuple[int, object]]) -> None:
        for index, (kind, value) in enumerate(events):
            if kind == h1.UPGRADE:
                self.tunnel_bytes = value  # type: ignore[assignment]
                continue
            if kind == CLIENT_EOF and self.phase != TUNNEL:
                self._client_eof()
                return
            if self.req_done or self.phase >= TUNNEL:
                # The next request waits, unread, until this one is answered.
                self.pending = events[index:]
                self._pause(PIPELINE)
                return
            if kind == h1.DATA:
                self._request_data(value)  # type: ignore[arg-type]
            elif kind == h1.HEAD:
                self._request_head(value)  # type: ignore[arg-type]
            elif kind == h1.END:
                self._request_end()
            else:
                self._request_error()
            if self.phase == CLOSED:
                return

    def _request_head(self, head: h1.RequestHead) -> None:
        if head.method == b"CONNECT":
            self._reply(405)
            return
        self.head = head
        self.received = head.forward  # edits below replace the list, never change it
        self.requests += 1
        frontend = self.frontend
        self.fe_counters.w[REQ_TOT] += 1
        self.t_head = monotonic()
        if frontend.request_log is not None:
            self.times = httplog.Times(self.begin)
            self.times.head = self.t_head
        if not head.keep_alive or head.upgrade or (
            frontend.stopping and (self.ssl is not None or not frontend.worker.handing_over)
        ):
            self.close_after = True
        backend = frontend.default_backend
        tracked = self.tracked
        if tracked is not None:
            tracked.begin_request()  # counted before the rules, which may read the rates
        if frontend.rules is not None:
            decision = frontend.rules.evaluate(
                _RuleView(self.client_ip, head, self.ssl), frontend.worker, tracked
            )
            self.tracked = decision.counters
            self.l7_retry = not decision.disable_l7_retry
            if decision.response is not None:
                self._answer(decision.response)
                return
            if decision.del_headers or decision.set_headers:
                _edit_headers(head, decision.del_headers, decision.set_headers)
            if decision.backend is not None:
                backend = frontend.worker.backends.get(decision.backend, backend)
        web = frontend.web
        if web is not None and web.matches(head.target):  # its stats page or /metrics
            self.applet = web.begin(self, head)
            self.close_after = True
            return
        if backend is None:
            self._reply(503, "SC")
            return
        self.backend = backend
        self.retries_left = backend.cfg.retries
        cfg = backend.cfg
        fe_cfg = frontend.cfg
        if cfg.httpclose or fe_cfg.httpclose:
            self.close_after = True
            self.server_close = True
        elif cfg.http_server_close or fe_cfg.http_server_close:
            self.server_close = True
        if backend.stick is not None:  # before the cookie edits below change the head
            text = persist.stick_key(head, self.client_ip, cfg.stick_on)  # type: ignore[arg-type]
            self.stick_key = backend.stick.key_of(text) if text is not None else None
        if cfg.cookie is not None:
            head.forward = list(head.forward)  # edited in place below
            value = persist.request_cookie(head, cfg.cookie)  # edits the head: before rendering
            if value is not None:
                server = backend.by_cookie.get(value.decode("latin-1"))
                if server is not None and server.persistable:
                    self.sticky = self.cookie_server = server
        if self.sticky is None and self.stick_key is not None:
            self.sticky = backend.stuck(self.stick_key)
        self.head_bytes = request_head_bytes(
            head, self.client_ip if fe_cfg.forwardfor else None, self.server_close
        )
        self._dispatch(None)

    def _request_data(self, data: bytes) -> None:
        if self.applet is not None:
            self.applet.data(data)
            self.deadline = clock.now + self.frontend.timeouts.client
            return
        if self.head.framing == h1.CHUNKED:  # type: ignore[union-attr]
            data = chunk(data)
        self._send_body(data)
        self.deadline = clock.now + self.frontend.timeouts.client

    def _send_body(self, data: bytes) -> None:
        if self.phase == EXCHANGE:
            self.conn.transport.write(data)  # type: ignore[union-attr]
            self._keep([data])
            server = self.server
            server.counters.w[BIN] += len(data)  # type: ignore[union-attr]
            return
        self.body_buffer.append(data)
        self.buffered += len(data)
        if self.buffered > MAX_BUFFERED_BODY:
            self._pause(BUFFER_FULL)

    def _request_end(self) -> None:
        self.req_done = True
        if self.applet is not None:
            self.deadline = clock.now + ANSWER_TIMEOUT + 1.0  # the applet's own limit first
            self.applet.end()
            return
        if self.head.framing == h1.CHUNKED:  # type: ignore[union-attr]
            self._send_body(h1.LAST_CHUNK)
        if self.phase == EXCHANGE:
            if self.resp_done:
                self._finish_exchange()
            elif not self.resp_started:
                self.deadline = clock.now + self.backend.timeouts.server  # type: ignore[union-attr]

    def _request_error(self) -> None:
        self.frontend.counters.w[EREQ] += 1
        if self.resp_started:
            self._abort()
        else:
            self._reply(400)

    # -- choosing and reaching a server -------------------------------------------------

    def _dispatch(self, exclude: Server | None) -> None:
        backend = self.backend
        sticky = self.sticky
        if sticky is not None and sticky is not exclude and sticky.persistable:
            server: Server | None = sticky  # persistence wins over balancing, even draining
        else:
            context = Context(self.client_ip, None, self.head)
            server = backend.pick(context, exclude)  # type: ignore[union-attr]
            if server is None and exclude is not None and exclude.selectable:
                server = exclude  # a redispatch with nowhere else to go
        self._assign(server)

    def _assign(self, server: Server | None) -> None:
        """Send the request to `server`: now, or once the master grants a slot on it
        (maxconn); None: no server is usable, so hold or answer 503."""
        backend = self.backend
        if self.queue_id or self.slot is not None:
            self._release_slot()
        if server is None:
            if backend.holds and not self.frontend.worker.queue.alone:  # type: ignore[union-attr]
                self._hold()
            else:
                self._reply(503, "SC")  # no server is usable
            return
        if server.maxconn > 0:  # a limited server: the master hands out its slots
            self.t_queued = monotonic()
            if self.times is not None:
                self.times.queued = self.t_queued
            self.phase = QUEUED
            self.deadline = clock.now + backend.timeouts.queue  # type: ignore[union-attr]
            self.queue_id = self.frontend.worker.queue.acquire(
                backend, server, server is self.sticky, self._granted, self.resume  # type: ignore[arg-type]
            )
            self.resume = None
            return
        self._use(server)

    def _hold(self) -> None:
        """hold-when-down: no server is usable, so wait in the backend's queue (kept by the
        master, lb.queue) until one is, or `timeout queue`."""
        if self.t_queued < 0:
            self.t_queued = monotonic()
        if self.times is not None and self.times.queued < 0:
            self.times.queued = self.t_queued
        self.phase = QUEUED
        self.deadline = clock.now + self.backend.timeouts.queue  # type: ignore[union-attr]
        self.queue_id = self.frontend.worker.queue.acquire(
            self.backend, None, False, self._granted, self.resume  # type: ignore[arg-type]
        )
        self.resume = None

    def _granted(self, server: Server | None) -> None:
        self.queue_id = 0
        now = monotonic()
        if self.t_queued >= 0:
            self.q_secs = now - self.t_queued
        if self.times is not None:
            self.times.granted = now
        if server is None:
            self._reply(503, "sQ")  # its queue is full
            return
        self.slot = server
        self._use(server)

    def _release_slot(self) -> None:
        if self.queue_id:
            self.frontend.worker.queue.cancel(self.queue_id)
            self.queue_id = 0
        if self.slot is not None:
            self.frontend.worker.queue.release(self.slot)
            self.slot = None

    def _use(self, server: Server) -> None:
        self.server = server
        counters = server.counters
        counters.w[LBTOT] += 1
        if self.stick_key is not None:
            server.backend.stick.learn(self.stick_key, server.name)  # type: ignore[union-attr]
        counters.w[LASTSESS] = int(clock.now)  # (CLOCK_MONOTONIC: one clock for all)
        conn = self.pool.take(server)
        if conn is not None:
            counters.w[REUSE] += 1
            self.t_connect = -1.0  # a pooled connection: no connect time
            self._attach(conn)
            return
        counters.w[CONNECT] += 1
        self.phase = CONNECTING
        self.t_connect = monotonic()
        if self.times is not None:
            self.times.connect = self.t_connect
        self.deadline = clock.now + self.backend.timeouts.connect  # type: ignore[union-attr]
        self.connect_task = asyncio.get_running_loop().create_task(self._connect(server))

    async def _connect(self, server: Server) -> None:
        worker = self.frontend.worker
        try:
            # TLS servers (ssl: true) get their context and name (lb.tls.client); both are
            # None for the others. A failed handshake is a failed connect: SSLError is an
            # OSError, and `timeout connect` covers the handshake too, as in HAProxy.
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: ServerConnection(server, worker.pool, self.frontend.max_head),
                server.host,
                server.port,
                ssl=server.tls,
                server_hostname=server.sni,
            )
        except OSError:
            self.connect_task = None
            if self.phase == CONNECTING:
                self._connect_failed()
            return
        self.connect_task = None
        if self.phase == CONNECTING and self.server is server:
            self._attach(conn)  # type: ignore[arg-type]
        else:
            worker.pool.give(conn)  # type: ignore[arg-type]

    def _connect_failed(self) -> None:
        """A connect failed or timed out: retry (lb.retry), or give up with a 503."""
        task = self.connect_task
        if task is not None:
            self.connect_task = None
            task.cancel()
        server = self.server
        server.counters.w[ECON] += 1  # type: ignore[union-attr]
        if not self._retry(CONN_FAILURE):
            self._reply(503, "SC")

    def _retry(self, kind: str | int) -> bool:
        """Send the request again after a failure of `kind` (a retry-on word or a status),
        if the backend's retry-on covers it, retries are left, and the request can still be
        replayed: every byte sent is kept and no byte of answer reached the client. True
        when a retry is underway."""
        backend = self.backend
        policy = backend.retry  # type: ignore[union-attr]
        if self.retries_left <= 0 or kind not in policy.on or self.resp_started or self.touched:
            return False
        if kind != CONN_FAILURE and not (
            self.l7_retry and self.kept is not None
            and policy.replays(self.head.method, self.req_done)  # type: ignore[union-attr]
        ):
            return False
        server = self.server
        assert server is not None
        self.retries_left -= 1
        if self.times is not None:
            self.times.retries += 1
        server.counters.w[WRETR] += 1
        if self.failed is None:
            self.failed = []
        self.failed.append(server)
        self._rewind()
        if policy.redispatch:
            # Another server: when the interval says so or this one is no longer usable,
            # and at once when nothing binds the request to this one, as HAProxy does; but
            # only to one that has not failed it yet, or a dead backend would burn every
            # retry in a millisecond.
            usable = server.persistable if server is self.sticky else server.selectable
            if policy.moves(self.retries_left) or not usable:
                other = self._untried(server)
                if other is not None or not usable:
                    self._redispatch(other)
                    return True
            elif server is not self.sticky and not policy.pinning:
                other = self._untried(server)
                # (not from an active server to a backup one: backups wait until no
                # active server is UP, which this one still is)
                if other is not None and (server.cfg.backup or not other.cfg.backup):
                    self._redispatch(other)
                    return True
        if policy.turnaround > 0:
            # Back to the server that failed, but not at once: one that refuses or drops
            # requests may be restarting, or about to be marked down by its health checks.
            self.phase = TURNAROUND
            self.deadline = clock.now + policy.turnaround
        else:
            self._use(server)
        return True

    def _redispatch(self, server: Server | None) -> None:
        """The retry goes to `server` (None: none is usable: hold or 503)."""
        failed = self.server
        failed.counters.w[WREDIS] += 1  # type: ignore[union-attr]
        if self.times is not None:
            self.times.redispatched = True
        self._assign(server)

    def _untried(self, server: Server) -> Server | None:
        """A usable server, other than `server`, that has not failed this request."""
        backend = self.backend
        failed = self.failed or ()
        candidate = backend.pick(Context(self.client_ip, None, self.head), server)  # type: ignore[union-attr]
        if candidate is None or candidate not in failed:
            return candidate
        others = [s for s in backend.servers if s.selectable and s not in failed]  # type: ignore[union-attr]
        return min(others, key=lambda s: s.cfg.backup, default=None)

    def _rewind(self) -> None:
        """Back to before the request was sent: the server connection goes, and the body
        sent on it is to be sent again."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.session = None
            self.server.closed()  # type: ignore[union-attr]
            conn.transport.close()
        self.server_paused = False
        self._unpause(SERVER_FULL)
        if self.times is not None:
            self.times.sent = -1.0  # Tc and Tr are the next attempt's
        kept = self.kept
        if kept:
            self.body_buffer[:0] = kept
            self.buffered += self.kept_size
        self.kept = []
        self.kept_size = 0

    def _keep(self, sent: list[bytes]) -> None:
        """Keep body bytes sent to the server for a replay, while the backend's
        retry-buffer holds them."""
        kept = self.kept
        if kept is None:
            return
        size = self.kept_size + sum(map(len, sent))
        if size > self.backend.retry.buffer:  # type: ignore[union-attr]
            self.kept = None
            return
        kept += sent
        self.kept_size = size

    def _attach(self, conn: ServerConnection) -> None:
        self.conn = conn
        conn.session = self
        conn.received = False
        conn.reader.expect(self.head.method)  # type: ignore[union-attr]
        self.phase = EXCHANGE
        server = self.server
        server.opened()  # type: ignore[union-attr]
        counters = server.counters  # type: ignore[union-attr]
        counters.w[STOT] += 1
        counters.w[REQ_TOT] += 1
        if self.body_buffer:
            data = b"".join([self.head_bytes, *self.body_buffer])
            self._keep(self.body_buffer)
            self.body_buffer = []
            self.buffered = 0
            self._unpause(BUFFER_FULL)
        else:
            data = self.head_bytes
        conn.transport.write(data)
        counters.w[BIN] += len(data)
        self.t_sent = monotonic()
        if self.times is not None:
            self.times.sent = self.t_sent
            if self.times.connect < 0:
                self.times.connect = self.times.sent  # a pooled connection: no connect
        if self.req_done:
            self.deadline = clock.now + self.backend.timeouts.server  # type: ignore[union-attr]
        else:
            self.deadline = clock.now + self.frontend.timeouts.client

    def server_backpressure(self, full: bool) -> None:
        if full:
            self._pause(SERVER_FULL)
        else:
            self._unpause(SERVER_FULL)

    def _drop_server(self, reusable: bool) -> None:
        """Let go of the server connection: back to the pool, or closed."""
        task = self.connect_task
        if task is not None:
            self.connect_task = None
            task.cancel()
        if self.queue_id or self.slot is not None:
            self._release_slot()
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        conn.session = None
        self.server.closed()  # type: ignore[union-attr]
        if reusable:
            if self.server_paused:
                conn.transport.resume_reading()
            self.pool.give(conn)
        else:
            conn.transport.close()

    # -- response side ----------------------------------------------------------------

    def response_events(self, events: list[tuple[int, object]]) -> None:
        # What goes to the client is gathered and written once: one send per answer.
        out: list[bytes] = []
        for kind, value in events:
            if kind == h1.DATA:
                out.append(chunk(value) if self.resp_framing == h1.CHUNKED else value)  # type: ignore[arg-type]
                self.resp_left -= len(value)  # type: ignore[arg-type]
            elif kind == h1.HEAD:
                status = value.status  # type: ignore[attr-defined]
                if status in self.backend.retry.statuses and self._retry(status):  # type: ignore[union-attr]
                    return  # this answer is dropped with its connection
                try:
                    out.append(self._response_head(value))  # type: ignore[arg-type]
                except BadResponse:
                    self._response_error()
                    return
            elif kind == h1.END:
                if self.interim:
                    self.interim = False
                    continue
                if self.resp_framing == h1.CHUNKED:
                    out.append(h1.LAST_CHUNK)
                self._send(b"".join(out))
                out = []
                self._response_end()
            elif kind == h1.UPGRADE:
                self._send(b"".join(out))
                self._start_tunnel(value)  # type: ignore[arg-type]
                return
            else:
                self._send(b"".join(out))
                self._response_error()
                return
            if self.phase != EXCHANGE:
                return
        if out:
            self._send(b"".join(out))
        if self.resp_started:
            self.deadline = clock.now + self.frontend.timeouts.client
            if self.frontend.stopping:
                self.close_if_idle()  # a response still streaming may move now

    def _send(self, data: bytes) -> None:
        """Answer bytes to the client, counted."""
        self.transport.write(data)
        size = len(data)
        self.fe_counters.w[BOUT] += size
        counters = self.server.counters  # type: ignore[union-attr]
        counters.w[BOUT] += size
        if self.times is not None:
            self.times.bytes_out += size

    def _response_head(self, head: h1.ResponseHead) -> bytes:
        """The head to send to the client, and the framing its body will take."""
        request = self.head
        client_version = "1.1" if request.version == "1.1" else "1.0"  # type: ignore[union-attr]
        if head.status < 200:
            if head.status == 101 and not request.upgrade:  # type: ignore[union-attr]
                raise BadResponse("101 to a request that asked for no upgrade")
            # Interim answers (100 Continue, 101 before the tunnel) have no end of their own.
            self.interim = True
            self.touched = True
            if client_version == "1.1":
                return response_head_bytes(head, h1.NO_BODY, True, "1.1")
            return b""  # HTTP/1.0 clients get no interim answers
        self.resp_started = True
        self.resp_left = head.length if head.framing == h1.LENGTH else -1
        self.server_keep_alive = head.keep_alive
        status = head.status
        kind = status // 100 if status < 600 else 0
        if kind == 4 and self.tracked is not None:
            self.tracked.error()  # http_err_cnt / http_err_rate of its stick counters
        self.fe_counters.w[HRSP_OTHER + kind] += 1
        counters = self.server.counters  # type: ignore[union-attr]
        counters.w[HRSP_OTHER + kind] += 1
        self.t_resp = monotonic()
        if self.times is not None:
            self.times.response = self.t_resp
            self.times.status = head.status
        cookie = self.backend.cfg.cookie  # type: ignore[union-attr]
        server = self.server
        if cookie is not None and server.cookie:  # type: ignore[union-attr]
            has_it = self.cookie_server is server
            persist.response_cookie(head, cookie, server.cookie, has_it)  # type: ignore[union-attr]
        framing = head.framing
        self.server_until_close = framing == h1.UNTIL_CLOSE
        keep_alive = not self.close_after
        if framing == h1.UNTIL_CLOSE or (framing == h1.CHUNKED and client_version == "1.0"):
            if client_version == "1.1":
                framing = h1.CHUNKED  # keeps the client connection alive
            else:
                framing = h1.UNTIL_CLOSE
                keep_alive = False
        if not keep_alive:
            self.close_after = True
        self.resp_framing = framing
        return response_head_bytes(head, framing, keep_alive, client_version)

    def _response_end(self) -> None:
        self.resp_done = True
        if self.req_done:
            self._finish_exchange()
        else:
            # Answered before the request was whole: this server connection is spent,
            # and the client's connection closes once the answer is out.
            self._drop_server(reusable=False)
            self._close()

    def _response_error(self) -> None:
        self.server.counters.w[ERESP] += 1  # type: ignore[union-attr]
        if self._retry(JUNK_RESPONSE):
            return
        if self.resp_started:
            self._abort("SD")
        else:
            self._reply(502, "PH")

    def server_closed(self, conn: ServerConnection) -> None:
        """The server ended its connection (EOF or error) while serving this session."""
        if conn is not self.conn or self.phase != EXCHANGE:
            return
        if self.resp_started:
            if self.server_until_close:  # the close is the end of this answer
                self.server_keep_alive = False
                if self.resp_framing == h1.CHUNKED:
                    self.transport.write(h1.LAST_CHUNK)
                self._response_end()
            else:
                self._abort("SD")
            return
        if (
            conn.reused and not conn.received and self.kept is not None and not self.touched
            and self.backend.retry.replays(self.head.method, self.req_done)  # type: ignore[union-attr]
        ):
            # A pooled connection the server closed as the request went out (it had just
            # timed it out): not a failure of the server, so no retry is counted.
            self._rewind()
            self._use(self.server)  # type: ignore[arg-type]
            return
        if not self._retry(JUNK_RESPONSE if conn.received else EMPTY_RESPONSE):
            self._reply(502, "SH")

    # -- ending ---------------------------------------------------------------------

    def _finish_exchange(self) -> None:
        if self.t_resp >= 0:
            self._count_times()
        if self.tracked is not None:
            self.tracked.end_request()
        if self.times is not None:
            self._log(self.times.status, "--")
        self._drop_server(reusable=self.server_keep_alive and not self.server_close)
        self._reset_exchange()
        if self.close_after:
            self._close()
            return
        self.phase = IDLE
        self.deadline = clock.now + self.frontend.timeouts.http_keep_alive
        pending = self.pending
        if pending is not None:
            self.pending = None
            self._unpause(PIPELINE)
            self._process(pending)
        elif self.frontend.stopping and not self.reader.in_head:
            self._leave()

    def _count_times(self) -> None:
        """Add this request's times (ms) to its server's: queue, connect, response, total
        (show stat's qtime, ctime, rtime, ttime and their maxima)."""
        counters = self.server.counters  # type: ignore[union-attr]
        queue = int(self.q_secs * 1000)
        connect = int((self.t_sent - self.t_connect) * 1000) if self.t_connect >= 0 else 0
        response = int((self.t_resp - self.t_sent) * 1000)
        total = int((monotonic() - self.t_head) * 1000)
        counters.w[TIMED] += 1
        counters.w[QTIME_SUM] += queue
        counters.w[CTIME_SUM] += connect
        counters.w[RTIME_SUM] += response
        counters.w[TTIME_SUM] += total
        if queue > counters.w[QTIME_MAX]:
            counters.w[QTIME_MAX] = queue
        if connect > counters.w[CTIME_MAX]:
            counters.w[CTIME_MAX] = connect
        if response > counters.w[RTIME_MAX]:
            counters.w[RTIME_MAX] = response
        if total > counters.w[TTIME_MAX]:
            counters.w[TTIME_MAX] = total

    def describe(self) -> dict[str, object]:
        """This connection, for `show sess`."""
        if self.transport is None:  # a tunnel adopted from an older generation
            peer = self.tunnel.peer_address() if self.tunnel is not None else ("", 0)
        else:
            peer = self.transport.get_extra_info("peername") or ("", 0)
        return {
            "id": id(self), "src": f"{peer[0]}:{peer[1]}", "fe": self.frontend.name,
            "be": self.backend.name if self.backend is not None else "<NONE>",
            "srv": self.server.name if self.server is not None else "<none>",
            "age": time.monotonic() - self.begin, "state": _PHASES[self.phase],
        }

    def kill(self) -> None:
        """`shutdown sessions server`: end this connection now."""
        if self.tunnel is not None:
            self.tunnel.close(abort=True)
        else:
            self._abort("KD")

    def close_if_idle(self) -> None:
        """Soft stop: an idle keep-alive connection leaves now (handed over to the next
        generation, or closed), a busy one after its answer; a tunnel moves whole. A TLS
        connection cannot move (its TLS state is in this process): it is served here,
        its next answer says `Connection: close`, and an idle one closes at
        `timeout http-keep-alive` as usual (closing it now could cut a request on its way)."""
        if self.applet is not None:  # being answered here: then it closes
            return
        if self.ssl is not None and self.phase != TUNNEL and self.frontend.worker.handing_over:
            self.stays = "TLS connection"
            if self.held is not None:  # over the limit: no place frees in a stopping worker
                self.frontend.admit_held(self)
            elif self.phase != IDLE and not self.resp_started:
                self.close_after = True  # its answer says so (a later one: _request_head)
            return
        if self.phase == TUNNEL:
            if self.tunnel is not None and not self.tunnel.closed:
                handover.leave(self, "http", {"peer": self.tunnel.peer_address()})
            return
        if self.phase == EXCHANGE and self.resp_started and self.frontend.worker.handing_over:
            handover.leave_stream(self)  # a response being relayed: now, or at a simple point
            return
        if self.held is not None:
            self._leave()
        elif self.phase == IDLE and self.pending is None and not self.reader.in_head:
            self._leave()
        elif not self.frontend.worker.handing_over:
            self.close_after = True
        elif self.phase == QUEUED and self._movable():
            # Waiting for a server slot: the request moves too, with what was read of it,
            # and waits there for its turn.
            data = self._request_bytes()
            ticket = [os.getpid(), self.queue_id]
            self.frontend.worker.queue.forget(self.queue_id)  # its place goes with it
            self.queue_id = 0
            self.times = None
            self._leave(data, ticket)

    def _movable(self) -> bool:
        """Can this queued request be given, as bytes, to another process? Not when more
        was read than it (pipelined), nor when its chunked body is only partly read (the
        rest would continue a chunk that was already re-framed)."""
        head = self.head
        return self.pending is None and (self.req_done or head.framing != h1.CHUNKED)  # type: ignore[union-attr]

    def _request_bytes(self) -> bytes:
        """The current request as the client sent it, with the body read so far."""
        head = self.head
        assert head is not None
        lines = [b"%s %s HTTP/%s\r\n" % (head.method, head.target, head.version.encode())]
        lines += self.received
        lines += [b"%s: %s\r\n" % (name, value) for name, value in head.hop]
        lines.append(b"\r\n")
        return b"".join(lines) + b"".join(self.body_buffer)

    def _leave(self, data: bytes = b"", ticket: list[int] | None = None) -> None:
        """Between requests on a stopping worker: hand the connection, and `data` read
        from it, to the next generation when there is one, else close it."""
        frontend = self.frontend
        if self.ssl is not None and frontend.worker.handing_over:  # see close_if_idle
            self.stays = "TLS connection"
            return
        if not frontend.worker.handing_over:
            self._close()
            return
        if self.held is not None:
            data = b"".join(self.held)
        self.let_go()
        frontend.worker.hand_over(frontend.name, self.transport, data, ticket)  # before the worker
        frontend.closed(self)  # may see it has nothing left and exit

    def let_go(self) -> None:
        """This process is done with the connection: another one serves it now."""
        self.phase = CLOSED
        clock.watched.discard(self)

    def resume_stream(self, state: dict[str, Any], backend: Backend, server: Server) -> None:
        """Take up a response an older generation was relaying (lb.handover.send_stream),
        before the connections are attached (`attach_moved`)."""
        self.phase = EXCHANGE
        self.backend, self.server = backend, server
        self.client_ip = state["peer"][0].encode()
        self.begin = state["begin"]
        self.slot = server if state["slot"] else None
        self.req_done = self.resp_started = True
        self.kept = None  # never replayed: the client has part of the answer
        self.resp_framing, self.resp_left = state["client_framing"], state["left"]
        self.server_keep_alive, self.server_until_close = state["keep_alive"], state["until_close"]
        self.close_after, self.server_close = state["close_after"], state["server_close"]
        head = self.head = h1.RequestHead()
        method, target, head.version = state["request"]
        head.method, head.target = method.encode("latin-1"), target.encode("latin-1")
        if state["times"] is not None and self.frontend.request_log is not None:
            self.times = handover.times_from(state["times"])

    def attach_moved(
        self, server_transport: asyncio.Transport, held: Held, state: dict[str, Any]
    ) -> None:
        """The server connection of a moved response, its client connection made: the
        body goes on from where the older generation left it."""
        if self.phase != EXCHANGE:  # the client left meanwhile
            server_transport.close()
            return
        server = self.server
        assert server is not None
        frontend = self.frontend
        conn = ServerConnection(server, frontend.worker.pool, frontend.max_head)
        conn.transport = server_transport
        conn.reader.resume_body(state["framing"], state["left"])
        conn.session, conn.received, self.conn = self, True, conn
        server.opened()
        server_transport.set_protocol(conn)
        if frontend.connection_rules is not None:
            frontend.connected(self, state["peer"][0], True)  # its stick counters, again
        self.deadline = clock.now + frontend.timeouts.client
        clock.watched.add(self)
        if held.early:
            conn.data_received(b"".join(held.early))
        if held.eof:
            conn.eof_received()
        # Read on (also when the answer ended: an idle pooled connection reads, to see
        # the server close it), unless the client is the one that cannot keep up.
        if not server_transport.is_closing() and not (self.conn is conn and self.server_paused):
            server_transport.resume_reading()
        if frontend.stopping:
            self.close_if_idle()

    def _start_tunnel(self, server_bytes: bytes) -> None:
        """The server switched protocols: from here on pylb relays bytes (lb.tunnel), on
        the sockets themselves once both transports have written what they hold; or,
        when either side is TLS, through the transports (lb.streamtunnel), at once: what
        they hold goes out first."""
        conn = self.conn
        assert conn is not None
        self.conn = None
        conn.session = None
        self.phase = TUNNEL
        clock.watched.discard(self)
        client, server = self.transport, conn.transport
        client.pause_reading()
        server.pause_reading()
        client_eof = any(kind == CLIENT_EOF for kind, _ in self.pending or ())
        self.pending = None
        if is_tls(client) or is_tls(server):
            self._relay(client, server, server_bytes, client_eof)
        elif client.get_write_buffer_size() or server.get_write_buffer_size():
            asyncio.get_running_loop().create_task(
                self._tunnel_when_drained(client, server, server_bytes, client_eof)
            )
        else:
            self._relay(take_socket(client), take_socket(server), server_bytes, client_eof)

    async def _tunnel_when_drained(
        self,
        client: asyncio.Transport,
        server: asyncio.Transport,
        server_bytes: bytes,
        client_eof: bool,
    ) -> None:
        timeout = self.backend.timeouts.tunnel  # type: ignore[union-attr]
        try:
            ready = await asyncio.wait_for(
                asyncio.gather(drained(client), drained(server)), timeout
            )
        except TimeoutError:
            ready = [False]
        if all(ready) and not client.is_closing() and not server.is_closing():
            self._relay(take_socket(client), take_socket(server), server_bytes, client_eof)
            return
        client.abort()
        server.abort()
        self._tunnel_closed(None)

    def _relay(
        self,
        client: socket.socket | asyncio.Transport,
        server: socket.socket | asyncio.Transport,
        server_bytes: bytes,
        client_eof: bool,
    ) -> None:
        """Relay between the sockets (lb.tunnel), or the transports (lb.streamtunnel)."""
        timeout = self.backend.timeouts.tunnel  # type: ignore[union-attr]
        tunnel: Tunnel | TransportTunnel
        if isinstance(client, socket.socket) and isinstance(server, socket.socket):
            tunnel = Tunnel(client, server, timeout, on_close=self._tunnel_closed)
        else:
            assert not isinstance(client, socket.socket)
            assert not isinstance(server, socket.socket)
            tunnel = TransportTunnel(client, server, timeout, on_close=self._tunnel_closed)
        self.tunnel = tunnel
        tunnel.send(0, server_bytes)
        tunnel.send(1, self.tunnel_bytes)
        if client_eof:
            tunnel.end_of(0)
        if self.frontend.stopping:  # the 101 came as this worker stopped: move it now
            self.close_if_idle()

    def resume_tunnel(
        self, state: dict[str, Any], fds: list[int], backend: Backend, server: Server
    ) -> None:
        """Go on with a tunnel an older generation relayed (see lb.handover)."""
        self.phase = TUNNEL
        self.backend, self.server = backend, server
        self.client_ip = state["peer"][0].encode()
        self.begin = state["begin"]
        self.slot = server if state["slot"] else None
        server.opened()
        frontend = self.frontend
        if frontend.connection_rules is not None:
            frontend.connected(self, state["peer"][0], True)  # its stick counters, again
        self.tunnel = Tunnel.resume(fds, backend.timeouts.tunnel, self._tunnel_closed, state)
        if frontend.stopping:
            self.close_if_idle()

    def _tunnel_closed(self, tunnel: Tunnel | None) -> None:
        self._release_slot()
        if tunnel is not None:
            handover.count_bytes(self, tunnel)
        self.server.closed()  # type: ignore[union-attr]
        self.frontend.closed(self)

    def _answer(self, response: bytes) -> None:
        """A whole response a rule decided (deny, redirect, return, monitor-uri)."""
        status = int(response[9:12]) if len(response) >= 12 else 0
        self.frontend.counters.w[INTERCEPTED] += 1
        if status == 403:
            self.frontend.counters.w[DREQ] += 1
        self._reply(status, "PR", response)

    def answer_locally(self, status: int, response: bytes) -> None:
        """The answer to a request pylb answers itself (lb.applet); then the connection
        closes."""
        self.frontend.counters.w[INTERCEPTED] += 1
        if self.phase != CLOSED:
            self._reply(status, "PR", response)

    def _reply(self, status: int, termination: str = "PR", page: bytes | None = None) -> None:
        """Answer with one of pylb's own pages (an `errorfile` when the frontend has one
        for that status), then close; `termination` is the log's termination state."""
        self._drop_server(reusable=False)
        rules = self.frontend.rules
        if page is None:
            page = (rules.error_page(status) if rules is not None else None) or PAGES[status]
        tracked = self.tracked
        if tracked is not None:  # counted before the client can see the answer
            tracked.begin_request()  # a request that failed before its head counts too
            if 400 <= status < 500 and not self.resp_started:
                tracked.error()
            tracked.end_request()
        if self.resp_started or self.transport.is_closing():
            page = b""
        if page:
            self.transport.write(page)
            self.frontend.counters.response(status)
            self.frontend.counters.w[BOUT] += len(page)
        if self.frontend.request_log is not None:
            if self.times is None:
                self.times = httplog.Times(self.begin)
            self.times.bytes_out += len(page)
            self._log(status, termination)
        self._close()

    def _log(self, status: int, termination: str) -> None:
        """One line in the frontend's request log, in HAProxy's HTTP format."""
        times = self.times
        self.times = None
        if times is not None:
            self.frontend.request_log.write(  # type: ignore[union-attr]
                httplog.http_record(self, times, status, termination)
            )

    def _close(self) -> None:
        self.phase = CLOSED
        clock.watched.discard(self)
        self.transport.close()

    def _abort(self, termination: str = "CD") -> None:
        server = self.server
        if server is not None:
            if termination[0] in "Cc":
                server.counters.w[CLI_ABRT] += 1
            else:
                server.counters.w[SRV_ABRT] += 1
        if self.times is not None:
            self._log(self.times.status, termination)
        if self.tracked is not None:
            self.tracked.end_request()
        self._drop_server(reusable=False)
        self.phase = CLOSED
        clock.watched.discard(self)
        self.transport.abort()


class _RuleView:
    """A request as the rules engine (lb.rules.Request) sees it."""

    __slots__ = ("client_ip", "head", "ssl")

    def __init__(self, client_ip: bytes, head: h1.RequestHead,
                 tls: ssl.SSLObject | None) -> None:
        self.client_ip = client_ip.decode()
        self.head = head
        self.ssl = tls  # the connection's TLS (ssl_fc...), None for a plain one

    @property
    def method(self) -> str:
        return self.head.method.decode("latin-1")

    @property
    def target(self) -> str:
        return self.head.target.decode("latin-1")

    def header(self, name: str) -> str | None:
        value = self.head.header(name.encode("latin-1"))
        return value.decode("latin-1") if value is not None else None

    def cookie(self, name: str) -> str | None:
        value = persist.cookie_value(self.head, name.encode("latin-1"))
        return value.decode("latin-1") if value is not None else None


def _edit_headers(head: h1.RequestHead, remove: list[str], add: list[tuple[str, str]]) -> None:
    """Apply a rule's del-header and set-header to the head pylb forwards."""
    gone = {name.lower().encode("latin-1") for name in remove}
    head.forward = [line for line in head.forward if line.split(b":", 1)[0].lower() not in gone]
    for name, value in add:
        head.forward.append(f"{name}: {value}\r\n".encode("latin-1"))
    head.forwarded_for = next(
        (i for i, line in enumerate(head.forward) if line[:16].lower() == b"x-forwarded-for:"), -1
    )


def _without_failed_request(events: list[tuple[int, object]]) -> list[tuple[int, object]]:
    """Events ending in an error, less what the failing request brought in the same read:
    none of its bytes reach a server when the error comes with its head."""
    keep = len(events) - 1
    while keep > 0 and events[keep - 1][0] != h1.END:
        keep -= 1
    if keep == 0 and events[0][0] != h1.HEAD:
        return events  # the failing request began in an earlier read: it is already underway
    return events[:keep] + events[-1:]
