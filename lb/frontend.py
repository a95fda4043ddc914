"""A frontend as one worker runs it: its listeners, its sessions, its connection limits.

Limits (`maxconn` of the frontend, and the global one) hold for pylb as a whole: every
worker counts its admitted connections in its own column of shared memory and sums the
columns. At the limit a worker stops accepting, so new connections wait in the kernel
backlog; the few it accepted in the same instant wait, unread, in `held` until a place
frees. Places freed by another worker are noticed on the next tick (`check_limits`).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import socket
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any

from lb import config, httplog
from lb.applet import WebService
from lb.backend import Backend
from lb.counters import DCON, DREQ, SSL_CONNS, SSL_REUSED, STOT, Counters
from lb.httpproxy import HttpSession
from lb.log import log
from lb.rules import FrontendRules
from lb.shared import (
    FE_DISABLED,
    FE_FIELDS,
    FE_MAXCONN,
    FE_SMAX,
    GLOBAL_FIELDS,
    GLOBAL_MAXCONN,
)
from lb.tcpproxy import TcpSession
from lb.timer import clock
from lb.tls.context import BindContexts
from lb.tunnel import Held, reset_on_close

if TYPE_CHECKING:
    from lb.worker import Worker


def _has_rules(cfg: config.Frontend) -> bool:
    return bool(
        cfg.acl or cfg.http_request or cfg.use_backend or cfg.monitor_uri or cfg.errorfiles
    )


class Frontend:
    def __init__(
        self, cfg: config.Frontend, backends: dict[str, Backend], worker: Worker
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.worker = worker
        self.timeouts = cfg.timeouts
        self.max_head = worker.config.global_.max_header_size
        self.default_backend = backends.get(cfg.default_backend or "")
        self.sessions: set[Any] = set()
        self.held: deque[Any] = deque()  # accepted over the limit: waiting, unread
        self.request_log = httplog.RequestLog(cfg.log) if cfg.log else None
        config_ = worker.config
        compiled = (
            FrontendRules.compile(cfg, config_.maps, backends=config_.backends)
            if _has_rules(cfg) or cfg.tcp_request_connection else None
        )
        self.rules = compiled if _has_rules(cfg) else None  # per HTTP request
        # tcp-request connection, once per connection; None: nothing to do
        self.connection_rules = (
            compiled if compiled is not None and compiled.has_connection_rules else None
        )
        if self.connection_rules is not None or any(
            isinstance(rule, config.model.TrackRule) for rule in cfg.http_request
        ):
            # Stick tables outlive this worker: a worker that exits with connections
            # still open (hard-stop-after, stop) lets go of their conn_cur first.
            atexit.register(self.release_counters)
        self.tls_open: set[Any] = set()  # the sessions of client connections over TLS
        # its stats page and Prometheus endpoint, answered by pylb itself (lb.applet)
        self.web = (
            WebService(self, cfg, worker.master_link)
            if cfg.stats is not None or cfg.prometheus is not None else None
        )
        self.stopping = False
        self.sockets: list[socket.socket] = []
        self.ssl: list[ssl.SSLContext | None] = []  # each socket's TLS context; None: plain
        self.tls = {
            str(bind.address): BindContexts(bind, worker.certs, worker.ticket_keys)
            for bind in cfg.tls
        }
        # TLS connections accepted and still in their handshake (no session sees them
        # yet): (deadline, session); a stopping worker waits for them.
        self.handshakes: deque[tuple[float, Any]] = deque()
        self._servers: list[asyncio.Server] = []
        self._accepting = False
        self._starting = False
        session = HttpSession if cfg.mode == "http" else TcpSession
        self._session = session
        self._factory = functools.partial(session, self)
        self._adopted_factory = functools.partial(session, self, adopted=True)
        words = worker.shared.words
        layout = worker.shared.layout
        self._words = words
        base = layout.frontends[cfg.name]
        self._maxconn = base + FE_MAXCONN
        self._disabled = base + FE_DISABLED
        self._smax = base + FE_SMAX
        self._first = base + FE_FIELDS
        self._mine = self._first + worker.slot
        self._tls_mine = self._first + layout.slots + worker.slot  # its TLS connections
        self._global_mine = GLOBAL_FIELDS + worker.slot
        self._slots = layout.slots
        first_block = layout.frontend_counters[cfg.name]
        self.counters = Counters(words, layout.block(first_block, worker.slot))
        if self.request_log is not None:
            self.request_log.counters = self.counters

    # -- accepting ------------------------------------------------------------------

    def add_socket(self, sock: socket.socket, address: str) -> None:
        """A listening socket from the master, for the bind at `address`."""
        self.sockets.append(sock)
        contexts = self.tls.get(address)
        self.ssl.append(contexts.front if contexts is not None else None)

    def _tls_session(self, adopted: bool = False) -> Any:
        """A session for a TLS connection, which begins once its handshake succeeds."""
        session = self._session(self, adopted)
        now = clock.now
        handshakes = self.handshakes
        while handshakes and (handshakes[0][0] < now or handshakes[0][1].transport is not None):
            handshakes.popleft()
        handshakes.append((now + self.timeouts.client, session))
        return session

    def handshaking(self) -> int:
        """TLS handshakes under way (those not timed out yet)."""
        now = clock.now
        return sum(1 for deadline, s in self.handshakes if deadline >= now and s.transport is None)

    def _tls_args(self, context: ssl.SSLContext | None) -> dict[str, Any]:
        if context is None:
            return {}
        # `timeout client` also bounds the handshake, as in HAProxy
        return {"ssl": context, "ssl_handshake_timeout": self.timeouts.client}

    async def start(self) -> None:
        """Accept on every listening socket handed over by the master."""
        if self._accepting or self._starting or self.stopping:
            return
        self._starting = True
        loop = asyncio.get_running_loop()
        try:
            for sock, context in zip(self.sockets, self.ssl, strict=True):
                # uvloop takes ownership of the socket it serves: give it a duplicate, so
                # this worker can stop accepting and start again on the same socket.
                server = await loop.create_server(
                    self._factory if context is None else self._tls_session,
                    sock=sock.dup(), backlog=self.cfg.backlog, **self._tls_args(context)
                )
                self._servers.append(server)
        finally:
            self._starting = False
        self._accepting = True
        if not self._has_room():
            self.stop_accepting()

    def stop_accepting(self) -> None:
        self._accepting = False
        for server in self._servers:
            server.close()
        self._servers.clear()

    def close_listeners(self) -> None:
        """Stop accepting and close our descriptors of the listening sockets (the
        master's are gone): the port is free once every worker has done so. What waits
        in the accept queue is taken first."""
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        for sock, context in zip(self.sockets, self.ssl, strict=True):
            # Clients already in the kernel's accept queue sent their request to pylb: they
            # are served, not reset with the socket.
            sock.setblocking(False)  # as it is for uvloop already (the same open file)
            for _ in range(self.cfg.backlog):
                try:
                    conn, _addr = sock.accept()
                except OSError:  # nothing left waiting (EAGAIN), or any other reason
                    break
                loop.create_task(self.adopt(conn, b"", context=context))
            try:
                sock.close()
            except OSError:
                pass
        self.sockets.clear()
        self.ssl.clear()

    def soft_stop(self) -> None:
        self.stopping = True
        self.stop_accepting()
        # Queued requests leave in the order they were queued, to keep their turns.
        for session in sorted(self.sessions, key=lambda s: getattr(s, "queue_id", 0)):
            session.close_if_idle()

    async def adopt(
        self, sock: socket.socket, data: bytes, ticket: list[int] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        """Serve a connection an older generation handed over, with what it had read
        (and, for a request that waited in a queue, the ticket of its place there); or,
        with a TLS `context`, one accepted from a TLS bind's backlog."""
        sock.setblocking(False)
        factory = (
            self._adopted_factory if context is None
            else functools.partial(self._tls_session, True)
        )
        try:
            _, session = await asyncio.get_running_loop().connect_accepted_socket(
                factory, sock, **self._tls_args(context)
            )
        except OSError:
            sock.close()
            return
        if ticket is not None:
            session.resume = ticket
        if data:
            session.data_received(data)

    def adopt_tunnel(self, state: dict[str, Any], fds: list[int]) -> None:
        """Go on relaying a tunnel an older generation handed over (lb.handover). It was
        admitted there: it is counted in here whatever the limits say."""
        backend = self.worker.backends.get(state["be"])
        servers = backend.servers if backend is not None else ()
        server = next((s for s in servers if s.name == state["srv"]), None)
        if backend is None or server is None or state["mode"] != self.cfg.mode:
            # The old generation asked what we take (lb.handover.accepts): not expected.
            log.warning("tunnel for %s/%s not taken by frontend %s: closed",
                        state["be"], state["srv"], self.name)
            for fd in fds:
                os.close(fd)
            if state["slot"]:
                self.worker.queue.release_named(state["be"], state["srv"])
            return
        session = (HttpSession if self.cfg.mode == "http" else TcpSession)(self, adopted=True)
        self.sessions.add(session)
        self._count(1)
        if state.get("kind") == "stream":
            session.resume_stream(state, backend, server)
            asyncio.get_running_loop().create_task(self._attach_stream(session, state, fds))
        else:
            session.resume_tunnel(state, fds, backend, server)

    async def _attach_stream(self, session: HttpSession, state: dict[str, Any],
                             fds: list[int]) -> None:
        """The connections of a response moving in: the server's first, held unread,
        then the client's; then the session reads the server again."""
        loop = asyncio.get_running_loop()
        client, server = (socket.socket(fileno=fd) for fd in fds)
        try:
            server_transport, held = await loop.connect_accepted_socket(Held, server)
        except OSError:
            client.close()
            server.close()
            self._lost_before_attached(session)
            return
        try:
            await loop.connect_accepted_socket(lambda: session, client)
        except OSError:
            client.close()
            server_transport.close()
            self._lost_before_attached(session)
            return
        session.attach_moved(server_transport, held, state)  # type: ignore[arg-type]

    def _lost_before_attached(self, session: HttpSession) -> None:
        if session.slot is not None:
            self.worker.queue.release(session.slot)
            session.slot = None
        session.let_go()
        self.closed(session)

    # -- limits ---------------------------------------------------------------------

    def current(self) -> int:
        """Connections admitted by pylb as a whole on this frontend."""
        return sum(self._words[self._first : self._first + self._slots])

    def _has_room(self) -> bool:
        words = self._words
        if words[self._disabled]:
            return False
        return self.current() < words[self._maxconn] and (
            sum(words[GLOBAL_FIELDS : GLOBAL_FIELDS + self._slots]) < words[GLOBAL_MAXCONN]
        )

    def admit(self, session: Any) -> bool:
        """Count a new connection in, or hold it (False) when the limit is reached."""
        self.sessions.add(session)
        self.counters.w[STOT] += 1
        with self.worker.shared.limits_lock():
            if self.held or not self._has_room():
                self.held.append(session)
                self.stop_accepting()
                return False
            self._count(1)
            current = self.current()
            if current > self._words[self._smax]:  # under the lock: the exact maximum
                self._words[self._smax] = current
            full = not self._has_room()
        if full:
            self.stop_accepting()
        return True

    def _count(self, delta: int) -> None:
        self._words[self._mine] += delta
        self._words[self._global_mine] += delta

    def connected(self, session: Any, client_ip: str, adopted: bool) -> bool:
        """Run the tcp-request connection rules for a new connection (``connection_rules``
        is set): False when they reject it, and then it is closed at once with a reset,
        as HAProxy does, before anything is read. The stick counters it tracks go to
        ``session.tracked``; ``closed`` lets go of them."""
        accepted, session.tracked = self.connection_rules.connect(  # type: ignore[union-attr]
            client_ip, self.worker, adopted
        )
        if accepted:
            return True
        self.counters.w[STOT] += 1
        self.counters.w[DREQ] += 1  # (dreq counts them too, as pylb always did)
        self.counters.w[DCON] += 1
        transport = session.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            reset_on_close(sock)
        transport.abort()
        return False

    def release_counters(self) -> None:
        """Let go of the stick counters of every connection still open (the worker is
        exiting without closing them one by one)."""
        for session in list(self.sessions):
            tracked = session.tracked
            if tracked is not None:
                session.tracked = None
                tracked.close()

    def tls_opened(self, session: Any, tls: ssl.SSLObject | None) -> None:
        """A client connection's TLS handshake is done (``tls`` None: a plain connection);
        `closed` counts it out."""
        if tls is not None:
            self.tls_open.add(session)
            self._words[self._tls_mine] += 1
            self.counters.w[SSL_CONNS] += 1
            if tls.session_reused:
                self.counters.w[SSL_REUSED] += 1

    def closed(self, session: Any) -> None:
        if session in self.tls_open:
            self.tls_open.discard(session)
            self._words[self._tls_mine] -= 1
        tracked = session.tracked
        if tracked is not None:  # its stick counters, tracked for the connection or a request
            session.tracked = None
            tracked.close()
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        if session in self.held:
            self.held.remove(session)
        else:
            self._count(-1)
        self.check_limits()
        if self.stopping:
            self.worker.maybe_exit()

    def admit_held(self, session: Any) -> None:
        """Let a held connection in now, over the limits: a stopping worker accepts no
        more, and serves a connection it cannot hand over (TLS) itself."""
        if session in self.held:
            self.held.remove(session)
            self._count(1)
            session.admitted()

    def check_limits(self) -> None:
        """Let held connections in, and accept again, as far as the limits allow."""
        if self.stopping:
            return
        while self.held:
            with self.worker.shared.limits_lock():
                if not self._has_room():
                    break
                session = self.held.popleft()
                self._count(1)
            session.admitted()
        if self._accepting:
            if not self._has_room():
                self.stop_accepting()
        elif not self.held and self._has_room():
            asyncio.get_running_loop().create_task(self.start())
