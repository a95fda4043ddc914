"""A frontend as one worker runs it: its listeners, its sessions, its connection limits.

Limits (`maxconn` of the frontend, and the global one) hold for pylb as a whole: every
worker counts its admitted connections in its own column of shared memory and sums the
columns. At the limit a worker stops accepting, so new connections wait in the kernel
backlog; the few it accepted in the same instant wait, unread, in `held` until a place
frees. Places freed by another worker are noticed on the next tick (`check_limits`).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from lb import config, httplog
from lb.backend import Backend
from lb.counters import Counters
from lb.httpproxy import HttpSession
from lb.rules import FrontendRules
from lb.shared import (
    FE_DISABLED,
    FE_FIELDS,
    FE_MAXCONN,
    GLOBAL_FIELDS,
    GLOBAL_MAXCONN,
    MAX_SLOTS,
)
from lb.tcpproxy import TcpSession

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
        self.rules = (
            FrontendRules.compile(cfg, config_.maps, backends=config_.backends)
            if _has_rules(cfg) else None
        )
        self.counters = Counters()
        self.stopping = False
        self.sockets: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []
        self._accepting = False
        self._starting = False
        session = HttpSession if cfg.mode == "http" else TcpSession
        self._factory = functools.partial(session, self)
        words = worker.shared.words
        self._words = words
        base = worker.shared.layout.frontends[cfg.name]
        self._maxconn = base + FE_MAXCONN
        self._disabled = base + FE_DISABLED
        self._first = base + FE_FIELDS
        self._mine = self._first + worker.slot
        self._global_mine = GLOBAL_FIELDS + worker.slot

    # -- accepting ------------------------------------------------------------------

    async def start(self) -> None:
        """Accept on every listening socket handed over by the master."""
        if self._accepting or self._starting or self.stopping:
            return
        self._starting = True
        loop = asyncio.get_running_loop()
        try:
            for sock in self.sockets:
                # uvloop takes ownership of the socket it serves: give it a duplicate, so
                # this worker can stop accepting and start again on the same socket.
                server = await loop.create_server(
                    self._factory, sock=sock.dup(), backlog=self.cfg.backlog
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

    def soft_stop(self) -> None:
        self.stopping = True
        self.stop_accepting()
        # Queued requests leave in the order they were queued, to keep their turns.
        for session in sorted(self.sessions, key=lambda s: getattr(s, "queue_id", 0)):
            session.close_if_idle()

    async def adopt(
        self, sock: socket.socket, data: bytes, ticket: list[int] | None = None
    ) -> None:
        """Serve a connection an older generation handed over, with what it had read
        (and, for a request that waited in a queue, the ticket of its place there)."""
        sock.setblocking(False)
        try:
            _, session = await asyncio.get_running_loop().connect_accepted_socket(
                self._factory, sock
            )
        except OSError:
            sock.close()
            return
        if ticket is not None:
            session.resume = ticket
        if data:
            session.data_received(data)

    # -- limits ---------------------------------------------------------------------

    def current(self) -> int:
        """Connections admitted by pylb as a whole on this frontend."""
        return sum(self._words[self._first : self._first + MAX_SLOTS])

    def _has_room(self) -> bool:
        words = self._words
        if words[self._disabled]:
            return False
        return self.current() < words[self._maxconn] and (
            sum(words[GLOBAL_FIELDS : GLOBAL_FIELDS + MAX_SLOTS]) < words[GLOBAL_MAXCONN]
        )

    def admit(self, session: Any) -> bool:
        """Count a new connection in, or hold it (False) when the limit is reached."""
        self.sessions.add(session)
        self.counters.stot += 1
        with self.worker.shared.limits_lock():
            if self.held or not self._has_room():
                self.held.append(session)
                self.stop_accepting()
                return False
            self._count(1)
            full = not self._has_room()
        if full:
            self.stop_accepting()
        return True

    def _count(self, delta: int) -> None:
        self._words[self._mine] += delta
        self._words[self._global_mine] += delta

    def closed(self, session: Any) -> None:
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
